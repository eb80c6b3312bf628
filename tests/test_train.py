"""The training engine: fit, early stopping, accumulation, L-BFGS, checkpoints, resume, signals,
the memory plan."""

import os
import signal

import pytest
import torch
from click.testing import CliRunner

from edgetransfer import strategies
from edgetransfer.adapt import adapt
from edgetransfer.backbones import block_modules
from edgetransfer.cli import cli
from edgetransfer.errors import EdgeTransferError
from edgetransfer.runs import checkpoint_path, load_run
from edgetransfer.train import (
    Interrupted,
    NonFiniteLossError,
    Standardize,
    TensorBatches,
    TrainConfig,
    fit,
    fold,
)

from .conftest import DIGITS, SOURCE, backbone, digits_config


def _blobs(n=60, d=12, k=3, seed=0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    x = centers[y] + torch.randn(n, d, generator=g)
    return x * scale + 7.0, y  # far from standardised, as real features are


def _ce(logits, y, idx):
    return torch.nn.functional.cross_entropy(logits, y)


def _train(x, y, vx, vy, cfg):
    std = Standardize(x)
    head = torch.nn.Linear(x.shape[1], 3)
    model = torch.nn.Sequential(std, head)
    res = fit(
        model,
        [{"params": list(head.parameters())}],
        TensorBatches(x, y, cfg.batch_size, cfg.seed),
        TensorBatches(vx, vy, 64, 0, shuffle=False),
        _ce,
        cfg,
    )
    return std, head, res


def test_head_learns_keeps_best_epoch_and_folds():
    x, y = _blobs(n=120)
    x, y, vx, vy = x[:60], y[:60], x[60:], y[60:]
    std, head, res = _train(x, y, vx, vy, TrainConfig(epochs=8, batch_size=4, patience=0))
    assert res.val_top1 > 0.95
    assert len(res.history) == 8
    assert res.history[res.best_epoch - 1]["val_top1"] == res.val_top1
    with torch.no_grad():
        before = head(std(vx))
        fold(std, head)
        torch.testing.assert_close(head(vx), before, rtol=1e-4, atol=1e-4)


def test_early_stopping():
    x, y = _blobs()
    noise = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    # validation labels unrelated to the inputs: no lasting improvement, so it stops early
    _, _, res = _train(x, y, x, noise, TrainConfig(epochs=50, batch_size=8, patience=2))
    assert res.stopped_early and len(res.history) < 50
    assert len(res.history) - res.best_epoch == 2


def test_training_is_deterministic():
    x, y = _blobs()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        _, head, _ = _train(x, y, x, y, TrainConfig(epochs=3, seed=5))
        outs.append(head.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_non_finite_loss_stops_at_once():
    x, y = _blobs()
    steps = []
    head = torch.nn.Linear(12, 3)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        fit(
            head,
            [{"params": list(head.parameters())}],
            TensorBatches(x, y, 8, 0),
            TensorBatches(x, y, 8, 0, shuffle=False),
            _ce,
            TrainConfig(epochs=5, lr=1e30),
            on_step=lambda e, s: steps.append((e, s)),
        )
    assert len(steps) <= 2  # caught within a step of going non-finite


def test_dead_features_do_not_blow_up_the_folded_head():
    x, y = _blobs()
    x[:, 3] = 0.0  # a dead ReLU: constant on the training set
    std, head, _ = _train(x, y, x, y, TrainConfig(epochs=2))
    fold(std, head)
    assert head.weight.abs().max() < 1e3


def test_second_signal_exits_at_once():
    import os
    import signal

    from edgetransfer.train import Stop

    # Compared with the handler found at the start: a shell that starts the suite in the
    # background without job control (nohup ... &) makes SIGINT ignored, not default_int_handler.
    before = signal.getsignal(signal.SIGINT)
    with Stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM  # the first one only asks to stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_result_keeps_the_best_epochs_validation_logits_in_sample_order():
    x, y = _blobs(n=120)
    x, y, vx, vy = x[:60], y[:60], x[60:], y[60:]
    std, head, res = _train(x, y, vx, vy, TrainConfig(epochs=4, batch_size=4, patience=0))
    with torch.no_grad():
        want = head(std(vx))  # the model holds the best epoch's weights
    torch.testing.assert_close(res.val_logits, want)
    assert float((res.val_logits.argmax(1) == vy).float().mean()) == res.val_top1


def test_threads_apply_while_training_and_are_restored():
    x, y = _blobs()
    head = torch.nn.Linear(12, 3)
    before = torch.get_num_threads()
    seen = []
    fit(
        head,
        [{"params": list(head.parameters())}],
        TensorBatches(x, y, 8, 0),
        TensorBatches(x, y, 8, 0, shuffle=False),
        _ce,
        TrainConfig(epochs=1),
        threads=1,
        on_step=lambda e, s: seen.append(torch.get_num_threads()),
    )
    assert set(seen) == {1}
    assert torch.get_num_threads() == before


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
        adapt(
            digits_config(
                tmp_path / "run", strategy="last-n", unfreeze=1, on_step=_interrupt_at((1, 1))
            )
        )
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
def test_sigint_then_resume_matches_uninterrupted(strategy, solver, stop, tmp_path, colors):
    # L-BFGS makes one (multi-iteration) step per epoch; the others one per mini-batch (5 per
    # epoch: the 19 training images of `colors` in batches of 4, few images keep it quick)
    kw = dict(
        data_dir=colors,
        batch_size=4,
        strategy=strategy,
        epochs=4,
        unfreeze=1,
        patience=0,
        head_solver=solver,
    )
    adapt(digits_config(tmp_path / "straight", **kw))
    with pytest.raises(Interrupted) as e:
        adapt(digits_config(tmp_path / "run", on_step=_interrupt_at(stop), **kw))
    assert e.value.exit_code == 130
    assert f"stopped in epoch 2 after step {stop[1]}" in str(e.value)
    assert "--resume" in str(e.value)
    assert not (tmp_path / "run").exists() and checkpoint_path(tmp_path / "run").is_file()
    res = adapt(digits_config(tmp_path / "run", resume=True, **kw))
    a, _ = load_run(tmp_path / "straight")
    b, _ = load_run(res.run_dir)
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    straight = (tmp_path / "straight" / "history.json").read_text()
    assert (tmp_path / "run" / "history.json").read_text() == straight


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    with pytest.raises(Interrupted):
        adapt(digits_config(tmp_path / "run", on_step=_interrupt_at((1, 1))))
    with pytest.raises(EdgeTransferError, match="belongs to a different run"):
        adapt(digits_config(tmp_path / "run", resume=True, lr=0.5))
    with pytest.raises(EdgeTransferError, match="nothing to resume: no checkpoint"):
        adapt(digits_config(tmp_path / "other", resume=True))


def test_cli_interrupt_exit_code(tmp_path, monkeypatch):
    import edgetransfer.adapt as adapt_mod

    real = adapt_mod.AdaptConfig

    def config(**kw):
        return real(**kw, on_step=_interrupt_at((1, 1)))

    monkeypatch.setattr(adapt_mod, "AdaptConfig", config)
    # a cache of its own: a bundle another test kept would take the path without PyTorch
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(tmp_path / "cache"))
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
        adapt(digits_config(tmp_path / "run", strategy="full", lr=1e9, backbone_lr_mult=1.0))
    assert not (tmp_path / "run").exists()


def test_max_memory_splits_the_batch_or_refuses(tmp_path, colors):
    # The plan's arithmetic, on the model adapt builds for `colors`: the batch is halved until
    # the estimate fits, and no further.
    from edgetransfer.adapt import _fit_memory
    from edgetransfer.backbones import Classifier, feature_dim, load_source, split

    src = load_source("simple_cnn", str(SOURCE))
    features, _ = split(src.spec, src.model)
    model = Classifier(features, torch.nn.Linear(feature_dim(features, src.preprocessing), 3))
    plan = strategies.apply(
        strategies.StrategyConfig("full"), features, block_modules(src.spec, features, None)
    )
    kw = dict(data_dir=colors, strategy="full", batch_size=16, max_memory=15)
    tcfg, memory = _fit_memory(
        digits_config(tmp_path / "run", **kw), model, plan, src.preprocessing
    )
    assert tcfg.batch_size < 16 and tcfg.batch_size * tcfg.accumulate == 16
    assert memory["total_mib"] <= 15
    twice = strategies.estimate_memory(model, plan, 2 * tcfg.batch_size, src.preprocessing, False)
    assert twice["total_mib"] > 15
    # through adapt (one epoch on few images): that batch trains and is recorded
    res = adapt(digits_config(tmp_path / "run", epochs=1, **kw))
    assert res.manifest.adapt["batch_size"] == tcfg.batch_size
    assert res.manifest.adapt["accumulate"] == tcfg.accumulate
    assert res.memory == memory
    with pytest.raises(EdgeTransferError, match="over --max-memory 1;"):
        adapt(digits_config(tmp_path / "run2", data_dir=colors, strategy="full", max_memory=1))


def test_memory_estimate_orders_strategies():
    spec, features = backbone("mobilenet_v3_small")
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


def test_memory_estimate_leaves_the_model_untouched():
    spec, features = backbone("tiny_test")
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
