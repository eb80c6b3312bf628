"""Transfer strategies and the training engine: what trains, what stays, resume, guards."""

import os
import signal

import pytest
import torch
from click.testing import CliRunner

from edgetransfer import strategies
from edgetransfer.adapt import AdaptConfig, adapt
from edgetransfer.backbones import block_modules, get_arch, split
from edgetransfer.cli import cli
from edgetransfer.errors import ArchError, EdgeTransferError
from edgetransfer.export import ExportConfig, export
from edgetransfer.runs import checkpoint_path, load_run
from edgetransfer.train import Interrupted, NonFiniteLossError, TensorBatches, TrainConfig, fit
from edgetransfer.verify import verify

from .conftest import DIGITS, SOURCE


def _cfg(out, **kw):
    base = dict(
        data_dir=DIGITS,
        out=out,
        arch="simple_cnn",
        weights=str(SOURCE),
        epochs=3,
        batch_size=16,
        use_cache=False,
    )
    base.update(kw)
    return AdaptConfig(**base)


def _backbone(arch="simple_cnn"):
    spec = get_arch(arch)
    features, _ = split(spec, spec.build(5))
    return spec, features


@pytest.mark.parametrize("strategy", ["last-n", "bias", "full", "distill"])
def test_every_strategy_runs_through_export_and_verify(strategy, digits_run, tmp_path):
    extra = {"teacher": digits_run} if strategy == "distill" else {}
    res = adapt(_cfg(tmp_path / "run", strategy=strategy, **extra))
    assert res.manifest.adapt["strategy"] == strategy
    assert res.manifest.metrics["val_top1"] >= 0.6  # trained, not chance (0.2)
    export(ExportConfig(run_dir=tmp_path / "run", out=tmp_path / "exp", raw=False))
    report = verify(tmp_path / "exp", DIGITS, write=False, trust_torchscript=True)
    assert report.passed, report.table()
    assert not checkpoint_path(tmp_path / "run").exists()  # removed after success


def test_what_trains_per_strategy():
    spec, features = _backbone()
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
    spec, features = _backbone("tiny_test")
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
    res = adapt(_cfg(tmp_path / "run", truncate="features.5"))
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
        adapt(_cfg(tmp_path / "run", truncate="layer9"))


def test_l2sp_keeps_backbone_near_source(tmp_path):
    source, _ = _backbone()
    from edgetransfer.backbones import load_source

    src = load_source("simple_cnn", str(SOURCE)).model.state_dict()

    def drift(run):
        model, _ = load_run(run)
        w = model.features.get_submodule("features.0").weight
        return (w - src["features.0.weight"]).pow(2).sum().item()

    adapt(_cfg(tmp_path / "a", strategy="full", lr=3e-2, backbone_lr_mult=1.0))
    adapt(_cfg(tmp_path / "b", strategy="full", lr=3e-2, backbone_lr_mult=1.0, l2sp=100.0))
    assert drift(tmp_path / "b") < 0.5 * drift(tmp_path / "a")


def _ce(logits, y, idx):
    return torch.nn.functional.cross_entropy(logits, y)


def _fit_head(x, y, val_y, cfg, views=1, loss=_ce, **kw):
    """A fresh Linear head (torch seed 0) fitted by train.fit on tensors, validated on x with
    labels `val_y` in one batch; returns (head, result)."""
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[-1], int(y.max()) + 1)
    val_x = x[0] if views > 1 else x
    res = fit(
        head,
        [{"params": list(head.parameters())}],
        TensorBatches(x, y, cfg.batch_size, 0, views=views),
        TensorBatches(val_x, val_y, len(val_y), 0, shuffle=False),
        loss,
        cfg,
        **kw,
    )
    return head, res


def test_accumulation_equals_a_bigger_batch():
    g = torch.Generator().manual_seed(0)
    # 20 samples: the last group is short (4 = one micro-batch) and must not be down-weighted
    x, y = torch.randn(20, 6, generator=g), torch.arange(20) % 3
    heads = []
    for batch, acc in ((8, 1), (4, 2)):
        cfg = TrainConfig(epochs=2, batch_size=batch, accumulate=acc, patience=0)
        head, _ = _fit_head(x, y, y, cfg)
        heads.append(head.weight.detach().clone())
    torch.testing.assert_close(heads[0], heads[1], rtol=1e-5, atol=1e-6)


