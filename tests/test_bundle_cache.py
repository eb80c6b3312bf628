"""The bundle a head run keeps in the cache: a later run of the same architecture and weights
adapts on it without importing torch, and anything changed (bundle, index, weights) is a miss
that takes the PyTorch path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetransfer import bundlecache, config
from edgetransfer.manifest import read_manifest
from edgetransfer.runs import weights_id
from tests.conftest import DIGITS, SOURCE, run
from tests.test_bundle import DEVICE


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A private cache and a copy of the digits weights; the first run (PyTorch) keeps the
    bundle: (cache folder, weights file, RUN_DIR)."""
    folder = tmp_path_factory.mktemp("bundle_cache")
    weights = folder / "digits.safetensors"
    shutil.copyfile(SOURCE, weights)
    old = os.environ["EDGETRANSFER_CACHE"]
    os.environ["EDGETRANSFER_CACHE"] = str(folder / "cache")
    try:
        res = run(*_adapt(weights, folder / "r1"))
        assert res.exit_code == 0, res.output
        assert "kept the backbone in the cache as a bundle" in res.output
        assert (folder / "r1" / "model.safetensors").is_file()
        yield folder / "cache", weights, folder / "r1"
    finally:
        os.environ["EDGETRANSFER_CACHE"] = old


def _adapt(weights, out, *extra):
    return ["adapt", DIGITS, "--arch", "simple_cnn", "--weights", weights, "--out", out, "-q",
            "--no-report", *extra]  # fmt: skip


def _without_torch(commands: list[list[str]], cache: Path) -> subprocess.CompletedProcess:
    """CLI commands in one process where PyTorch cannot be imported (tests/test_bundle.py's
    DEVICE); its last stdout line lists the torch modules that got imported anyway."""
    return subprocess.run(
        [sys.executable, "-c", DEVICE, json.dumps(commands), json.dumps(config.TORCH_MODULES)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, "EDGETRANSFER_CACHE": str(cache)},
    )


def _lookup(weights):
    return bundlecache.lookup("simple_cnn", str(weights), None)


def test_a_second_run_adapts_on_the_cached_bundle_without_torch(first, tmp_path):
    cache, weights, r1 = first
    r2 = tmp_path / "r2"
    commands = [
        [str(a) for a in _adapt(weights, r2)],
        ["export", str(r2)],
        ["verify", str(r2 / "export"), "--data", str(DIGITS)],
    ]
    out = _without_torch(commands, cache)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", "torch was imported"
    assert "backbone from the cached bundle" in out.stdout and "parity: PASS" in out.stdout
    assert not (r2 / "model.safetensors").exists() and (r2 / "head.safetensors").is_file()
    m1, m2 = read_manifest(r1), read_manifest(r2)
    assert m2.metrics["val_top1"] == m1.metrics["val_top1"]
    assert m2.data["fingerprint"] == m1.data["fingerprint"]
    assert m2.source["sha256"] == m1.source["sha256"]
    assert json.loads((r2 / "run.json").read_text())["weights"] == str(weights)

    # the full install keeps every format: the run's eager model comes from the recorded
    # weights and its head, and the PyTorch path exports and verifies it
    res = run("export", r2, "--torchscript", "--out", tmp_path / "ts")
    assert res.exit_code == 0, res.output
    res = run("verify", tmp_path / "ts", "--data", DIGITS, "--trust-torchscript")
    assert res.exit_code == 0, res.output
    assert "reference: eager PyTorch" in res.output and "\ntorchscript " in res.output
    # ... and by default, as a PyTorch run: model.pt too; predict runs on the RUN_DIR; its
    # weights have an identity (--teacher, --resume) distinct from the first run's
    res = run("export", r2, "--out", tmp_path / "all")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "all" / "model.pt").is_file()
    res = run("predict", r2, DIGITS / "six" / "031.png")
    assert res.exit_code == 0 and ": six " in res.output, res.output
    assert len(weights_id(r2)) == 64 and weights_id(r2) != weights_id(r1)

    # the run keeps its own copy of the bundle: replacing or deleting the cache entry later
    # does not break it (here without torch)
    assert json.loads((r2 / "run.json").read_text())["backbone"] == "backbone.onnx"
    cached = _lookup(weights).path
    assert (r2 / "backbone.onnx").read_bytes() == cached.read_bytes()
    aside = cached.with_name("aside")
    cached.rename(aside)
    try:
        commands = [["export", str(r2), "--out", str(tmp_path / "e3")],
                    ["verify", str(tmp_path / "e3"), "--data", str(DIGITS)]]  # fmt: skip
        out = _without_torch(commands, cache)
    finally:
        aside.rename(cached)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "parity: PASS" in out.stdout and out.stdout.strip().splitlines()[-1] == "[]"


