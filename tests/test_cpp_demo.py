"""The C++ demo (cpp_demo/): et_onnx and et_torchscript answer like the Python runtime.

The programs are built by tools/build_cpp_demo.sh into cpp_demo/build/. Without them these tests
skip, unless ET_REQUIRE_CPP=1 (as in CI), where a missing program is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetransfer.cli import cli
from edgetransfer.runtime import OnnxClassifier

from .conftest import DIGITS

BUILD = Path(__file__).resolve().parent.parent / "cpp_demo" / "build"
PROGRAMS = {"et_onnx": "model.onnx", "et_torchscript": "model.pt"}

LOGITS_ATOL = 1e-4  # PNGs: our resize reproduces Pillow's, so logits match like the golden ones
JPEG_ATOL = 0.05  # stb_image's JPEG decoder is not libjpeg's: pixels differ by a level or two
OTHER_SIZES = [(45, 61), (61, 45), (20, 28), (97, 31), (64, 64), (33, 32)]
EXIF_ORIENTATION = 0x0112
# Stored pixels for each EXIF orientation, so that Pillow's exif_transpose gives them back upright.
STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def program(name: str) -> Path:
    path = BUILD / name
    if not path.is_file():
        reason = f"{path} is not built; run tools/build_cpp_demo.sh"
        if os.environ.get("ET_REQUIRE_CPP") == "1":
            pytest.fail(reason + " (ET_REQUIRE_CPP=1)")
        pytest.skip(reason)
    return path


def run(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(program(name)), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def json_lines(result: subprocess.CompletedProcess) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr
    return {d["path"]: d for d in map(json.loads, result.stdout.splitlines())}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """Sample PNGs at the input size, and the same digits at other sizes, formats, orientations."""
    out = tmp_path_factory.mktemp("cpp_images")
    same = sorted(DIGITS.glob("*/00[12].png"))
    sources = sorted(DIGITS.glob("*/01[0-9].png"))[: len(OTHER_SIZES) * 2]
    png, jpeg = [], []
    for i, src in enumerate(sources):
        w, h = OTHER_SIZES[i % len(OTHER_SIZES)]
        img = Image.open(src).convert("RGB").resize((w, h), Image.BICUBIC)
        stem = out / f"{src.parent.name}_{src.stem}_{w}x{h}"
        img.save(f"{stem}.png")
        img.save(f"{stem}.jpg", quality=90)
        alpha = Image.fromarray((np.arange(w * h).reshape(h, w) * 7 % 256).astype(np.uint8))
        Image.merge("RGBA", (*img.split(), alpha)).save(f"{stem}_rgba.png")
        png += [Path(f"{stem}.png"), Path(f"{stem}_rgba.png")]
        jpeg.append(Path(f"{stem}.jpg"))
    upright = Image.open(sources[0]).convert("RGB").resize((45, 61), Image.BICUBIC)
    for orientation, op in STORE.items():
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        path = out / f"orientation{orientation}.jpg"
        upright.transpose(op).save(path, quality=90, exif=exif)
        jpeg.append(path)
    return {"same": same, "png": png, "jpeg": jpeg}


@pytest.fixture(scope="module")
def python_logits(digits_export, images) -> dict[str, np.ndarray]:
    paths = [p for group in images.values() for p in group]
    clf = OnnxClassifier(digits_export / "model.onnx")
    return {p.path: np.asarray(p.logits) for p in clf.predict(paths)}


@pytest.fixture(scope="module", params=list(PROGRAMS))
def cpp(request, digits_export, images) -> tuple[str, dict[str, dict]]:
    """One run of a program over every test image (libtorch start-up is slow-ish)."""
    name = request.param
    paths = [p for group in images.values() for p in group]
    return name, json_lines(run(name, digits_export / PROGRAMS[name], *paths, "--topk", 5))


@pytest.mark.parametrize("name", PROGRAMS)
def test_selftest_passes(name, digits_export):
    r = run(name, digits_export / PROGRAMS[name], "--selftest", digits_export / "golden")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["selftest"] == "pass" and summary["failed"] == 0
    assert summary["cases"] >= 5
    assert summary["max_abs_normalized"] == 0.0  # our normalisation of NN.png == NN.input.bin
    assert summary["max_abs_input.bin"] <= 1e-4
    assert summary["max_abs_png"] <= 1e-4
    assert "labels [eight, five, nine, seven, six]" in r.stderr  # the model declares itself


@pytest.mark.parametrize("name", PROGRAMS)
def test_selftest_fails_past_tolerance(name, digits_export, tmp_path):
    golden = shutil.copytree(digits_export / "golden", tmp_path / "golden")
    logits = np.fromfile(golden / "00.logits.bin", dtype="<f4")
    logits[0] += 0.01
    logits.tofile(golden / "00.logits.bin")
    r = run(name, digits_export / PROGRAMS[name], "--selftest", golden)
    assert r.returncode == 1
    assert json.loads(r.stdout)["selftest"] == "fail"
    assert "selftest 00 from png" in r.stderr and "FAIL" in r.stderr


def test_same_size_pngs_match_predict(cpp, python_logits, images, digits_export):
    name, out = cpp
    paths = [str(p) for p in images["same"]]
    result = CliRunner().invoke(
        cli, ["predict", str(digits_export / "model.onnx"), *paths, "--topk", "5", "--json"]
    )
    assert result.exit_code == 0, result.output
    predicted = {d["path"]: d for d in map(json.loads, result.output.splitlines())}
    for path in paths:
        ours, theirs = out[path], predicted[path]
        assert [t["label"] for t in ours["topk"]] == [t["label"] for t in theirs["topk"]], name
        np.testing.assert_allclose(
            [t["prob"] for t in ours["topk"]], [t["prob"] for t in theirs["topk"]], atol=2e-6
        )
        np.testing.assert_allclose(ours["logits"], python_logits[path], atol=LOGITS_ATOL, rtol=0)


def test_other_size_pngs_match_python(cpp, python_logits, images):
    """PNGs of other sizes (RGB and RGBA): the C++ resize and alpha compositing equal Pillow's."""
    name, out = cpp
    for path in map(str, images["png"]):
        np.testing.assert_allclose(
            out[path]["logits"], python_logits[path], atol=LOGITS_ATOL, rtol=0, err_msg=path
        )


