import pytest
import torch

from edgetransfer.train import (
    NonFiniteLossError,
    Standardize,
    TensorBatches,
    TrainConfig,
    fit,
    fold,
)


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
