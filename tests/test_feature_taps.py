"""adapt --features: what the frozen head sees (penultimate vector, pooled last stages, both)."""

import pytest
import torch

from edgetransfer import config
from edgetransfer.adapt import adapt
from edgetransfer.backbones import ARCHS, Taps, feature_taps, get_arch, tap
from edgetransfer.errors import ArchError, EdgeTransferError
from edgetransfer.export import ExportConfig, export
from edgetransfer.fileio import cache_dir
from edgetransfer.runs import load_run
from edgetransfer.verify import verify

from .conftest import DIGITS, backbone, digits_config, run


def test_stages_pool_the_tapped_outputs_and_concat_ends_with_the_penultimate():
    torch.manual_seed(0)
    spec, features = backbone("tiny_test")
    features.eval()
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        conv = features.get_submodule("features.0")(x)
        relu = features.get_submodule("features.2")(features.get_submodule("features.1")(conv))
        want = torch.cat([conv.mean((2, 3)), relu.mean((2, 3))], 1)
        taps = feature_taps(spec, "stages")
        assert taps == ("features.0", "features.2")
        stages = tap(spec, features, "stages", taps).eval()
        concat = tap(spec, features, "concat", taps).eval()
        torch.testing.assert_close(stages(x), want)
        torch.testing.assert_close(concat(x), torch.cat([want, features(x)], 1))
    assert tap(spec, features, "penultimate", ()) is features
    # "stages" runs the trunk only as far as its last tap
    assert isinstance(stages, Taps) and stages.neck is None


def test_every_stage_and_after_pool_name_is_in_its_architecture():
    """The specs' names, checked without building the networks (that costs seconds each)."""
    for spec in ARCHS.values():
        assert set(spec.stages) <= set(spec.trunk), spec.name
        order = [spec.trunk.index(s) for s in spec.stages]
        assert order == sorted(order), spec.name
    assert config.FEATURE_STAGES >= 1


def test_unsupported_choices_are_one_line_errors():
    with pytest.raises(ArchError, match="simple_cnn's head does not sit on a pooled trunk"):
        feature_taps(get_arch("simple_cnn"), "concat")
    with pytest.raises(ArchError, match=r"unknown --features 'pixels'; choose one of: penult"):
        feature_taps(get_arch("simple_cnn"), "pixels")
    spec, features = backbone("tiny_test")
    with pytest.raises(ArchError, match="cannot tap tiny_test at layer9; choose from: features.0"):
        tap(spec, features, "stages", ("layer9",))


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(strategy="full"), "--features stages is for --strategy head"),
        (dict(truncate="features.5"), "--features stages cannot be combined with --truncate"),
        (dict(keep_source_head=True), "--keep-source-head cannot be combined with --features"),
    ],
)
def test_features_refuses_what_it_cannot_do(tmp_path, kw, message):
    with pytest.raises(EdgeTransferError, match=message):
        adapt(digits_config(tmp_path / "run", features="stages", **kw))


def test_cli_error_is_one_line(tmp_path):
    res = run("adapt", DIGITS, "--arch", "simple_cnn", "--weights", "none", "--features", "concat",
              "--out", tmp_path / "run")  # fmt: skip
    assert res.exit_code != 0
    assert res.output.strip().splitlines()[-1] == (
        "Error: simple_cnn's head does not sit on a pooled trunk: --features concat is not "
        "available (stages is)"
    )


def test_stages_run_records_rebuilds_caches_apart_and_exports(tmp_path, monkeypatch):
    """The manifest names the taps, load_run rebuilds the same model, the feature cache keeps
    the two choices apart, and every exported artifact answers like eager PyTorch."""
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(tmp_path / "cache"))  # not another test's
    entries = cache_dir() / "features"
    before = set(entries.glob("*.safetensors")) if entries.is_dir() else set()
    pen = adapt(digits_config(tmp_path / "pen", use_cache=True))
    mid = set(entries.glob("*.safetensors"))
    res = adapt(digits_config(tmp_path / "run", features="stages", use_cache=True))
    after = set(entries.glob("*.safetensors"))
    assert len(mid - before) == 1 and len(after - mid) == 1  # a new entry, not the first one's
    m = res.manifest
    assert (m.adapt["features"], m.adapt["taps"]) == ("stages", ["features.2", "features.5"])
    assert "features" not in pen.manifest.adapt  # the default leaves the manifest as it was
    model, _ = load_run(res.run_dir)
    assert model.head.in_features == 32 + 64  # pooled outputs of both max-pools
    assert m.metrics["val_top1"] >= 0.8
    # the TorchScript ONNX exporter: dynamo's costs ~10x more here, and test_export.py covers it
    export(ExportConfig(run_dir=res.run_dir, out=tmp_path / "exp", exporter="torchscript"))
    report = verify(tmp_path / "exp", DIGITS, write=False, trust_torchscript=True)
    assert report.passed
    assert {"onnxruntime", "raw", "torchscript"} <= {r.runtime for r in report.runtimes}