def test_jpegs_agree_on_top1(cpp, python_logits, images):
    """JPEGs (other sizes, every EXIF orientation): decoders differ slightly, top-1 agrees."""
    name, out = cpp
    for path in map(str, images["jpeg"]):
        want = python_logits[path]
        got = np.asarray(out[path]["logits"])
        assert int(got.argmax()) == int(want.argmax()), f"{name} {path}: {got} vs {want}"
        np.testing.assert_allclose(got, want, atol=JPEG_ATOL, rtol=0, err_msg=path)


def test_raw_pixel_model(digits_export, images):
    raw = digits_export / "model.raw.onnx"
    if not raw.is_file():
        pytest.skip("this export has no model.raw.onnx")
    r = run("et_onnx", raw, "--selftest", digits_export / "golden")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["max_abs_png"] <= 1e-4
    assert "raw pixels" in r.stderr
    paths = images["same"] + images["png"]
    raw_out = json_lines(run("et_onnx", raw, *paths))
    float_out = json_lines(run("et_onnx", digits_export / "model.onnx", *paths))
    for path in map(str, paths):
        np.testing.assert_allclose(
            raw_out[path]["logits"], float_out[path]["logits"], atol=LOGITS_ATOL, rtol=1e-3
        )


@pytest.fixture(scope="module")
def bad_files(digits_export, tmp_path_factory) -> dict[str, Path]:
    import onnx
    import torch

    d = tmp_path_factory.mktemp("cpp_bad")
    (d / "notes.png").write_text("not an image\n")
    m = onnx.load(digits_export / "model.onnx")
    del m.metadata_props[:]
    onnx.save(m, d / "plain.onnx")
    torch.jit.save(torch.jit.load(digits_export / "model.pt"), d / "plain.pt")
    return {"missing": d / "missing.png", "text": d / "notes.png", "onnx": d / "plain.onnx",
            "pt": d / "plain.pt"}  # fmt: skip


