"""Parity on a trained model: exports agree with eager, and a perturbed export is caught."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from edgetransfer.cli import cli
from edgetransfer.errors import ParityError
from edgetransfer.export import ExportConfig, export
from edgetransfer.parity import ATOL, RTOL
from edgetransfer.runs import load_run
from edgetransfer.runtime import OnnxClassifier
from edgetransfer.verify import verify

from .conftest import DIGITS


def test_trained_export_passes_verify(digits_export):
    report = verify(digits_export, DIGITS, write=False, trust_torchscript=True)
    assert report.passed, report.table()
    assert {r.runtime for r in report.runtimes} == {"torchscript", "onnxruntime", "raw"}
    assert report.images == 40
    assert report.eager_top1 >= 0.8  # really trained: the labels are learned, not constant


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dynamic_batch_matches_eager(digits_run, digits_export, tmp_path, exporter):
    if exporter == "dynamo":  # the session's export of the same run is dynamo's: no second one
        out = digits_export
        assert json.loads((out / "export.json").read_text())["exporter"] == "dynamo"
    else:
        out = tmp_path / exporter
        export(
            ExportConfig(
                run_dir=digits_run, out=out, torchscript=False, raw=False, exporter=exporter
            )
        )
    model, manifest = load_run(digits_run)
    ort_model = OnnxClassifier(out / "model.onnx")
    for batch in (1, 2, 8):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = model(x).numpy()
        got = ort_model.logits(x.numpy())
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def _perturb_onnx(path):
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    arr = numpy_helper.to_array(biggest).copy()
    arr.flat[::7] *= 1.05
    biggest.CopyFrom(numpy_helper.from_array(arr, biggest.name))
    onnx.save(model, str(path))


def test_verify_fails_on_perturbed_onnx(digits_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits_export, broken)
    _perturb_onnx(broken / "model.onnx")
    res = CliRunner().invoke(
        cli, ["verify", str(broken), "--data", str(DIGITS), "--trust-torchscript"]
    )
    assert res.exit_code == 1, res.output
    assert "onnxruntime" in res.output and "FAIL" in res.output
    assert "Error: parity failed: onnxruntime:" in res.output
    assert "torchscript:" not in res.output.split("Error:")[1]  # only the broken one is named
    import json

    parity = json.loads((broken / "parity.json").read_text())
    assert parity["passed"] is False and parity["runtimes"]["torchscript"]["passed"] is True


def test_verify_fails_on_perturbed_torchscript(digits_run, digits_export, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(digits_export, broken)
    model, manifest = load_run(digits_run)
    with torch.no_grad():
        model.head.bias.add_(0.01)
    from edgetransfer.export import export_torchscript

    export_torchscript(model, manifest, torch.randn(2, 3, 32, 32), broken / "model.pt")
    report = verify(broken, DIGITS, write=False, trust_torchscript=True)
    assert not report.passed
    failed = {r.runtime for r in report.runtimes if not r.passed}
    assert failed == {"torchscript"}
    with pytest.raises(ParityError, match="parity failed: torchscript: .* logits outside"):
        report.raise_for_failures()
