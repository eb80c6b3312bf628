"""Caches are checked, not trusted: a damaged or lying feature cache entry or cached ONNX
backbone is recomputed with one warning, an unwritable cache folder only costs the cache, and
verify catches a model whose head was trained on features its backbone does not produce."""

from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import helper, numpy_helper
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load, save

from edgetransfer import features
from edgetransfer.adapt import AdaptConfig, adapt
from edgetransfer.backbones import get_arch, load_source, split
from edgetransfer.cli import cli
from edgetransfer.data import scan
from edgetransfer.errors import EdgeTransferWarning
from edgetransfer.export import ExportConfig, export
from edgetransfer.fileio import sha256_file
from edgetransfer.parity import ATOL, RTOL
from edgetransfer.verify import verify

from .conftest import DIGITS, SOURCE, patch_everywhere


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of this test's own, and no rows remembered from an earlier extraction."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(path))
    features._recent.clear()
    yield path
    features._recent.clear()


def _adapt(out: Path, **kw) -> tuple[float, list[str]]:
    """(val top-1, the EdgeTransferWarnings) of adapting the digits source model to DIGITS."""
    features._recent.clear()  # a new run is a new process: nothing remembered in memory
    cfg = AdaptConfig(data_dir=DIGITS, out=out, arch="simple_cnn", weights=str(SOURCE), **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = adapt(cfg)
    told = [str(w.message) for w in caught if issubclass(w.category, EdgeTransferWarning)]
    return res.manifest.metrics["val_top1"], told


@pytest.fixture(scope="module")
def clean_top1(tmp_path_factory) -> float:
    """Val top-1 of a run that used no cache at all."""
    features._recent.clear()
    out = tmp_path_factory.mktemp("clean") / "run"
    cfg = AdaptConfig(
        data_dir=DIGITS, out=out, arch="simple_cnn", weights=str(SOURCE), use_cache=False
    )
    return adapt(cfg).manifest.metrics["val_top1"]


def _one_entry(cache: Path) -> Path:
    (entry,) = (cache / "features").glob("*.safetensors")
    return entry


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A cache folder holding the feature cache entry of a clean digits run."""
    folder = tmp_path_factory.mktemp("pristine") / "cache"
    before = os.environ["EDGETRANSFER_CACHE"]
    os.environ["EDGETRANSFER_CACHE"] = str(folder)
    try:
        _adapt(folder.parent / "run")
    finally:
        os.environ["EDGETRANSFER_CACHE"] = before
    return folder


def _rewrite(entry: Path, change, rehash: bool = True) -> None:
    """Replace the entry's vectors with change(vectors), as a careful attacker would (with
    `rehash`): every recorded shape, dtype and hash rewritten to match the new vectors."""
    with safe_open(str(entry), "pt") as f:
        meta = dict(f.metadata() or {})
    tensors = load(entry.read_bytes())
    vectors = change(tensors["vectors"]).contiguous()
    tensors["vectors"] = vectors
    if meta and rehash:
        meta["shape"] = json.dumps(list(vectors.shape))
        meta["dtype"] = str(vectors.dtype).removeprefix("torch.")
        meta["vectors_sha256"] = features._vectors_sha256(vectors.float())
    entry.write_bytes(save(tensors, metadata=meta or None))


def _permuted(v: torch.Tensor) -> torch.Tensor:
    return v[torch.randperm(len(v), generator=torch.Generator().manual_seed(0))]


TAMPER = {
    "zeroed": lambda e: _rewrite(e, torch.zeros_like),
    "shuffled rows": lambda e: _rewrite(e, _permuted),
    "a column fewer": lambda e: _rewrite(e, lambda v: v[:, :-1]),
    "a row fewer": lambda e: _rewrite(e, lambda v: v[:-1]),
    "float16": lambda e: _rewrite(e, lambda v: v.half()),
    "not finite": lambda e: _rewrite(e, lambda v: v.index_fill(0, torch.tensor([3]), np.nan)),
    "truncated": lambda e: e.write_bytes(e.read_bytes()[: e.stat().st_size // 2]),
    "garbage": lambda e: e.write_bytes(os.urandom(4096)),
    "zeroed, hash not rewritten": lambda e: _rewrite(e, torch.zeros_like, rehash=False),
}


@pytest.mark.parametrize("how", list(TAMPER))
def test_a_damaged_feature_cache_entry_is_recomputed_with_one_warning(
    how, cache, pristine, tmp_path, clean_top1
):
    shutil.copytree(pristine, cache)
    entry = _one_entry(cache)
    TAMPER[how](entry)
    top1, told = _adapt(tmp_path / "run")
    assert top1 == clean_top1  # the vectors were recomputed, not used
    assert len(told) == 1 and "feature cache entry" in told[0] and "recomputing" in told[0]
    assert "\n" not in told[0]
    # and written again, with the right vectors
    good = load(_one_entry(pristine).read_bytes())["vectors"]
    torch.testing.assert_close(load(entry.read_bytes())["vectors"], good, rtol=0, atol=0)


def test_a_checked_entry_is_used_without_a_warning(cache, pristine, tmp_path, clean_top1):
    shutil.copytree(pristine, cache)
    calls = []
    real = features._runner
    with pytest.MonkeyPatch.context() as m:
        m.setattr(features, "_runner", lambda *a, **k: calls.append(1) or real(*a, **k))
        top1, told = _adapt(tmp_path / "run")
    assert (top1, told, calls) == (clean_top1, [], [])  # served from the cache


def _row_gated(model: onnx.ModelProto) -> onnx.ModelProto:
    """The backbone, but every row after the second of each batch zeroed: it passes a check
    on the first two images of a batch and gives a useless model."""
    g = model.graph
    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}_real" if o == out else o for o in node.output]
    g.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], np.int64), "gate_0"),
            numpy_helper.from_array(np.array([2], np.int64), "gate_2"),
            numpy_helper.from_array(np.array([1 << 62], np.int64), "gate_end"),
            numpy_helper.from_array(np.array(0.0, np.float32), "gate_zero"),
        ]
    )
    g.node.extend(
        [
            helper.make_node("Slice", [f"{out}_real", "gate_0", "gate_2", "gate_0"], ["head"]),
            helper.make_node("Slice", [f"{out}_real", "gate_2", "gate_end", "gate_0"], ["tail"]),
            helper.make_node("Mul", ["tail", "gate_zero"], ["tail_zero"]),
            helper.make_node("Concat", ["head", "tail_zero"], [out], axis=0),
        ]
    )
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("record", ["record kept", "record rewritten"])
def test_a_cached_backbone_onnx_that_lies_is_not_trusted(record, cache, tmp_path, clean_top1):
    first, told = _adapt(tmp_path / "run1", backend="onnxruntime", use_cache=True)
    assert (first, told) == (clean_top1, [])
    (onnx_path,) = (cache / "backbones").glob("*.onnx")
    lie = _row_gated(onnx.load(str(onnx_path)))
    onnx.save(lie, str(onnx_path))
    if record == "record rewritten":  # whoever replaced the file also rewrote its sha256
        onnx_path.with_suffix(".sha256").write_text(sha256_file(onnx_path) + "\n")
    for entry in (cache / "features").glob("*"):
        entry.unlink()  # the features are recomputed with the cached backbone
    again, told = _adapt(tmp_path / "run2", backend="onnxruntime")
    assert again == clean_top1
    assert len(told) == 1 and "cached ONNX backbone" in told[0], told
    # replaced by a fresh export, and onnxruntime stays in use (nothing remembered as failed)
    assert not list((cache / "backbones").glob("*.failed"))
    assert onnx.load(str(onnx_path)).graph.output[0].name == "features"
    assert len(onnx.load(str(onnx_path)).graph.node) < len(lie.graph.node)
    third, told = _adapt(tmp_path / "run3", backend="onnxruntime", use_cache=False)
    assert (third, told) == (clean_top1, [])


def test_a_cached_backbone_with_a_scaled_weight_is_exported_again(cache):
    src = load_source("simple_cnn", str(SOURCE))
    backbone, _ = split(get_arch("simple_cnn"), src.model)
    pre, samples = src.preprocessing, scan(DIGITS).samples
    kw = dict(backbone_id="scaled", use_cache=False, backend="onnxruntime")
    eager = features.extract(backbone, samples, pre, **{**kw, "backend": "torch"})
    features.extract(backbone, samples, pre, **kw)  # exports and caches the backbone
    (onnx_path,) = (cache / "backbones").glob("*.onnx")
    model = onnx.load(str(onnx_path))
    weight = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(onnx_path))
    onnx_path.with_suffix(".sha256").write_text(sha256_file(onnx_path) + "\n")
    with pytest.warns(EdgeTransferWarning, match="cached ONNX backbone .* fresh export"):
        got = features.extract(backbone, samples, pre, **kw)
    assert got.backend == "onnxruntime"  # strict backend: not a failure, a replaced file
    np.testing.assert_allclose(got.vectors.numpy(), eager.vectors.numpy(), rtol=RTOL, atol=ATOL)


def test_a_cache_folder_that_is_not_a_folder_costs_only_the_cache(
    tmp_path, monkeypatch, clean_top1
):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(blocker))
    top1, told = _adapt(tmp_path / "run", backend="onnxruntime")
    assert top1 == clean_top1
    assert len(told) == 1 and "cannot be written" in told[0] and "without the cache" in told[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_costs_only_the_cache(cache, tmp_path, clean_top1):
    cache.mkdir()
    cache.chmod(0o500)
    try:
        top1, told = _adapt(tmp_path / "run", backend="onnxruntime")
    finally:
        cache.chmod(0o700)
    assert top1 == clean_top1
    assert len(told) == 1 and "cannot be written" in told[0]


def test_a_full_disk_under_the_cache_costs_only_the_cache(tmp_path, monkeypatch, clean_top1):
    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(features, "atomic_write_bytes", full)
    top1, told = _adapt(tmp_path / "run", backend="torch")
    assert top1 == clean_top1
    assert len(told) == 1 and "No space left on device" in told[0], told


def _lying_extract(monkeypatch):
    """adapt's features as a lying cache gives them: consistent with each other (train and
    validation alike, so adapt's own val top-1 looks fine) but not what the backbone makes."""
    real = features.extract

    def lying(*a, **k):
        out = real(*a, **{**k, "use_cache": False})
        d = out.vectors.shape[1]
        perm = torch.randperm(d, generator=torch.Generator().manual_seed(0))
        out.vectors = out.vectors[:, perm]
        return out

    patch_everywhere(monkeypatch, "edgetransfer.features.extract", lying)