def _objective_grad(head, x, y, l2):
    head.zero_grad()
    loss = torch.nn.functional.cross_entropy(head(x), y)
    loss = loss + 0.5 * l2 * sum(p.pow(2).sum() for p in head.parameters())
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in head.parameters()]).norm().item()


def test_lbfgs_head_reaches_the_regularised_optimum():
    # 60 vectors of 512 dimensions, 3 classes: the few-shot, high-dimensional case where
    # mini-batch AdamW stops far from the optimum of the same objective
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 512, generator=g) + 0.3 * torch.randn(3, 512, generator=g)[y]
    results = {}
    for solver in ("lbfgs", "adamw"):
        cfg = TrainConfig(epochs=10, batch_size=8, patience=0, solver=solver, weight_decay=1e-3)
        head, _ = _fit_head(x, y, y, cfg)
        results[solver] = _objective_grad(head, x, y, 1e-3)
    loss, grad = results["lbfgs"]
    assert grad < 1e-3, results
    assert loss < results["adamw"][0], results


def test_checkpoint_holds_only_what_trains(tmp_path):
    with pytest.raises(Interrupted):
        adapt(_cfg(tmp_path / "run", strategy="last-n", unfreeze=1, on_step=_interrupt_at((1, 1))))
    state = torch.load(checkpoint_path(tmp_path / "run"), weights_only=True)
    assert "features.features.0.weight" not in state["model"]  # frozen: not copied
    assert "head.weight" in state["model"] and "features.classifier.1.weight" in state["model"]


def _interrupt_at(step_to_stop):
    def on_step(epoch, step):
        if (epoch, step) == step_to_stop:
            os.kill(os.getpid(), signal.SIGINT)

    return on_step


@pytest.mark.parametrize(
    "strategy, solver, stop",
    [("head", "lbfgs", (2, 1)), ("head", "adamw", (2, 3)), ("last-n", "adamw", (2, 3))],
)
def test_sigint_then_resume_matches_uninterrupted(strategy, solver, stop, tmp_path):
    # L-BFGS makes one (multi-iteration) step per epoch; the others one per mini-batch
    kw = dict(strategy=strategy, epochs=4, unfreeze=1, patience=0, head_solver=solver)
    adapt(_cfg(tmp_path / "straight", **kw))
    with pytest.raises(Interrupted) as e:
        adapt(_cfg(tmp_path / "run", on_step=_interrupt_at(stop), **kw))
    assert e.value.exit_code == 130
    assert f"stopped in epoch 2 after step {stop[1]}" in str(e.value)
    assert "--resume" in str(e.value)
    assert not (tmp_path / "run").exists() and checkpoint_path(tmp_path / "run").is_file()
    res = adapt(_cfg(tmp_path / "run", resume=True, **kw))
    a, _ = load_run(tmp_path / "straight")
    b, _ = load_run(res.run_dir)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    straight = (tmp_path / "straight" / "history.json").read_text()
    assert (tmp_path / "run" / "history.json").read_text() == straight


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    with pytest.raises(Interrupted):
        adapt(_cfg(tmp_path / "run", on_step=_interrupt_at((1, 1))))
    with pytest.raises(EdgeTransferError, match="belongs to a different run"):
        adapt(_cfg(tmp_path / "run", resume=True, lr=0.5))
    with pytest.raises(EdgeTransferError, match="nothing to resume: no checkpoint"):
        adapt(_cfg(tmp_path / "other", resume=True))


def test_cli_interrupt_exit_code(tmp_path, monkeypatch):
    import edgetransfer.adapt as adapt_mod

    real = adapt_mod.AdaptConfig

    def config(**kw):
        return real(**kw, on_step=_interrupt_at((1, 1)))

    monkeypatch.setattr(adapt_mod, "AdaptConfig", config)
    res = CliRunner().invoke(
        cli,
        [
            "adapt",
            str(DIGITS),
            "--arch",
            "simple_cnn",
            "--weights",
            str(SOURCE),
            "--out",
            str(tmp_path / "run"),
            "-q",
        ],
    )
    assert res.exit_code == 130
    assert res.output.startswith("Error: SIGINT: stopped in epoch 1 after step 1; checkpoint ")