@pytest.mark.parametrize("name", PROGRAMS)
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing image", "no such file"),
        ("not an image", "not a readable JPEG/PNG image"),
        ("no metadata", "carries no edgetransfer"),
        ("wrong kind of model", "not a loadable"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(name, case, message, digits_export, bad_files):
    model, image = digits_export / PROGRAMS[name], DIGITS / "five" / "001.png"
    other = {"et_onnx": "model.pt", "et_torchscript": "model.onnx"}[name]
    args = {
        "missing image": (model, image, bad_files["missing"]),
        "not an image": (model, bad_files["text"]),
        "no metadata": (bad_files["onnx" if name == "et_onnx" else "pt"], image),
        "wrong kind of model": (digits_export / other, image),
    }[case]
    r = run(name, *args)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith(f"{name}: ") and message in r.stderr


@pytest.mark.parametrize("name", [*PROGRAMS, "et_executorch"])
def test_usage(name):
    r = run(name)
    assert r.returncode == 2 and r.stderr.startswith(f"usage: {name} ")
    r = run(name, "model", "--topk", "zero")
    assert r.returncode == 2 and "--topk needs a positive integer" in r.stderr
    r = run(name, "model", "--threads", "0")
    assert r.returncode == 2 and "--threads needs a positive integer, got '0'" in r.stderr
    assert "[--threads N]" in r.stderr  # the usage line that follows


def test_torchscript_help_warns_that_files_are_code():
    r = run("et_torchscript", "--help")
    assert r.returncode == 0
    assert "TorchScript files are code" in r.stdout and "trust" in r.stdout


# --- et_executorch: model.pte through ExecuTorch's C++ Module --------------------------------

ET = "et_executorch"


def test_executorch_selftest_passes(pte_export):
    out, _ = pte_export
    r = run(ET, out / "model.pte", "--selftest", out / "golden", "--threads", 1)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["selftest"] == "pass" and summary["failed"] == 0
    assert summary["cases"] >= 5
    assert summary["max_abs_normalized"] == 0.0
    assert summary["max_abs_input.bin"] <= 1e-4
    assert summary["max_abs_png"] <= 1e-4
    assert "labels [eight, five, nine, seven, six]" in r.stderr  # from the program's own manifest
    assert "forward(float32 [1..16,3,32,32]) -> logits; executorch 1.5.1" in r.stderr
    assert "XNNPACK on 1 thread" in r.stderr


def test_executorch_selftest_catches_a_perturbed_pte(perturbed_export):
    """One weight changed before lowering: a valid program whose logits are not the golden ones.
    Its batches are 1..4, so the 5 cases run in two pieces."""
    r = run(ET, perturbed_export / "model.pte", "--selftest", perturbed_export / "golden")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["selftest"] == "fail"
    assert "forward(float32 [1..4,3,32,32])" in r.stderr and "FAIL" in r.stderr


def test_executorch_equals_python_runtime(pte_export, perturbed_export, images):
    """The golden PNGs and PNGs of other sizes: the C++ program's logits are the Python
    runtime's (PteClassifier) within the parity tolerance, on a 1..16 and a 1..4 program (whose
    batches of 16 run in pieces)."""
    from edgetransfer.parity import ATOL, RTOL
    from edgetransfer.runtime import PteClassifier

    out, _ = pte_export
    paths = sorted((out / "golden").glob("*.png")) + images["same"] + images["png"]
    assert len(paths) > 16
    for export in (out, perturbed_export):
        want = {p.path: p.logits for p in PteClassifier(export / "model.pte").predict(paths)}
        got = json_lines(run(ET, export / "model.pte", *paths))
        for path in map(str, paths):
            np.testing.assert_allclose(
                got[path]["logits"], want[path], atol=ATOL, rtol=RTOL, err_msg=path
            )


def test_executorch_without_batch_range_runs_padded(pte_export, tmp_path):
    """A program that does not declare its batches is run at the one its memory was planned
    for, the last piece padded: same logits."""
    out, _ = pte_export
    data = (out / "model.pte").read_bytes()
    fixed = tmp_path / "fixed.pte"
    fixed.write_bytes(data.replace(b"edgetransfer_batch", b"edgetransfer_batcX", 1))
    paths = sorted((out / "golden").glob("*.png"))
    r = run(ET, fixed, *paths)
    assert "forward(float32 [16,3,32,32])" in r.stderr
    got, want = json_lines(r), json_lines(run(ET, out / "model.pte", *paths))
    for path in map(str, paths):
        np.testing.assert_allclose(got[path]["logits"], want[path]["logits"], atol=1e-6, rtol=0)
