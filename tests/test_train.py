import pytest
import torch

from edgetransfer.train import NonFiniteLossError, TrainConfig, train_head


def _blobs(n=60, d=12, k=3, seed=0, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    x = centers[y] + torch.randn(n, d, generator=g)
    return x * scale + 7.0, y  # far from standardised, as real features are


def test_head_learns_and_keeps_best_epoch():
    x, y = _blobs(n=120)
    x, y, vx, vy = x[:60], y[:60], x[60:], y[60:]
    head = torch.nn.Linear(12, 3)
    res = train_head(head, x, y, vx, vy, TrainConfig(epochs=8, batch_size=4))
    assert res.val_top1 > 0.95
    assert len(res.history) == 8
    assert res.history[res.best_epoch - 1]["val_top1"] == res.val_top1
    # the standardisation is folded into the head: raw features in, same answer out
    with torch.no_grad():
        assert (head(vx).argmax(1) == vy).float().mean().item() == pytest.approx(res.val_top1)


def test_training_is_deterministic():
    x, y = _blobs()
    outs = []
    for _ in range(2):
        torch.manual_seed(3)
        head = torch.nn.Linear(12, 3)
        train_head(head, x, y, x, y, TrainConfig(epochs=3, seed=5))
        outs.append(head.weight.detach().clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_non_finite_loss_stops_at_once():
    x, y = _blobs()
    head = torch.nn.Linear(12, 3)
    with pytest.raises(NonFiniteLossError, match="lower the learning rate"):
        train_head(head, x, y, x, y, TrainConfig(epochs=5, lr=1e30))
