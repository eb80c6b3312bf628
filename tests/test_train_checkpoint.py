"""train.fit's parts: the optimizer factory and the Checkpoint object (save, resume, remove)."""

import pytest
import torch

from edgetransfer.errors import EdgeTransferError
from edgetransfer.train import (
    Checkpoint,
    LoopState,
    TensorBatches,
    TrainConfig,
    fit,
    make_optimizer,
)


def _ce(logits, y, idx):
    return torch.nn.functional.cross_entropy(logits, y)


def _head_fit(**kw):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=g), torch.arange(16) % 2
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 2)
    cfg = TrainConfig(epochs=2, batch_size=8, patience=0)
    batches = TensorBatches(x, y, 8, 0)
    res = fit(head, [{"params": list(head.parameters())}], batches, batches, _ce, cfg, **kw)
    return head, res


def test_make_optimizer_per_solver():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    groups = [{"params": list(a.parameters()), "lr": 0.1}, {"params": list(b.parameters())}]
    adamw = make_optimizer(groups, TrainConfig(lr=0.5))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["lr"] for g in adamw.param_groups] == [0.1, 0.5]
    lbfgs = make_optimizer(groups, TrainConfig(solver="lbfgs"))
    assert isinstance(lbfgs, torch.optim.LBFGS) and len(lbfgs.param_groups) == 1
    assert len(lbfgs.param_groups[0]["params"]) == 4  # every tensor of both groups, one vector
    with pytest.raises(ValueError, match="unknown solver 'sgd'"):
        make_optimizer(groups, TrainConfig(solver="sgd"))


def test_resume_without_a_checkpoint_says_so():
    with pytest.raises(EdgeTransferError, match="nothing to resume: no checkpoint given; run wi"):
        _head_fit(resume=True)


def test_checkpoint_resumes_where_fit_left_off_and_removes_itself(tmp_path):
    ckpt = Checkpoint(tmp_path / "sub" / "run.checkpoint", "run-a")
    head, res = _head_fit(checkpoint=ckpt)
    again = torch.nn.Linear(4, 2)
    opt = make_optimizer([{"params": list(again.parameters())}], TrainConfig(epochs=2))
    state = ckpt.resume(again, opt, TrainConfig(epochs=2))
    assert isinstance(state, LoopState)
    assert (state.epoch, state.step, len(state.history)) == (3, 0, 2)
    assert state.history == res.history and state.best.best_epoch == res.best_epoch
    torch.testing.assert_close(state.best.state, head.state_dict(), rtol=0, atol=0)  # fit's pick
    with pytest.raises(EdgeTransferError, match="belongs to a different run"):
        Checkpoint(ckpt.path, "run-b").resume(again, opt, TrainConfig(epochs=2))
    ckpt.remove()
    ckpt.remove()  # already gone: nothing to do
    assert not ckpt.path.exists()
