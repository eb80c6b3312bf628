"""Transfer strategies: what trains, what stays, what protects the source task."""

import pytest
import torch

from edgetransfer import strategies
from edgetransfer.adapt import AdaptConfig, adapt
from edgetransfer.backbones import block_modules
from edgetransfer.errors import ArchError, EdgeTransferError
from edgetransfer.export import ExportConfig, export
from edgetransfer.runs import checkpoint_path, load_run
from edgetransfer.verify import verify

from .conftest import DIGITS, SOURCE, backbone, digits_config


@pytest.mark.parametrize("strategy", ["last-n", "bias", "full", "distill"])
def test_every_strategy_runs_through_export_and_verify(strategy, digits_run, tmp_path):
    extra = {"teacher": digits_run} if strategy == "distill" else {}
    res = adapt(digits_config(tmp_path / "run", strategy=strategy, report=True, **extra))
    assert res.manifest.adapt["strategy"] == strategy
    assert (tmp_path / "run" / "report.html").is_file()
    assert res.manifest.metrics["val_top1"] >= 0.6  # trained, not chance (0.2)
    # the TorchScript ONNX exporter: the graph is simple_cnn's for every strategy, and the
    # dynamo export of it is covered by tests/test_export.py; here the trained weights matter
    exp = ExportConfig(
        run_dir=tmp_path / "run", out=tmp_path / "exp", raw=False, exporter="torchscript"
    )
    export(exp)
    report = verify(tmp_path / "exp", DIGITS, write=False, trust_torchscript=True)
    assert report.passed, report.table()
    assert not checkpoint_path(tmp_path / "run").exists()  # removed after success


def test_what_trains_per_strategy():
    spec, features = backbone()
    blocks = block_modules(spec, features, None)
    n = {}
    for name in ("head", "last-n", "bias", "full"):
        plan = strategies.apply(strategies.StrategyConfig(name, unfreeze=1), features, blocks)
        n[name] = sum(p.numel() for p in plan.trainable)
        if name == "bias":
            assert all(p.ndim == 1 for p in plan.trainable)
        if name == "last-n":  # only fc1 (classifier.1), the last block
            assert {id(p) for p in plan.trainable} == {id(p) for p in blocks[-1].parameters()}
    assert n["head"] == 0 < n["bias"] < n["last-n"] < n["full"]
    assert n["full"] == sum(p.numel() for p in features.parameters())


def test_batchnorm_stays_frozen_unless_asked(tmp_path, colors):
    spec, features = backbone("tiny_test")
    bn = features.get_submodule("features.1")
    for flag in (False, True):
        plan = strategies.apply(
            strategies.StrategyConfig("full", train_bn=flag),
            features,
            block_modules(spec, features, None),
        )
        strategies.set_train_mode(features, plan)
        assert bn.training is flag and bn.weight.requires_grad is flag
    # through adapt: the running statistics of a frozen BatchNorm do not move
    res = adapt(
        AdaptConfig(
            data_dir=colors,
            out=tmp_path / "r",
            arch="tiny_test",
            weights="none",
            strategy="full",
            epochs=2,
            use_cache=False,
        )
    )
    model, _ = load_run(res.run_dir)
    assert torch.equal(model.features.get_submodule("features.1").running_mean, torch.zeros(8))


def test_truncate_makes_a_smaller_model_that_exports(tmp_path):
    res = adapt(digits_config(tmp_path / "run", truncate="features.5"))
    model, manifest = load_run(res.run_dir)
    assert manifest.adapt["truncate"] == "features.5"
    assert model.head.in_features == 64
    full = sum(p.numel() for p in load_run(tmp_path / "run")[0].parameters())
    assert full < 100_000  # fc1 (4096x128) is gone
    export(ExportConfig(run_dir=tmp_path / "run", out=tmp_path / "exp"))
    assert verify(tmp_path / "exp", DIGITS, write=False, trust_torchscript=True).passed


def test_truncate_unknown_block_lists_valid_ones(tmp_path):
    with pytest.raises(
        ArchError,
        match=r"cannot truncate simple_cnn at 'layer9'; choose one of: "
        r"features.0, features.1",
    ):
        adapt(digits_config(tmp_path / "run", truncate="layer9"))


def test_l2sp_keeps_backbone_near_source(tmp_path):
    from edgetransfer.backbones import load_source

    src = load_source("simple_cnn", str(SOURCE)).model.state_dict()

    def drift(run):
        model, _ = load_run(run)
        w = model.features.get_submodule("features.0").weight
        return (w - src["features.0.weight"]).pow(2).sum().item()

    # one epoch is enough to drift (about 15 without L2-SP, 0.4 with it)
    kw = dict(strategy="full", lr=3e-2, backbone_lr_mult=1.0, epochs=1)
    adapt(digits_config(tmp_path / "a", **kw))
    adapt(digits_config(tmp_path / "b", l2sp=100.0, **kw))
    assert drift(tmp_path / "b") < 0.5 * drift(tmp_path / "a")


