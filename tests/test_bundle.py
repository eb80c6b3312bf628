"""Backbone bundles and the device path: `backbone` (with torch) writes the bundle; adapt
--backbone, export, verify and predict then run without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file, save_file

from edgetransfer import config
from edgetransfer.manifest import ARTIFACTS, read_manifest
from tests.conftest import DIGITS, SOURCE, run

# Runs CLI commands in one fresh process, each as `edgetransfer ARGS`, with PyTorch hidden the
# way a core install lacks it (importing it raises ModuleNotFoundError, as in
# test_core_install.py), then lists any of its modules that got imported anyway: what a device
# without PyTorch runs.
DEVICE = """
import json, sys
TORCH = json.loads(sys.argv[2])
for name in TORCH:
    sys.modules[name] = None
from edgetransfer.cli import cli
for args in json.loads(sys.argv[1]):
    cli.main(args, prog_name="edgetransfer", standalone_mode=False)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in TORCH and sys.modules[m])))
"""


@pytest.fixture(scope="module")
def device_run(digits_bundle, tmp_path_factory) -> Path:
    """adapt --backbone -> export -> verify -> predict in a fresh process; returns the RUN_DIR
    after checking torch was never imported."""
    folder = tmp_path_factory.mktemp("device")
    run_dir = folder / "run"
    commands = [
        ["adapt", str(DIGITS), "--backbone", str(digits_bundle), "--out", str(run_dir), "-q"],
        ["export", str(run_dir)],
        ["verify", str(run_dir / "export"), "--data", str(DIGITS)],
        ["predict", str(run_dir / "export" / "model.onnx"), str(DIGITS / "six"), "--json"],
    ]
    out = subprocess.run(
        [sys.executable, "-c", DEVICE, json.dumps(commands), json.dumps(config.TORCH_MODULES)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", "torch was imported on the device path"
    assert "parity: PASS" in out.stdout
    return run_dir


def test_bundle_carries_its_manifest(digits_bundle):
    m = read_manifest(digits_bundle)
    assert m.arch == "simple_cnn" and m.adapt["kind"] == "backbone"
    assert m.adapt["feature_dim"] == 128
    assert m.adapt["checked"]["images"] == 16 and m.adapt["checked"]["max_abs_diff"] < 1e-3
    assert m.labels == ["zero", "one", "two", "three", "four"]  # the source head's classes
    assert m.source["weights"] == "file" and len(m.source["sha256"]) == 64
    graph = onnx.load(str(digits_bundle)).graph
    assert [o.name for o in graph.output] == ["features", "source_logits"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch


def test_device_run_matches_eager_pytorch(device_run):
    """The composed model.onnx equals the torch path's model on the same features: the source
    backbone in eager PyTorch with the numpy head loaded into its Linear."""
    import torch

    from edgetransfer.backbones import build_classifier, load_source, split
    from edgetransfer.golden import check_golden, load_golden
    from edgetransfer.runtime import OnnxClassifier

    export = device_run / "export"
    m = read_manifest(export)
    assert m.adapt["backbone"]["sha256"] and "val_top1" in m.metrics
    head = load_file(str(export / ARTIFACTS["head"]))
    src = load_source("simple_cnn", str(SOURCE))
    features, _ = split(src.spec, src.model)
    model = build_classifier("simple_cnn", len(m.labels))
    model.features = features
    model.head.weight.data = torch.from_numpy(head["head.weight"])
    model.head.bias.data = torch.from_numpy(head["head.bias"])
    _, cases = load_golden(export / "golden")
    x = np.concatenate([c[1] for c in cases])
    with torch.inference_mode():
        eager = model.eval()(torch.from_numpy(x)).numpy()
    onnx_logits = OnnxClassifier(export).logits(x)
    np.testing.assert_allclose(onnx_logits, eager, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([c[2] for c in cases]), eager, rtol=1e-3, atol=1e-4)
    assert check_golden(OnnxClassifier(export), export / "golden") == []


def test_export_dir_has_the_reference_and_the_contract(device_run):
    export = device_run / "export"
    names = {p.name for p in export.iterdir()}
    assert {"model.onnx", "model.raw.onnx", "backbone.onnx", "head.safetensors"} <= names
    assert {"golden", "labels.txt", "edgetransfer.json", "parity.json"} <= names
    raw = read_manifest(export / "model.raw.onnx")
    assert raw.io["input"] == "image" and raw.labels == read_manifest(export).labels
    graph = onnx.load(str(export / "model.raw.onnx")).graph
    assert [o.name for o in graph.output] == ["probs", "logits"]
    assert json.loads((export / "parity.json").read_text())["reference"] == "bundle"


def test_verify_fails_on_a_changed_head(device_run, tmp_path):
    """The reference is the bundle through head.safetensors: a model.onnx that no longer
    matches it fails."""
    import shutil

    export = tmp_path / "export"
    shutil.copytree(device_run / "export", export)
    head = load_file(str(export / ARTIFACTS["head"]))
    head["head.bias"] = head["head.bias"] + np.float32(0.5) * np.arange(len(head["head.bias"]))
    meta_src = export / ARTIFACTS["head"]
    from safetensors import safe_open

    with safe_open(str(meta_src), framework="numpy") as f:
        meta = f.metadata()
    save_file(head, str(meta_src), metadata=meta)
    res = run("verify", export, "--data", DIGITS)
    assert res.exit_code == 1
    assert "parity failed: onnxruntime:" in res.output


def test_export_refuses_a_changed_bundle(device_run, digits_bundle, tmp_path):
    info = json.loads((device_run / "run.json").read_text())
    assert Path(info["backbone"]) == digits_bundle.absolute()
    moved = tmp_path / "run"
    import shutil

    shutil.copytree(device_run, moved)
    other = tmp_path / "other.onnx"
    model = onnx.load(str(digits_bundle))
    model.doc_string = "changed"
    onnx.save(model, str(other))
    (moved / "run.json").write_text(json.dumps({**info, "backbone": str(other)}))
    res = run("export", moved, "--out", tmp_path / "e2")
    assert res.exit_code == 1
    assert "changed since this run was adapted on it" in res.output


def test_adapt_backbone_refuses_what_needs_torch(digits_bundle, device_run, tmp_path):
    res = run("adapt", DIGITS, "--backbone", digits_bundle, "--strategy", "last-n")
    assert res.exit_code == 2 and "only --strategy head runs" in res.output
    res = run("adapt", DIGITS, "--backbone", digits_bundle, "--arch", "resnet18")
    assert res.exit_code == 2 and "--arch does not apply with --backbone" in res.output
    classifier = device_run / "export" / "model.onnx"
    res = run("adapt", DIGITS, "--backbone", classifier, "--out", tmp_path / "r")
    assert res.exit_code == 1 and "is a classifier, not a backbone bundle" in res.output
    res = run("predict", device_run, DIGITS / "six")
    assert res.exit_code == 1 and "was adapted on a backbone bundle" in res.output
    res = run("predict", digits_bundle, DIGITS / "six")
    assert res.exit_code == 1 and "is a backbone bundle (it outputs features" in res.output
    res = run("info", digits_bundle)
    assert res.exit_code == 0 and "backbone bundle of simple_cnn: 128 features" in res.output


def test_backbone_force_rules(digits_bundle, tmp_path):
    res = run("backbone", "tiny_test", "--weights", "none", "--out", digits_bundle)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    notes = tmp_path / "notes.onnx"
    notes.write_text("mine")
    res = run("backbone", "tiny_test", "--weights", "none", "--out", notes, "--force")
    assert res.exit_code == 1 and "it is not a backbone bundle" in res.output
    assert notes.read_text() == "mine"


def test_backbone_image_size(tmp_path):
    """--image-size fixes the bundle's input size (its manifest and its ONNX input), and no
    temp file of the writer is left beside it."""
    out = tmp_path / "b.onnx"
    res = run("backbone", "tiny_test", "--weights", "none", "--image-size", "40", "--out", out)
    assert res.exit_code == 0, res.output
    assert list(read_manifest(out).preprocessing.input_size) == [40, 40]
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims[2:]] == [40, 40]
    assert [p.name for p in tmp_path.iterdir()] == ["b.onnx"]


def test_features_cache_is_used_and_checked(digits_bundle, tmp_path, monkeypatch):
    from edgetransfer.bundle import extract, open_bundle
    from edgetransfer.data import scan

    monkeypatch.setenv("EDGETRANSFER_CACHE", str(tmp_path / "cache"))
    bundle = open_bundle(digits_bundle)
    samples = scan(DIGITS).samples[:20]
    first = extract(bundle, samples)
    again = extract(bundle, samples)
    assert not first.cached and again.cached
    np.testing.assert_array_equal(first.vectors, again.vectors)
    entry = next((tmp_path / "cache" / "features").glob("*.safetensors"))
    t = load_file(str(entry))
    from safetensors import safe_open

    with safe_open(str(entry), framework="numpy") as f:
        meta = f.metadata()
    t["vectors"] = t["vectors"][::-1].copy()  # shuffled rows, their sha256 recorded anew
    meta["vectors_sha256"] = __import__("hashlib").sha256(t["vectors"].tobytes()).hexdigest()
    save_file(t, str(entry), metadata=meta)
    with pytest.warns(UserWarning, match="not used .*differ from the bundle's"):
        third = extract(bundle, samples)
    assert not third.cached
    np.testing.assert_array_equal(first.vectors, third.vectors)


def test_torch_formats_of_a_device_run_where_torch_is(device_run, tmp_path):
    """The eager model of a run adapted on a bundle: the bundle's weights (sha256-checked) and
    the head; from it the PyTorch path writes what only it can (TorchScript here), and verify
    compares every file with eager PyTorch."""
    res = run("export", device_run, "--torchscript", "--out", tmp_path / "e1")
    assert (
        res.exit_code == 1 and "pass them with export's or verify's --eager-weights" in res.output
    )
    res = run(
        "export", device_run, "--torchscript", "--eager-weights", "none", "--out", tmp_path / "e0"
    )
    assert res.exit_code == 1 and "not the weights the bundle was made from" in res.output
    out = tmp_path / "e2"
    res = run("export", device_run, "--torchscript", "--eager-weights", SOURCE, "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.glob("model.*")) == ["model.pt", "model.safetensors"]
    res = run("verify", out, "--data", DIGITS, "--trust-torchscript")
    assert res.exit_code == 0, res.output
    assert "reference: eager PyTorch" in res.output and "\ntorchscript " in res.output
    res = run("export", DIGITS, "--eager-weights", SOURCE)  # not a bundle run
    assert res.exit_code == 2


def test_verify_also_against_eager_where_torch_is(device_run):
    res = run("verify", device_run / "export", "--data", DIGITS, "--eager-weights", SOURCE)
    assert res.exit_code == 0, res.output
    assert "\neager " in res.output and "parity: PASS" in res.output
    res = run("verify", device_run / "export", "--data", DIGITS, "--eager-weights", "none")
    assert res.exit_code == 1 and "not the weights the bundle was made from" in res.output


def test_device_head_matches_the_torch_paths(device_run, digits_run):
    """The same data, source weights and head objective: the torch path (digits_run) and the
    device path reach the same validation result."""
    device, torch_path = read_manifest(device_run), read_manifest(digits_run)
    assert device.labels == torch_path.labels
    assert device.metrics["val_top1"] == torch_path.metrics["val_top1"]
    assert abs(device.metrics["val_loss"] - torch_path.metrics["val_loss"]) < 1e-3
    assert device.data["fingerprint"] == torch_path.data["fingerprint"]  # the same split


def test_the_shipped_bundle_is_the_shipped_source_model():
    from edgetransfer.demo import SOURCE_BUNDLE, source_model
    from edgetransfer.fileio import sha256_file

    m = read_manifest(source_model(SOURCE_BUNDLE))
    assert m.adapt["kind"] == "backbone" and m.arch == "simple_cnn"
    assert m.source["sha256"] == sha256_file(source_model())
    assert m.labels == read_manifest(source_model()).labels


def test_demo_without_torch(tmp_path):
    """A core install's demo: PyTorch hidden, the shipped bundle adapted, exported, verified."""
    commands = [["demo", str(tmp_path / "demo")]]
    out = subprocess.run(
        [sys.executable, "-c", DEVICE, json.dumps(commands), json.dumps(config.TORCH_MODULES)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[]" and lines[-2] == "parity: PASS"
    assert "PyTorch is not installed: the device path" in out.stdout
    assert (tmp_path / "demo" / "export" / "backbone.onnx").is_file()
