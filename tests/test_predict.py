"""predict on every backend (.onnx, .pt, EXPORT_DIR, RUN_DIR), providers, and torch-free ONNX."""

import json
import subprocess
import sys

import numpy as np
import onnxruntime
import pytest

from edgetransfer.runtime import load_predictor

from .conftest import DIGITS, run

SIXES = sorted((DIGITS / "six").glob("*.png"))[:4]


def test_predict_table_is_aligned(digits_export):
    res = run("predict", digits_export / "model.onnx", *SIXES[:2], "--topk", "2")
    assert res.exit_code == 0, res.output
    rows = res.output.splitlines()
    assert len(rows) == 2
    # the label columns line up: same position in every row
    assert len({r.index(" six ") for r in rows}) == 1
    assert rows[0].startswith(f"{SIXES[0]}:")


@pytest.mark.parametrize("model", ["model.onnx", "model.pt", "model.raw.onnx", ".", "RUN"])
def test_every_backend_gives_the_same_answer(digits_export, digits_run, model):
    path = digits_run if model == "RUN" else digits_export / model
    res = run("predict", path, *SIXES, "--json", "--topk", "5")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]  # stdout is pure JSON Lines
    assert [r["path"] for r in rows] == [str(p) for p in SIXES]
    assert all(len(r["topk"]) == 5 and r["topk"][0]["label"] == "six" for r in rows)
    ref = load_predictor(digits_export / "model.onnx").predict(SIXES, topk=5)
    for r, p in zip(rows, ref, strict=True):
        np.testing.assert_allclose(
            [t["prob"] for t in r["topk"]], [pr for _, pr in p.topk], atol=1e-5
        )


def test_backends_are_chosen_by_path(digits_export, digits_run):
    assert load_predictor(digits_export).backend == "onnxruntime"
    assert load_predictor(digits_export / "model.pt").backend == "torchscript"
    assert load_predictor(digits_run).backend == "eager"
    assert load_predictor(digits_export / "model.raw.onnx", threads=1).raw


def test_missing_provider_is_a_clear_error(digits_export, monkeypatch):
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    res = run("predict", digits_export / "model.onnx", SIXES[0], "--provider", "tensorrt")
    assert res.exit_code == 1
    assert res.output == (
        "Error: provider tensorrt (TensorrtExecutionProvider) is not available in this "
        "onnxruntime installation; available: cpu\n"
    )


def test_provider_needs_an_onnx_model(digits_run):
    res = run("predict", digits_run, SIXES[0], "--provider", "cuda")
    assert res.exit_code == 1
    assert res.output == (
        "Error: --provider cuda applies to ONNX models; a RUN_DIR runs on PyTorch (CPU)\n"
    )


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: d,
            "Error: {d} has neither model.onnx nor model.safetensors; pass an "
            "EXPORT_DIR, a RUN_DIR or a model file\n",
        ),
        (
            lambda d: (d / "m.txt").write_text("x") and d / "m.txt",
            "Error: m.txt is not a model: expected .onnx, .pte, .pt, .pt2, an EXPORT_DIR or a "
            "RUN_DIR\n",
        ),
        (
            lambda d: (d / "m.onnx").write_bytes(b"garbage") and d / "m.onnx",
            "Error: m.onnx is not a readable ONNX model: Error parsing message\n",
        ),
    ],
)
def test_bad_models_are_one_line_errors(tmp_path, make, message):
    res = run("predict", make(tmp_path), SIXES[0])
    assert res.exit_code == 1
    assert res.output.startswith(message.format(d=tmp_path).rstrip("\n"))
    assert "Traceback" not in res.output and res.output.count("\n") == 1


def test_no_images_is_an_error(digits_export, tmp_path):
    res = run("predict", digits_export, str(tmp_path / "*.jpg"))
    assert res.exit_code == 1
    assert res.output == f"Error: {tmp_path / '*.jpg'}: no such file, folder or matching pattern\n"


def test_predict_onnx_does_not_import_torch(digits_export):
    code = (
        "import sys\nfrom edgetransfer.cli import cli\n"
        f"sys.argv = ['edgetransfer', 'predict', {str(digits_export / 'model.onnx')!r}, "
        f"{str(SIXES[0])!r}, '--json']\n"
        "try:\n    cli()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported by predict on .onnx'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["topk"][0]["label"] == "six"