def test_distill_needs_a_matching_teacher(tmp_path, colors):
    with pytest.raises(EdgeTransferError, match="--strategy distill needs --teacher RUN_DIR"):
        adapt(digits_config(tmp_path / "r", strategy="distill"))
    teacher = adapt(
        AdaptConfig(
            data_dir=colors,
            out=tmp_path / "t",
            arch="tiny_test",
            weights="none",
            epochs=1,
            use_cache=False,
        )
    ).run_dir
    with pytest.raises(EdgeTransferError, match="teacher .* knows blue, green, red, but the data"):
        adapt(digits_config(tmp_path / "r", strategy="distill", teacher=teacher))


def test_head_with_augmented_views(tmp_path):
    res = adapt(digits_config(tmp_path / "run", views=3, epochs=4))
    assert res.manifest.adapt["views"] == 3 and res.manifest.adapt["augment"] == "light"
    assert res.manifest.metrics["val_top1"] >= 0.6


def test_balance_runs_and_is_recorded(tmp_path):
    res = adapt(digits_config(tmp_path / "run", balance=True))
    assert res.manifest.metrics["val_top1"] >= 0.6
    assert res.manifest.adapt["balance"] == "class-weighted loss"


SOURCE_DIGITS = DIGITS.parent / "digits04"


def test_keep_source_head_answers_both_tasks(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgetransfer.backbones import load_source
    from edgetransfer.data import eval_transform, load_image, scan

    res = adapt(digits_config(tmp_path / "run", keep_source_head=True, source_data=SOURCE_DIGITS))
    m = res.manifest
    assert m.io["source_output"] == "source_logits"
    assert m.source["labels"] == ["zero", "one", "two", "three", "four"]
    # the backbone is frozen: the source task cannot get worse
    assert m.metrics["source_top1_after"] == m.metrics["source_top1_before"] >= 0.9
    export(ExportConfig(run_dir=tmp_path / "run", out=tmp_path / "exp"))
    assert verify(tmp_path / "exp", DIGITS, write=False, trust_torchscript=True).passed

    ds = scan(SOURCE_DIGITS, val_fraction=0.0)
    tf = eval_transform(m.preprocessing)
    x = torch.stack([tf(load_image(s.path)) for s in ds.samples])
    source = load_source("simple_cnn", str(SOURCE)).model.eval()
    with torch.no_grad():
        want = source(x).numpy()
    sess = ort.InferenceSession(str(tmp_path / "exp" / "model.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["logits", "source_logits"]
    logits, source_logits = sess.run(None, {"input": x.numpy()})
    assert logits.shape == (len(x), 5)
    np.testing.assert_allclose(source_logits, want, rtol=0, atol=1e-5)
    raw = ort.InferenceSession(str(tmp_path / "exp" / "model.raw.onnx"))
    assert [o.name for o in raw.get_outputs()] == ["probs", "logits", "source_logits"]


def test_lwf_protects_the_source_task(tmp_path):
    # 3 epochs (digits_config's) forget as clearly as 10 did: 0.99 -> 0.91 plain, 0.99 with LwF
    kw = dict(strategy="full", source_data=SOURCE_DIGITS, patience=0)
    plain = adapt(digits_config(tmp_path / "plain", **kw)).manifest.metrics
    lwf = adapt(digits_config(tmp_path / "lwf", lwf=1.0, **kw)).manifest.metrics
    assert plain["source_top1_after"] < plain["source_top1_before"]  # fine-tuning forgets
    assert lwf["source_top1_after"] >= plain["source_top1_after"] + 0.03
    assert lwf["val_top1"] >= 0.8


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(lwf=1.0), "--lwf protects a backbone that trains; with --strategy head"),
        (dict(keep_source_head=True, weights="none"), "--keep-source-head needs source weights"),
        (
            dict(keep_source_head=True, truncate="features.5"),
            "--keep-source-head cannot be combined with --truncate",
        ),
    ],
)
def test_source_options_errors(tmp_path, kw, message):
    with pytest.raises(EdgeTransferError, match=message):
        adapt(digits_config(tmp_path / "run", **kw))


def test_source_data_with_unknown_classes(tmp_path):
    with pytest.raises(
        EdgeTransferError,
        match="--source-data has classes the source model does not know: eight, five",
    ):
        adapt(digits_config(tmp_path / "run", source_data=DIGITS))


def test_distill_from_a_teacher_with_a_source_head(tmp_path):
    teacher = adapt(digits_config(tmp_path / "t", keep_source_head=True, epochs=1)).run_dir
    res = adapt(digits_config(tmp_path / "s", strategy="distill", teacher=teacher, epochs=1))
    assert res.manifest.adapt["teacher"]["arch"] == "simple_cnn"


def test_fixed_size_arch_refuses_another_image_size(tmp_path):
    with pytest.raises(ArchError, match="this backbone cannot take 64x64 input"):
        adapt(digits_config(tmp_path / "r", image_size=64))


def test_augment_with_head_needs_views(tmp_path):
    with pytest.raises(EdgeTransferError, match="--augment light needs --views K"):
        adapt(digits_config(tmp_path / "r", augment="light"))
