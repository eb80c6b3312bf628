"""The small-batch training loop for a linear head on cached features; keeps the best epoch."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from edgetransfer.errors import EdgeTransferError


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the head training loop."""

    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class TrainResult:
    """The best head (by validation accuracy, then loss), its epoch and the per-epoch history."""

    head_state: dict[str, torch.Tensor]
    best_epoch: int
    val_top1: float
    val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLossError(EdgeTransferError):
    """The loss became NaN or infinite; the learning rate is probably too high."""


@torch.no_grad()
def _evaluate(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    if len(y) == 0:
        return float("nan"), float("nan")
    logits = head(x)
    loss = nn.functional.cross_entropy(logits, y).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def train_head(
    head: nn.Linear,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = False,
) -> TrainResult:
    """Train `head` on feature vectors with mini-batches of `cfg.batch_size`.

    Features are standardised with the training set's mean and std while training (so one
    learning rate suits every backbone); the standardisation is then folded into the head's
    weights, which are left holding the best epoch.
    """
    from tqdm import tqdm

    mean = train_x.mean(0)
    std = train_x.std(0) if len(train_x) > 1 else torch.ones_like(mean)
    # Features (nearly) constant on the training set, e.g. dead ReLUs, keep scale 1: dividing by
    # a tiny std would fold huge weights into the head and ruin int8 quantisation later.
    std = torch.where(std > 1e-3 * std.mean() + 1e-8, std, torch.ones_like(std))
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std

    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best: TrainResult | None = None
    history = []
    bar = tqdm(range(1, cfg.epochs + 1), desc="epochs", disable=not progress, leave=False)
    for epoch in bar:
        head.train()
        order = torch.randperm(len(train_y), generator=gen)
        total, correct, seen = 0.0, 0, 0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = head(train_x[idx])
            loss = nn.functional.cross_entropy(logits, train_y[idx])
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} in epoch {epoch}; lower the learning rate "
                    "(nothing was written)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == train_y[idx]).sum())
            seen += len(idx)
        head.eval()
        val_loss, val_acc = _evaluate(head, val_x, val_y)
        row = {
            "epoch": epoch,
            "train_loss": total / seen,
            "train_top1": correct / seen,
            "val_loss": val_loss,
            "val_top1": val_acc,
        }
        history.append(row)
        bar.set_postfix(val_top1=f"{val_acc:.3f}")
        if best is None or (val_acc, -val_loss) > (best.val_top1, -best.val_loss):
            best = TrainResult(copy.deepcopy(head.state_dict()), epoch, val_acc, val_loss)
    assert best is not None, "epochs must be >= 1"
    with torch.no_grad():
        weight = best.head_state["weight"] / std
        bias = best.head_state["bias"] - weight @ mean
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    best.head_state = {k: v.clone() for k, v in head.state_dict().items()}
    best.history = history
    return best
