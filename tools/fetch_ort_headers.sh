#!/usr/bin/env bash
# Fetch ONNX Runtime's C/C++ headers (the pip wheel ships the library but no headers).
#
# Usage: tools/fetch_ort_headers.sh [DEST]   (default: cpp_demo/third_party/onnxruntime/include)
#
# Debian 13 (trixie) packages them as libonnxruntime-dev. We download that one .deb with
# `apt-get download` under a throwaway apt configuration (its own sources list, state, cache and
# lists in a temp dir; signatures checked with the Debian archive keyring), then keep only the
# headers. The system's apt sources and installed packages are not touched. The mirror is the one
# this machine's apt already uses; override with ET_DEBIAN_MIRROR=URL.
# The C API is ABI-stable, so these headers work with any newer libonnxruntime.so.
set -euo pipefail

DEST=${1:-"$(cd "$(dirname "$0")/.." && pwd)/cpp_demo/third_party/onnxruntime/include"}
SUITE=${ET_ORT_SUITE:-trixie}
PACKAGE=libonnxruntime-dev

if [[ -f "$DEST/onnxruntime_cxx_api.h" ]]; then
    echo "fetch_ort_headers: $DEST already has the headers"
    exit 0
fi

# The first non-security Debian mirror from this machine's own apt sources.
mirror=${ET_DEBIAN_MIRROR:-}
if [[ -z "$mirror" ]]; then
    mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
        awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' | grep -v security | head -n1 || true)
fi
if [[ -z "$mirror" ]]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' |
        grep -v security | head -n1 || true)
fi
if [[ -z "$mirror" ]]; then
    echo "fetch_ort_headers: no Debian mirror in /etc/apt sources; set ET_DEBIAN_MIRROR=URL" >&2
    exit 2
fi

# The bookworm keyring package also carries the trixie archive keys.
keyring=""
for k in /usr/share/keyrings/debian-archive-keyring.gpg \
         /usr/share/keyrings/debian-archive-"$SUITE"-automatic.gpg; do
    [[ -f "$k" ]] && keyring="$keyring${keyring:+,}$k"
done
if [[ -z "$keyring" ]]; then
    echo "fetch_ort_headers: no Debian archive keyring; apt-get install debian-archive-keyring" >&2
    exit 2
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
mkdir -p "$tmp"/{state/lists/partial,cache/archives/partial,empty,download,extract}
echo "deb [signed-by=$keyring] $mirror $SUITE main" >"$tmp/sources.list"
touch "$tmp/status"
# apt drops to the _apt user for downloads; let it write there (as root).
if [[ $(id -u) == 0 ]] && id _apt >/dev/null 2>&1; then
    chown -R _apt "$tmp/state/lists" "$tmp/cache" "$tmp/download"
fi

apt_opts=(
    -q -o Dir::Etc::sourcelist="$tmp/sources.list" -o Dir::Etc::sourceparts=-
    -o Dir::Etc::preferences="$tmp/empty/none" -o Dir::Etc::preferencesparts="$tmp/empty"
    -o Dir::State="$tmp/state" -o Dir::State::status="$tmp/status"
    -o Dir::Cache="$tmp/cache"
    -o Acquire::Languages=none -o APT::Get::List-Cleanup=0
)
echo "fetch_ort_headers: reading the $SUITE package index from $mirror"
apt-get "${apt_opts[@]}" update >"$tmp/update.log" 2>&1 || {
    cat "$tmp/update.log" >&2
    echo "fetch_ort_headers: apt-get update for $SUITE failed (see above)" >&2
    exit 1
}
(cd "$tmp/download" && apt-get "${apt_opts[@]}" download "$PACKAGE") || {
    echo "fetch_ort_headers: could not download $PACKAGE from $SUITE" >&2
    exit 1
}
deb=$(ls "$tmp"/download/*.deb)
dpkg-deb -x "$deb" "$tmp/extract"
src="$tmp/extract/usr/include/onnxruntime"
if [[ ! -f "$src/onnxruntime_cxx_api.h" ]]; then
    echo "fetch_ort_headers: $(basename "$deb") has no include/onnxruntime/onnxruntime_cxx_api.h" >&2
    exit 1
fi
mkdir -p "$DEST"
cp -r "$src"/. "$DEST"/
cp "$tmp/extract/usr/share/doc/$PACKAGE/copyright" "$DEST/COPYRIGHT" 2>/dev/null || true
dpkg-deb -f "$deb" Version >"$DEST/VERSION"
echo "fetch_ort_headers: $PACKAGE $(cat "$DEST/VERSION") headers -> $DEST"
