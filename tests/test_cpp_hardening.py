"""The C++ demo against hostile images, models and golden folders (issue 13, item 6).

Every refusal is one line on stderr and exit code 2; decoding is libjpeg-turbo/libpng, as in
Pillow, so the C++ pixels equal Python's. Like test_cpp_demo.py these skip when the programs are
not built, unless ET_REQUIRE_CPP=1 (CI).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from edgetransfer.errors import ManifestError
from edgetransfer.manifest import Preprocessing
from edgetransfer.runtime import OnnxClassifier

from .conftest import DIGITS
from .test_cpp_demo import PROGRAMS, json_lines, run

_spec = importlib.util.spec_from_file_location(
    "et_fuzz_cpp", Path(__file__).resolve().parents[1] / "tools" / "fuzz_cpp.py"
)
fuzz_cpp = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = fuzz_cpp  # its dataclasses look their module up
_spec.loader.exec_module(fuzz_cpp)

ROOT = Path(__file__).resolve().parent.parent
ASAN_BUILD = ROOT / "cpp_demo" / "build-asan"
PARITY_ATOL = 1e-4  # as the golden self-test: same pixels, so only float summation order differs
SAMPLE = DIGITS / "five" / "001.png"


def declared(line: str, name: str) -> bool:
    """The two lines a program prints about a model once it has loaded it (not a refusal)."""
    return line.startswith(f"{name}: ") and (
        ": arch " in line or line.startswith((f"{name}: input '", f"{name}: forward("))
    )


def refused(r: subprocess.CompletedProcess, name: str, message: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    lines = [line for line in r.stderr.splitlines() if not declared(line, name)]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{name}: ") and message in lines[0], r.stderr


def model_of(name: str, export: Path) -> Path:
    return export / PROGRAMS[name]


# --- images ---------------------------------------------------------------------------------


def digit(size=(45, 61)) -> Image.Image:
    return Image.open(SAMPLE).convert("RGB").resize(size, Image.BICUBIC)


@pytest.fixture(scope="module")
def decoded(tmp_path_factory) -> list[Path]:
    """Image kinds whose decoding used to differ from Pillow's (or was not handled at all)."""
    d = tmp_path_factory.mktemp("kinds")
    rgb = digit()
    out = []

    def save(im: Image.Image, name: str, **kw) -> None:
        im.save(d / name, **kw)
        out.append(d / name)

    save(rgb, "q90.jpg", quality=90)
    save(rgb, "q75_444.jpg", quality=75, subsampling=0)
    save(rgb, "q95_422.jpg", quality=95, subsampling=1)
    save(rgb, "progressive.jpg", quality=85, progressive=True)
    save(rgb, "optimized.jpg", quality=85, optimize=True)
    save(rgb.convert("L"), "gray.jpg", quality=90)
    save(rgb.convert("CMYK"), "cmyk.jpg", quality=90)
    save(digit((61, 45)), "wide.jpg", quality=90)
    save(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "palette.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    save(pal, "palette_trns.png", transparency=3)
    gray = rgb.convert("L")
    save(Image.merge("LA", (gray, gray.point(lambda v: 255 - v))), "la.png")
    save(gray, "gray_trns.png", transparency=0)
    save(rgb, "rgb_trns.png", transparency=(0, 0, 0))
    save(gray.point(lambda v: 255 if v > 128 else 0).convert("1"), "bilevel.png")
    save(rgb, "interlaced.png", interlace=1)
    a16 = (np.asarray(gray, np.uint16) * 200 + 1000).astype(np.uint16)
    save(Image.fromarray(a16), "gray16.png")
    # 16-bit RGB: Pillow keeps the high byte; written by hand (Pillow cannot save it)
    rgb16 = np.asarray(rgb, np.uint16) * 257 + np.arange(3, dtype=np.uint16)
    (d / "rgb16.png").write_bytes(png_bytes(rgb16.astype(">u2").tobytes(), *rgb.size, 16, 2))
    out.append(d / "rgb16.png")
    # elongated (but within 1000:1): the crop-only resize must equal Pillow's full resize
    save(digit((3, 2900)), "tall.png")
    save(digit((2900, 3)), "wide.png")
    return out


def png_bytes(raw_rows: bytes, width: int, height: int, depth: int, color: int) -> bytes:
    """A PNG of filter-0 rows, written by hand so any header (even a hostile one) can be made."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    stride = len(raw_rows) // height if height else 0
    rows = b"".join(b"\0" + raw_rows[y * stride : (y + 1) * stride] for y in range(height))
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, color, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(rows, 9))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("name", PROGRAMS)
def test_decoding_matches_pillow(name, digits_export, decoded):
    """JPEG (CMYK, gray, progressive), palette, alpha, 16-bit and elongated PNGs: Python's logits.

    stb_image differed by up to 5e-3 in logits on plain JPEGs (test_cpp_demo allows 0.05).
    """
    want = {
        p.path: np.asarray(p.logits)
        for p in OnnxClassifier(digits_export / "model.onnx").predict(decoded)
    }
    got = json_lines(run(name, model_of(name, digits_export), *decoded))
    for path in map(str, decoded):
        np.testing.assert_allclose(
            got[path]["logits"], want[path], atol=PARITY_ATOL, rtol=0, err_msg=path
        )


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of the segments before the first scan."""
    out, i = [], 2
    while data[i] == 0xFF and data[i + 1] != 0xDA:
        end = i + 2 + int.from_bytes(data[i + 2 : i + 4], "big")
        out.append((data[i + 1], i, end))
        i = end
    return out


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("jpeg") / "plain.jpg"
    digit((32, 32)).save(path, quality=90)
    return path.read_bytes()


@pytest.mark.parametrize("name", PROGRAMS)
def test_huffman_counts_past_256_are_refused(name, digits_export, jpeg, tmp_path):
    """stb_image 2.27 read out of bounds here (SIGSEGV); libjpeg refuses the table."""
    start = next(s for m, s, _ in jpeg_segments(jpeg) if m == 0xC4)
    bad = bytearray(jpeg)
    bad[start + 5 : start + 21] = b"\xff" * 16  # 16 code lengths summing to 4080 symbols
    (tmp_path / "dht.jpg").write_bytes(bad)
    r = run(name, model_of(name, digits_export), tmp_path / "dht.jpg")
    refused(r, name, "dht.jpg: not a readable JPEG image (Bogus Huffman table definition)")


@pytest.mark.parametrize("name", PROGRAMS)
def test_jpeg_without_huffman_tables_decodes_like_pillow(name, digits_export, jpeg, tmp_path):
    """No DHT at all: stb decoded uninitialised memory; libjpeg-turbo (and Pillow) use the
    standard tables, which Pillow's encoder wrote, so the pixels are the right ones."""
    cut = b"".join(jpeg[s:e] for m, s, e in jpeg_segments(jpeg) if m == 0xC4)
    stripped = jpeg.replace(cut, b"") if cut in jpeg else None
    if stripped is None:  # tables not adjacent: drop them one by one
        stripped = jpeg
        for m, s, e in reversed(jpeg_segments(jpeg)):
            if m == 0xC4:
                stripped = stripped[:s] + stripped[e:]
    path = tmp_path / "nodht.jpg"
    path.write_bytes(stripped)
    assert b"\xff\xc4" not in stripped[: stripped.index(b"\xff\xda")]
    want = next(iter(OnnxClassifier(digits_export / "model.onnx").predict([path]))).logits
    first = json_lines(run(name, model_of(name, digits_export), path))[str(path)]["logits"]
    again = json_lines(run(name, model_of(name, digits_export), path))[str(path)]["logits"]
    assert first == again
    np.testing.assert_allclose(first, want, atol=PARITY_ATOL, rtol=0)


@pytest.mark.parametrize("name", PROGRAMS)
def test_truncated_jpeg_is_refused_like_pillow(name, digits_export, jpeg, tmp_path):
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    r = run(name, model_of(name, digits_export), tmp_path / "cut.jpg")
    refused(r, name, "cut.jpg: not a readable JPEG image (Premature end of JPEG file)")


@pytest.mark.parametrize("name", PROGRAMS)
def test_endless_progressive_scans_are_refused(name, digits_export, tmp_path):
    """Every scan passes over the whole image: 900 of them on 16 Mpixels took 13 s."""
    buf = io.BytesIO()
    Image.new("RGB", (256, 256), (10, 200, 30)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    last, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    (tmp_path / "scans.jpg").write_bytes(data[:end] + data[last:end] * 300 + b"\xff\xd9")
    r = run(name, model_of(name, digits_export), tmp_path / "scans.jpg")
    refused(r, name, "scans.jpg: not a readable JPEG image (more than 200 scans)")


@pytest.mark.parametrize("name", PROGRAMS)
def test_one_by_two_million_png_is_refused_fast(name, digits_export, tmp_path):
    """4 KB on disk, 7.5 GB and 30 s in resize_crop before; the 1000:1 rule of Python now."""
    path = tmp_path / "strip.png"
    path.write_bytes(png_bytes(bytes(3 * 2_000_000), 1, 2_000_000, 8, 2))
    assert path.stat().st_size < 10_000
    start = time.monotonic()
    r = run(name, model_of(name, digits_export), path)
    refused(r, name, "strip.png: 1x2000000 is too elongated (over 1000:1)")
    assert time.monotonic() - start < 30


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize(
    "kind, message",
    [
        ("fifo", "fifo.png: not a regular file"),
        ("folder", "folder.png: not a regular file"),
        ("huge header", "exceeds 64000000 pixels"),
        ("zero width", "not a readable PNG image"),
    ],
)
def test_unusable_image_files_are_one_line(name, kind, message, digits_export, tmp_path):
    if kind == "fifo":
        path = tmp_path / "fifo.png"
        os.mkfifo(path)
    elif kind == "folder":
        path = tmp_path / "folder.png"
        path.mkdir()
    else:
        path = tmp_path / "bad.png"
        width = 100_000 if kind == "huge header" else 0
        path.write_bytes(png_bytes(b"", width, 100_000 if width else 0, 8, 2))
    refused(run(name, model_of(name, digits_export), path), name, message)


def test_names_that_are_not_utf8_print_as_question_marks(digits_export, tmp_path):
    """Stray bytes in a name (or a runtime's message) reached stderr raw: not one UTF-8 line."""
    path = tmp_path / os.fsdecode(b"x\xff\xfe\xc3\xa9.png")
    r = run("et_onnx", digits_export / "model.onnx", path)  # the test decodes stderr strictly
    refused(r, "et_onnx", "x??\u00e9.png: no such file")


# --- models ---------------------------------------------------------------------------------


def with_metadata(model: onnx.ModelProto, text: str) -> onnx.ModelProto:
    del model.metadata_props[:]
    model.metadata_props.add(key="edgetransfer", value=text)
    return model


@pytest.fixture(scope="module")
def manifest(digits_export) -> dict:
    return json.loads((digits_export / "edgetransfer.json").read_text())


def sequence_model(export: Path, where: str) -> onnx.ModelProto:
    """A valid model whose output (or input) is a sequence of tensors, not a tensor."""
    m = onnx.load(export / "model.onnx")
    if where == "output":
        fuzz_cpp.wrap_output(m.graph, "SequenceConstruct")
    else:
        fuzz_cpp.sequence_input(m.graph)
    return m


@pytest.mark.parametrize("where", ["output", "input"])
def test_sequence_input_or_output_is_refused(where, digits_export, tmp_path):
    """ORT gives NULL tensor info for a sequence; et_onnx dereferenced it (SIGSEGV)."""
    path = tmp_path / "seq.onnx"
    onnx.save(sequence_model(digits_export, where), path)
    r = run("et_onnx", path, SAMPLE)
    refused(r, "et_onnx", f"seq.onnx: {where} '")
    assert "is a sequence, not a tensor" in r.stderr


def test_non_finite_logits_are_refused(digits_export, tmp_path):
    """A model whose logits overflow gave NaN probabilities and exit 0."""
    m = onnx.load(digits_export / "model.onnx")
    g = m.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}_t" if o == out else o for o in node.output]
    g.initializer.append(helper.make_tensor("big", TensorProto.FLOAT, [], [3e38]))
    g.node.append(helper.make_node("Mul", [f"{out}_t", "big"], [out]))
    onnx.save(m, tmp_path / "inf.onnx")
    refused(run("et_onnx", tmp_path / "inf.onnx", SAMPLE), "et_onnx", "non-finite logits")
    r = run("et_onnx", tmp_path / "inf.onnx", "--selftest", digits_export / "golden")
    refused(r, "et_onnx", "non-finite logits")


def save_with_manifest(name: str, export: Path, text: str, path: Path) -> Path:
    if name == "et_onnx":
        onnx.save(with_metadata(onnx.load(export / "model.onnx"), text), path)
    else:
        import torch

        module = torch.jit.load(export / "model.pt")
        torch.jit.save(module, path, _extra_files={"edgetransfer.json": text})
    return path


DEEP = "[" * 200_000 + "]" * 200_000


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize(
    "case, message",
    [
        ("deep", "JSON nested deeper than 64 levels"),
        ("deep value", "JSON nested deeper than 64 levels"),
        ("tiny std", "std in [1.00e-04, 1.00e+04]"),
        ("huge mean", "|mean| <= 1.00e+04"),
        ("huge size", "sizes must be 1..16384 pixels"),
        ("escape sequence", r'preprocessing crop="\u001b[31mx\n" is not supported'),
    ],
)
def test_hostile_manifests_are_one_line(name, case, message, digits_export, manifest, tmp_path):
    """A manifest nested 200,000 deep overflowed the stack; std 1e-45 gave inf logits, exit 0."""
    m = json.loads(json.dumps(manifest))
    pre = m["preprocessing"]
    if case == "deep":
        text = DEEP
    else:
        if case == "deep value":
            m["provenance"] = "@"
        elif case == "tiny std":
            pre["std"] = [1e-45, 0.5, 0.5]
        elif case == "huge mean":
            pre["mean"] = [1e30, 0.5, 0.5]
        elif case == "huge size":
            pre["input_size"] = [1e20, 28]
        else:
            pre["crop"] = "\x1b[31mx\n"
        text = json.dumps(m).replace('"@"', DEEP)
    path = save_with_manifest(name, digits_export, text, tmp_path / f"model{PROGRAMS[name][5:]}")
    refused(run(name, path, SAMPLE), name, message)


@pytest.mark.parametrize(
    "std, mean, ok",
    [
        ((0.229, 0.224, 0.225), (0.485, 0.456, 0.406), True),
        ((1 / 255,) * 3, (0.0,) * 3, True),
        ((1.0,) * 3, (127.5,) * 3, True),
        ((1e-45, 0.5, 0.5), (0.5,) * 3, False),
        ((0.5, 0.5, 1e5), (0.5,) * 3, False),
        ((0.5,) * 3, (1e30, 0.5, 0.5), False),
    ],
)
def test_python_shares_the_preprocessing_bounds(std, mean, ok):
    d = {"input_size": [28, 28], "resize": 32, "mean": list(mean), "std": list(std)}
    if ok:
        assert Preprocessing.from_dict(d).std == tuple(std)
    else:
        with pytest.raises(ManifestError, match=r"std in \[0.0001, 10000\]"):
            Preprocessing.from_dict(d)


# --- model.pte (et_executorch) ---------------------------------------------------------------

ET = "et_executorch"


@pytest.fixture(scope="module")
def bad_ptes(pte_export, tmp_path_factory) -> dict[str, Path]:
    from edgetransfer.manifest import pte_manifest_json

    out, _ = pte_export
    d = tmp_path_factory.mktemp("bad_pte")
    data = (out / "model.pte").read_bytes()
    text = pte_manifest_json(out / "model.pte")
    other = json.loads(text)
    other["preprocessing"]["input_size"] = [28, 28]
    flipped = bytearray(data)
    flipped[100] ^= 0xFF  # inside the program's flatbuffer, which the runtime verifies
    files = {
        "garbage": b"not a program\n" * 10,
        "cut": data[:3000],
        "flipped": bytes(flipped),
        "no manifest": data.replace(b"edgetransfer_manifest", b"edgetransfer_manifesX", 1),
        "wrong input": fuzz_cpp.pte_with_manifest(data, text, json.dumps(other)),
    }
    # One byte of XNNPACK's serialized graph (a dimension of simple_cnn's first convolution),
    # past what the runtime verifies: XNNPACK 1.5.1 reads out of bounds with it.
    delegate = bytearray(data)
    delegate[fuzz_cpp.pte_program_size(data) + 1810] = 0xFF
    files["damaged delegate"] = bytes(delegate)
    for name, content in files.items():
        (d / f"{name.replace(' ', '_')}.pte").write_bytes(content)
    return {name: d / f"{name.replace(' ', '_')}.pte" for name in files} | {
        "missing": d / "missing.pte",
        "onnx": out / "model.onnx",
    }


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "missing.pte: no such model file"),
        ("onnx", "model.onnx: not a loadable ExecuTorch program (Program identifier 'edge'"),
        ("garbage", "garbage.pte: not a loadable ExecuTorch program ("),
        ("cut", "cut.pte: not a loadable ExecuTorch program (File size is too small"),
        ("flipped", "flipped.pte: not a loadable ExecuTorch program ("),
        ("no manifest", "no_manifest.pte: carries no edgetransfer metadata"),
        ("wrong input", "forward takes float32 [16,3,32,32], not the manifest's 28x28 images"),
        ("missing image", "missing.png: no such file"),
    ],
)
def test_executorch_refuses_bad_programs_in_one_line(case, message, pte_export, bad_ptes):
    out, _ = pte_export
    image = DIGITS / "five" / "001.png"
    if case == "missing image":
        args = (out / "model.pte", image, image.parent / "missing.png")
    else:
        args = (bad_ptes[case], image)
    r = run(ET, *args)
    assert len(r.stderr.splitlines()) == 1, r.stderr  # not even the lines describing the model
    refused(r, ET, message)