def test_verify_fails_a_model_trained_on_features_its_backbone_does_not_make(
    tmp_path, monkeypatch, clean_top1
):
    _lying_extract(monkeypatch)
    res = adapt(
        AdaptConfig(data_dir=DIGITS, out=tmp_path / "run", weights=str(SOURCE), arch="simple_cnn")
    )
    monkeypatch.undo()
    assert res.manifest.metrics["val_top1"] >= clean_top1 - 0.05  # looks as good as a real run
    exp = tmp_path / "export"
    export(ExportConfig(run_dir=tmp_path / "run", out=exp, torchscript=False, raw=False))
    result = CliRunner().invoke(cli, ["verify", str(exp), "--data", str(DIGITS)])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: parity failed: eager top-1 on the run's 40 validation images")
    assert "adapt recorded" in last and "--no-cache" in last
    parity = json.loads((exp / "parity.json").read_text())
    check = parity["recorded_val_top1"]
    assert parity["passed"] is False and check["passed"] is False and check["checked"] is True
    assert check["eager"] < check["recorded"] - check["allowed"]
    # the exported files still agree with the eager model: only this check caught it
    assert all(r["passed"] for r in parity["runtimes"].values())


def test_verify_passes_an_honest_run_and_says_what_it_checked(digits_export, colors, tmp_path):
    report = verify(digits_export, DIGITS, write=False)
    check = report.to_dict()["recorded_val_top1"]
    assert report.passed and check["checked"] is True and check["passed"] is True
    assert check["eager"] == pytest.approx(check["recorded"], abs=check["allowed"])
    assert check["images"] == 40
    # a --limit subset of the run's split is judged too, with room for its sampling error
    sub = verify(digits_export, DIGITS, limit=10, write=False).to_dict()["recorded_val_top1"]
    assert sub["checked"] is True and sub["passed"] is True and sub["allowed"] > check["allowed"]
    # other data is not the run's split: said, not judged
    other = verify(digits_export, colors, write=False).to_dict()["recorded_val_top1"]
    assert other["checked"] is False and "labels" in other["reason"]
    copy = tmp_path / "digits"
    shutil.copytree(DIGITS, copy)
    next((copy / "five").iterdir()).unlink()
    other = verify(digits_export, copy, write=False).to_dict()["recorded_val_top1"]
    assert other["checked"] is False and "fingerprint" in other["reason"]