def test_non_finite_loss_writes_nothing(tmp_path):
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        adapt(_cfg(tmp_path / "run", strategy="full", lr=1e9, backbone_lr_mult=1.0))
    assert not (tmp_path / "run").exists()


def test_max_memory_splits_the_batch_or_refuses(tmp_path):
    res = adapt(_cfg(tmp_path / "run", strategy="full", batch_size=16, max_memory=15))
    assert res.manifest.adapt["batch_size"] < 16
    assert res.manifest.adapt["batch_size"] * res.manifest.adapt["accumulate"] == 16
    assert res.memory["total_mib"] <= 15
    with pytest.raises(EdgeTransferError, match="over --max-memory 1;"):
        adapt(_cfg(tmp_path / "run2", strategy="full", max_memory=1))


def test_memory_estimate_orders_strategies():
    spec, features = _backbone("mobilenet_v3_small")
    from edgetransfer.backbones import Classifier

    model = Classifier(features, torch.nn.Linear(1024, 5))
    p = spec.preprocessing.with_size(96)
    est = {}
    for name in ("head", "bias", "last-n", "full"):
        plan = strategies.apply(
            strategies.StrategyConfig(name, unfreeze=2),
            features,
            block_modules(spec, features, None),
        )
        est[name] = strategies.estimate_memory(model, plan, 8, p, cached=name == "head")
    total = {k: v["total_mib"] for k, v in est.items()}
    assert total["head"] < total["bias"] < total["full"]
    assert total["last-n"] < total["full"]
    assert est["bias"]["activations_mib"] < est["full"]["activations_mib"]


def test_distill_needs_a_matching_teacher(tmp_path, colors):
    with pytest.raises(EdgeTransferError, match="--strategy distill needs --teacher RUN_DIR"):
        adapt(_cfg(tmp_path / "r", strategy="distill"))
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
        adapt(_cfg(tmp_path / "r", strategy="distill", teacher=teacher))


def test_head_with_augmented_views(tmp_path):
    res = adapt(_cfg(tmp_path / "run", views=3, epochs=4))
    assert res.manifest.adapt["views"] == 3 and res.manifest.adapt["augment"] == "light"
    assert res.manifest.metrics["val_top1"] >= 0.6


def test_balance_runs_and_is_recorded(tmp_path):
    res = adapt(_cfg(tmp_path / "run", balance=True))
    assert res.manifest.metrics["val_top1"] >= 0.6
    assert res.manifest.adapt["balance"] == "class-weighted loss"


SOURCE_DIGITS = DIGITS.parent / "digits04"