def test_executorch_crash_inside_xnnpack_is_one_line(pte_export, bad_ptes):
    """A damaged delegate graph crashed inside XNNPACK (SIGSEGV, core dump); the program reports
    it in one line and exit 2 (or refuses it, should a later XNNPACK check the graph)."""
    r = run(ET, bad_ptes["damaged delegate"], DIGITS / "five" / "001.png")
    refused(r, ET, "damaged_delegate.pte: ")
    assert any(
        m in r.stderr
        for m in ("ExecuTorch crashed (SIGSEGV) running this program", "cannot load forward")
    ), r.stderr


# --- golden folders -------------------------------------------------------------------------


@pytest.fixture
def golden(digits_export, tmp_path) -> Path:
    return shutil.copytree(digits_export / "golden", tmp_path / "golden")


def edit_case(golden: Path, key: str, value: str) -> None:
    index = json.loads((golden / "golden.json").read_text())
    index["cases"][0][key] = value
    (golden / "golden.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize(
    "case, message",
    [
        ("fifo", "fifo.bin: not a regular file"),
        ("parent", "golden.json names '../secret.bin', not a file inside the golden folder"),
        ("absolute", "golden.json names '/dev/zero', not a file inside the golden folder"),
        ("symlink", "link.bin: leads outside the golden folder"),
        ("device via symlink", "zero.bin: leads outside the golden folder"),
        ("deep", "JSON nested deeper than 64 levels"),
        ("too big", "more than the 1048576 allowed"),
        ("control characters", "golden.json names 'a?]0;title?b/../../x'"),
    ],
)
def test_hostile_golden_folders_are_one_line(name, case, message, digits_export, golden):
    """FIFOs hung, /dev/zero ate memory, ../ and absolute names were followed."""
    outside = golden.parent / "secret.bin"
    shutil.copy(golden / "00.input.bin", outside)
    if case == "fifo":
        os.mkfifo(golden / "fifo.bin")
        edit_case(golden, "input", "fifo.bin")
    elif case == "parent":
        edit_case(golden, "input", "../secret.bin")
    elif case == "absolute":
        edit_case(golden, "logits", "/dev/zero")
    elif case == "symlink":
        (golden / "link.bin").symlink_to(outside)
        edit_case(golden, "input", "link.bin")
    elif case == "device via symlink":
        (golden / "zero.bin").symlink_to("/dev/zero")
        edit_case(golden, "logits", "zero.bin")
    elif case == "deep":
        (golden / "golden.json").write_text(DEEP)
    elif case == "control characters":  # printed raw, they would retitle the terminal
        edit_case(golden, "input", "a\x1b]0;title\nb/../../x")
    else:
        (golden / "golden.json").write_text(" " * (2 << 20) + "{}")
    r = run(name, model_of(name, digits_export), "--selftest", golden)
    refused(r, name, message)