def test_a_changed_bundle_index_or_weights_is_a_miss(first, tmp_path, monkeypatch):
    cache, weights, _ = first
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(cache))
    hit = _lookup(weights)
    assert hit is not None
    index = hit.path.with_suffix(".json")
    saved = {p: p.read_bytes() for p in (hit.path, index, weights)}
    try:
        with hit.path.open("ab") as f:
            f.write(b"\0")
        with pytest.warns(UserWarning, match="the bundle changed after it was written"):
            assert _lookup(weights) is None
        hit.path.write_bytes(saved[hit.path])

        entry = json.loads(saved[index])
        index.write_text(json.dumps({**entry, "weights_sha256": "0" * 64}))
        with pytest.warns(UserWarning, match="changed since the bundle was made"):
            assert _lookup(weights) is None
        index.write_text("{not json")
        with pytest.warns(UserWarning, match="not used"):
            assert _lookup(weights) is None
        index.write_text("[]")
        with pytest.warns(UserWarning, match="not a JSON object"):
            assert _lookup(weights) is None
        index.write_bytes(saved[index])

        with weights.open("ab") as f:
            f.write(b" ")
        with pytest.warns(UserWarning, match="changed since the bundle was made"):
            assert _lookup(weights) is None
        weights.write_bytes(saved[weights])
        assert _lookup(weights) == hit
        assert bundlecache.lookup("simple_cnn", str(weights), 64) is None  # another size

        # a miss runs PyTorch and keeps the bundle anew
        with hit.path.open("ab") as f:
            f.write(b"\0")
        res = run(*_adapt(weights, tmp_path / "r3", "--epochs", "2"))
        assert res.exit_code == 0, res.output
        assert "not used (the bundle changed" in res.output
        assert (tmp_path / "r3" / "model.safetensors").is_file()
        assert _lookup(weights) is not None
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def test_backend_torch_opts_out(first, tmp_path, monkeypatch):
    cache, weights, _ = first
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(cache))
    res = run(*_adapt(weights, tmp_path / "r", "--backend", "torch", "--epochs", "1"))
    assert res.exit_code == 0, res.output
    assert "cached bundle" not in res.output
    assert (tmp_path / "r" / "model.safetensors").is_file()


def test_every_adapt_option_says_whether_a_bundle_run_takes_it():
    """A new adapt option must be one the bundle path takes (BundleAdaptConfig) or one that
    needs PyTorch (cli._NOT_WITH_BUNDLE, which sends a run past the cached bundle): otherwise a
    run on the cached bundle would silently ignore it."""
    import dataclasses

    from edgetransfer.cli import _NOT_WITH_BUNDLE, cli
    from edgetransfer.device import BundleAdaptConfig

    names = {p.name for p in cli.commands["adapt"].params}
    takes = {f.name for f in dataclasses.fields(BundleAdaptConfig)}
    # these choose the path (strategy/budget: not head; no_cache; --backbone) or the output
    chooses = {"strategy", "budget", "no_cache", "backbone_bundle", "as_json", "quiet"}
    assert names - set(_NOT_WITH_BUNDLE) - takes - chooses == set()
    assert set(_NOT_WITH_BUNDLE) <= names  # no stale entries
