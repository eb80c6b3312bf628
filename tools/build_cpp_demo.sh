#!/usr/bin/env bash
# Build cpp_demo (et_onnx, et_torchscript, et_executorch) into cpp_demo/build from a fresh clone,
# offline but for Debian packages. Idempotent: a re-run only re-checks and rebuilds what changed.
#
# Usage: tools/build_cpp_demo.sh [--asan]
#   --asan                  an AddressSanitizer/UBSan build into cpp_demo/build-asan instead, for
#                           tools/fuzz_cpp.py (only our code is instrumented, not ORT, libtorch
#                           or ExecuTorch)
#   PYTHON=path/to/python   the venv with torch, onnxruntime and executorch (default .venv/bin/python)
#   ONNXRUNTIME_ROOT=DIR    use an ONNX Runtime release folder instead of the pip wheel
#   LIBTORCH=DIR            use a libtorch release folder instead of the pip wheel
#   EXECUTORCH=DIR          use this ExecuTorch package folder (lib/cmake/executorch inside)
#                           instead of the venv's executorch wheel
#
# From the wheels: libtorch is torch/include + torch/lib; ONNX Runtime's library is
# onnxruntime/capi/libonnxruntime.so.<version> (SONAME libonnxruntime.so.1), linked through
# symlinks in cpp_demo/third_party/onnxruntime/lib, with headers from tools/fetch_ort_headers.sh.
# ExecuTorch's wheel carries headers, shared libraries and a CMake package config: its folder goes
# on CMAKE_PREFIX_PATH for find_package(executorch). Without the executorch extra installed,
# et_executorch is left out (said once) and the other two are built.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=cpp_demo/build
cmake_args=(-DCMAKE_BUILD_TYPE=Release)
case "${1:-}" in
    "") ;;
    --asan) build=cpp_demo/build-asan; cmake_args=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DET_SANITIZE=ON) ;;
    *) echo "usage: tools/build_cpp_demo.sh [--asan]" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-$root/.venv/bin/python}
start=$SECONDS

# 1. Debian packages: compiler, cmake, libjpeg-turbo and libpng (Pillow's decoders), nlohmann-json.
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
[[ -f /usr/include/jpeglib.h ]] || need+=(libjpeg62-turbo-dev)
[[ -f /usr/include/png.h ]] || need+=(libpng-dev)
[[ -f /usr/include/nlohmann/json.hpp ]] || need+=(nlohmann-json3-dev)
[[ -f /usr/include/openssl/evp.h ]] || need+=(libssl-dev)
if ((${#need[@]})); then
    echo "build_cpp_demo: installing ${need[*]}"
    sudo=()
    [[ $(id -u) == 0 ]] || sudo=(sudo -n)
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}"
fi

if [[ -z "${ONNXRUNTIME_ROOT:-}" || -z "${LIBTORCH:-}" ]] && [[ ! -x "$PYTHON" ]]; then
    echo "build_cpp_demo: no $PYTHON; install the package first (see README) or set PYTHON=" >&2
    exit 1
fi

# 2. ONNX Runtime: a release folder, or the wheel's library + Debian's headers.
if [[ -n "${ONNXRUNTIME_ROOT:-}" ]]; then
    cmake_args+=(-DONNXRUNTIME_ROOT="$ONNXRUNTIME_ROOT")
else
    ort=$root/cpp_demo/third_party/onnxruntime
    bash tools/fetch_ort_headers.sh "$ort/include"
    capi=$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("onnxruntime").submodule_search_locations[0])')/capi
    lib=$(ls "$capi"/libonnxruntime.so.1.* 2>/dev/null | head -n1 || true)
    if [[ -z "$lib" ]]; then
        echo "build_cpp_demo: no libonnxruntime.so.1.* in $capi; pip install onnxruntime" >&2
        exit 1
    fi
    mkdir -p "$ort/lib"
    ln -sfn "$lib" "$ort/lib/libonnxruntime.so.1"
    ln -sfn libonnxruntime.so.1 "$ort/lib/libonnxruntime.so"
    cmake_args+=(-DONNXRUNTIME_ROOT="$ort")
fi

# 3. libtorch: a release folder (find_package(Torch)), or the wheel linked directly.
if [[ -n "${LIBTORCH:-}" ]]; then
    cmake_args+=(-DTORCH_WHEEL_DIR=)  # find_package(Torch) through CMAKE_PREFIX_PATH (step 4)
else
    read -r torch_dir abi < <("$PYTHON" -c 'import os, torch; print(os.path.dirname(torch.__file__), int(torch._C._GLIBCXX_USE_CXX11_ABI))')
    cmake_args+=(-DTORCH_WHEEL_DIR="$torch_dir" -DTORCH_CXX11_ABI="$abi")
fi

# 4. ExecuTorch: a package folder, or the wheel (an optional extra: without it, no et_executorch).
prefix=${LIBTORCH:-}
et_dir=${EXECUTORCH:-}
if [[ -z "$et_dir" && -x "$PYTHON" ]]; then
    et_dir=$("$PYTHON" -c 'import importlib.util as u; s = u.find_spec("executorch"); print(s.submodule_search_locations[0] if s else "")')
fi
if [[ -n "$et_dir" ]]; then
    prefix=${prefix:+$prefix;}$et_dir
    cmake_args+=(-DET_EXECUTORCH=ON)
    programs="et_onnx, et_learn, et_torchscript and et_executorch"
else
    echo "build_cpp_demo: executorch is not installed (pip install -e '.[executorch]'); building without et_executorch" >&2
    cmake_args+=(-DET_EXECUTORCH=OFF)
    programs="et_onnx, et_learn and et_torchscript"
fi
[[ -z "$prefix" ]] || cmake_args+=(-DCMAKE_PREFIX_PATH="$prefix")

# 5. Configure and build (the log is $build/build.log).
mkdir -p "$build"
[[ -f "$build/.gitignore" ]] || printf '*\n' >"$build/.gitignore"  # a build folder is never committed
log=$build/build.log
cmake -S cpp_demo -B "$build" "${cmake_args[@]}" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
cmake --build "$build" -j2 >>"$log" 2>&1 || { tail -n 40 "$log" >&2; exit 1; }
grep -E "warning:" "$log" || true
echo "build_cpp_demo: $programs ready in $build ($((SECONDS - start)) s)"