@pytest.mark.parametrize("augment", ["none", "light"])
def test_entries_of_drafted_jpegs_and_augmented_views_pass_their_own_check(augment, tmp_path):
    """The rows recomputed on a read go through the same decoding (JPEG draft scale) and the
    same seeded augmentation as the entry's: a correct entry is never a false alarm."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "jpegs" / c).mkdir(parents=True)
        for i in range(12):
            arr = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "jpegs" / c / f"{i}.jpg", quality=85)
    src = load_source("simple_cnn", str(SOURCE))
    backbone, _ = split(get_arch("simple_cnn"), src.model)
    samples = scan(tmp_path / "jpegs").samples
    kw = dict(backbone_id="jpegs", augment=augment, view=1, seed=3)
    first = features.extract(backbone, samples, src.preprocessing, **kw)
    for _ in range(3):  # other random rows each time
        features._recent.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("error", EdgeTransferWarning)
            again = features.extract(backbone, samples, src.preprocessing, **kw)
        assert again.backend == "cache"
        torch.testing.assert_close(again.vectors, first.vectors, rtol=0, atol=0)


def test_a_full_disk_while_exporting_the_backbone_is_not_remembered_as_its_fault(
    cache, monkeypatch
):
    import edgetransfer.onnxio as onnxio

    src = load_source("simple_cnn", str(SOURCE))
    backbone, _ = split(get_arch("simple_cnn"), src.model)
    pre, samples = src.preprocessing, scan(DIGITS).samples
    real = onnxio.torch_onnx_export

    def full(*a, **kw):  # an exporter wraps the OSError in its own type, as torch.onnx does
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("export failed while writing") from e

    monkeypatch.setattr(onnxio, "torch_onnx_export", full)
    kw = dict(backbone_id="full-disk", use_cache=False, backend="auto")
    with pytest.warns(EdgeTransferWarning):
        assert features.extract(backbone, samples, pre, **kw).backend == "torch"
    assert not list((cache / "backbones").glob("*.failed"))  # the disk, not the backbone
    monkeypatch.setattr(onnxio, "torch_onnx_export", real)
    assert features.extract(backbone, samples, pre, **kw).backend == "onnxruntime"


@pytest.mark.parametrize("recorded", [5, 82.5, -0.1, True, float("nan"), "0.9"])
def test_a_recorded_val_top1_that_is_not_a_share_is_not_checked(digits_run, recorded):
    from edgetransfer.manifest import read_manifest
    from edgetransfer.parity import recorded_check

    m = read_manifest(digits_run)
    m.metrics["val_top1"] = recorded
    check = recorded_check(m, scan(DIGITS), 0.9, 40, 40)
    assert not check.checked and check.passed and check.reason