def test_keep_source_head_answers_both_tasks(tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgetransfer.backbones import load_source
    from edgetransfer.data import eval_transform, load_image, scan

    res = adapt(_cfg(tmp_path / "run", keep_source_head=True, source_data=SOURCE_DIGITS))
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
    kw = dict(strategy="full", epochs=10, source_data=SOURCE_DIGITS, patience=0)
    plain = adapt(_cfg(tmp_path / "plain", **kw)).manifest.metrics
    lwf = adapt(_cfg(tmp_path / "lwf", lwf=1.0, **kw)).manifest.metrics
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
        adapt(_cfg(tmp_path / "run", **kw))


def test_source_data_with_unknown_classes(tmp_path):
    with pytest.raises(
        EdgeTransferError,
        match="--source-data has classes the source model does not know: eight, five",
    ):
        adapt(_cfg(tmp_path / "run", source_data=DIGITS))


def test_memory_estimate_leaves_the_model_untouched():
    spec, features = _backbone("tiny_test")
    from edgetransfer.backbones import Classifier

    model = Classifier(features, torch.nn.Linear(16, 3))
    plan = strategies.apply(
        strategies.StrategyConfig("full", train_bn=True),
        features,
        block_modules(spec, features, None),
    )
    bn = features.get_submodule("features.1")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    model.eval()
    strategies.estimate_memory(model, plan, 8, spec.preprocessing, cached=False)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


def test_distill_from_a_teacher_with_a_source_head(tmp_path):
    teacher = adapt(_cfg(tmp_path / "t", keep_source_head=True)).run_dir
    res = adapt(_cfg(tmp_path / "s", strategy="distill", teacher=teacher))
    assert res.manifest.adapt["teacher"]["arch"] == "simple_cnn"


def test_fixed_size_arch_refuses_another_image_size(tmp_path):
    with pytest.raises(ArchError, match="this backbone cannot take 64x64 input"):
        adapt(_cfg(tmp_path / "r", image_size=64))


def test_augment_with_head_needs_views(tmp_path):
    with pytest.raises(EdgeTransferError, match="--augment light needs --views K"):
        adapt(_cfg(tmp_path / "r", augment="light"))


def test_resume_after_an_early_stop_trains_no_further(tmp_path):
    # killed after the early stop's checkpoint but before RUN_DIR was written: resuming must
    # return the same result, not train another epoch
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.arange(40) % 2
    noise = y[torch.randperm(40, generator=g)]
    cfg = TrainConfig(epochs=50, batch_size=8, patience=2)
    ckpt = tmp_path / "ckpt"

    def run(resume, on_step=None):
        return _fit_head(x, y, noise, cfg, checkpoint=ckpt, resume=resume, on_step=on_step)

    head, first = run(False)
    assert first.stopped_early and ckpt.is_file()

    def no_steps(epoch, step):
        raise AssertionError(f"trained again: epoch {epoch} step {step}")

    again, second = run(True, no_steps)
    assert second.stopped_early and second.best_epoch == first.best_epoch
    assert second.history == first.history
    torch.testing.assert_close(again.state_dict(), head.state_dict(), rtol=0, atol=0)


def _lbfgs_fit(x, y, views=1, weight=None, batch=8, loss=None, epochs=10):
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch, patience=0, solver="lbfgs", weight_decay=1e-3
    )
    loss = loss or (lambda lg, t, i: torch.nn.functional.cross_entropy(lg, t, weight=weight))
    return _fit_head(x, y, y, cfg, views=views, loss=loss)[0]


def test_lbfgs_solves_one_fixed_objective_with_views_and_class_weights():
    # class-weighted loss and 3 cached views: the optimum of the loss over every view of every
    # sample, whatever the batch size (a per-batch weighted mean would depend on the grouping)
    g = torch.Generator().manual_seed(1)
    y = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    views = torch.randn(3, 40, 16, generator=g) + torch.randn(3, 16, generator=g)[y]
    w = torch.tensor([0.2, 1.0, 1.5])
    heads = [_lbfgs_fit(views, y, views=3, weight=w, batch=b) for b in (8, 40)]
    torch.testing.assert_close(heads[0].state_dict(), heads[1].state_dict())
    flat, labels = views.reshape(120, 16), y.repeat(3)
    heads[0].zero_grad()
    obj = torch.nn.functional.cross_entropy(heads[0](flat), labels, weight=w)
    obj = obj + 0.5e-3 * sum(t.pow(2).sum() for t in heads[0].parameters())
    obj.backward()
    assert torch.cat([t.grad.flatten() for t in heads[0].parameters()]).norm() < 1e-3


def test_lbfgs_non_finite_loss_names_the_way_out():
    x, y = torch.randn(12, 4), torch.arange(12) % 3
    with pytest.raises(NonFiniteLossError, match="--head-solver adamw"):
        _lbfgs_fit(x, y, loss=lambda lg, t, i: lg.sum() * float("nan"), epochs=2)


def test_restore_state_refuses_a_copy_missing_trainable_weights():
    from edgetransfer.train import changing_state, restore_state

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    model.register_buffer("scratch", torch.zeros(1), persistent=False)  # not state: ignored
    state = changing_state(model)
    assert set(state) == {"1.weight", "1.bias"}
    restore_state(model, state)
    del state["1.weight"]
    with pytest.raises(EdgeTransferError, match=r"missing: 1\.weight"):
        restore_state(model, state)


def test_lbfgs_stops_once_converged():
    g = torch.Generator().manual_seed(2)
    y = torch.arange(30) % 3
    x = torch.randn(30, 8, generator=g) + 2 * torch.randn(3, 8, generator=g)[y]
    cfg = TrainConfig(epochs=100, batch_size=8, patience=0, solver="lbfgs", weight_decay=1e-2)
    head, res = _fit_head(x, y, y, cfg)
    assert res.stopped_early and len(res.history) < 100
    _, grad = _objective_grad(head, x, y, 1e-2)
    assert grad < 1e-4