# --- the fuzz harness -----------------------------------------------------------------------


def fuzz(export: Path, tmp_path: Path, cases: int, *programs: str) -> dict:
    """tools/fuzz_cpp.py on the sanitizer build for `cases` cases (a count, not a time: the
    same cases on a busy machine, seed 13); its counts."""
    for name in programs:
        if not (ASAN_BUILD / name).is_file():
            reason = f"{ASAN_BUILD / name} is not built; run tools/build_cpp_demo.sh --asan"
            if os.environ.get("ET_REQUIRE_CPP") == "1":
                pytest.fail(reason + " (ET_REQUIRE_CPP=1)")
            pytest.skip(reason)
    report = tmp_path / "fuzz.json"
    cmd = [sys.executable, str(ROOT / "tools" / "fuzz_cpp.py"), str(export), "--programs"]
    cmd += [*programs, "--build", str(ASAN_BUILD), "-n", str(cases), "--seed", "13"]
    r = subprocess.run([*cmd, "--json", str(report)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    counts = json.loads(report.read_text())
    for bad in ("sanitizer", "signal", "hang", "not_one_line", "bad_exit"):
        assert counts[bad] == 0, counts
    return counts


def test_fuzz_harness_small_budget(digits_export, tmp_path):
    """tools/fuzz_cpp.py on the sanitizer build: no sanitizer report, signal, hang or
    multi-line refusal in 50 mutated images, models and golden folders."""
    assert fuzz(digits_export, tmp_path, 50, *PROGRAMS)["cases"] == 50


def test_fuzz_harness_on_a_pte(pte_export, tmp_path):
    """The same for et_executorch, with damaged model.pte files among the cases."""
    out, _ = pte_export
    counts = fuzz(out, tmp_path, 20, ET)
    assert counts["by_kind"].get("pte/et_executorch", 0) >= 3, counts
    assert counts["runtime_crash"] == 0, counts  # the program's damage is caught before XNNPACK
