"""Which parameters train for each transfer strategy, and the losses that guide them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetransfer import config
from edgetransfer.errors import EdgeTransferError
from edgetransfer.train import LBFGS_HISTORY

STRATEGIES = config.STRATEGIES  # each one is a branch of apply() (tested)
# forward working set (3x the largest layer output) x 2 passes (training and validation)
WORKSPACE_FACTOR = 6
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class StrategyConfig:
    """How the backbone takes part in training.

    Attributes:
        strategy: head | last-n | bias | full | distill.
        unfreeze: blocks that train with ``last-n`` (counted from the end).
        train_bn: let BatchNorm layers that train update their statistics and affine weights
            (default: frozen in eval mode, the safe choice for small batches).
        backbone_lr_mult: backbone learning rate as a fraction of the head's (``full``,
            ``last-n``, ``bias``, ``distill``).
    """

    strategy: str = config.STRATEGY
    unfreeze: int = config.UNFREEZE
    train_bn: bool = False
    backbone_lr_mult: float = config.BACKBONE_LR_MULT


@dataclass
class Plan:
    """The outcome of applying a strategy to a backbone."""

    trainable: list[nn.Parameter]  # backbone parameters that train
    frozen_prefix: int  # leading blocks that do not train (their output can be cached)
    bn_train: list[nn.Module]  # norm layers to put in train mode during training


def check(cfg: StrategyConfig) -> None:
    if cfg.strategy not in STRATEGIES:
        raise EdgeTransferError(
            f"unknown strategy {cfg.strategy!r}; choose one of: {', '.join(STRATEGIES)}"
        )
    if cfg.strategy == "last-n" and cfg.unfreeze < 1:
        raise EdgeTransferError("--unfreeze must be at least 1 with --strategy last-n")


def apply(cfg: StrategyConfig, features: nn.Module, blocks: list[nn.Module]) -> Plan:
    """Set requires_grad on the backbone for `cfg.strategy` and say what trains.

    The head always trains and is not part of `features`.
    """
    check(cfg)
    for p in features.parameters():
        p.requires_grad_(False)
    bn_train: list[nn.Module] = []
    if cfg.strategy == "head":
        return Plan([], len(blocks), [])
    if cfg.strategy in ("full", "distill"):
        for p in features.parameters():
            p.requires_grad_(True)
        prefix = 0
        scope = [features]
    elif cfg.strategy == "last-n":
        n = min(cfg.unfreeze, len(blocks))
        prefix = len(blocks) - n
        scope = blocks[prefix:]
        for block in scope:
            for p in block.parameters():
                p.requires_grad_(True)
    else:  # bias: only biases (and norm affine parameters with --train-bn) train
        prefix = 0
        scope = [features]
        for m in features.modules():
            if isinstance(m, _BN):
                continue
            bias = getattr(m, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)
    for block in scope:
        for m in block.modules():
            if isinstance(m, _BN):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(cfg.train_bn)
                if cfg.train_bn:
                    bn_train.append(m)
    trainable = [p for p in features.parameters() if p.requires_grad]
    if not trainable:
        raise EdgeTransferError(
            f"--strategy {cfg.strategy} leaves nothing to train in this backbone; try --train-bn "
            "or another strategy"
        )
    return Plan(trainable, prefix, bn_train)


def set_train_mode(features: nn.Module, plan: Plan) -> None:
    """Eval mode everywhere (frozen BatchNorm statistics, no dropout in frozen parts), train
    mode only for the norm layers that are allowed to learn."""
    features.eval()
    for m in plan.bn_train:
        m.train()


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.: KL(teacher_T || student_T) * T^2, so gradients keep their scale."""
    t = temperature
    return nn.functional.kl_div(
        nn.functional.log_softmax(student / t, dim=1),
        nn.functional.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


def l2sp_penalty(params: list[nn.Parameter], source: list[torch.Tensor]) -> torch.Tensor:
    """L2-SP: squared distance of the trained backbone weights from the source weights."""
    total = torch.zeros(())
    for p, s in zip(params, source, strict=True):
        total = total + (p - s).pow(2).sum()
    return total


def estimate_memory(
    model: nn.Module, plan: Plan, batch: int, p, cached: bool, solver: str = "adamw"
) -> dict:
    """Training memory in MiB: weights, gradients and optimizer state of what trains (AdamW:
    2 copies; L-BFGS: its history of LBFGS_HISTORY pairs plus 4 working vectors), the
    activations autograd saves for the backward pass, and the forward working set, at `batch`.

    Saved activations are counted exactly (saved-tensor hooks on one forward pass at batch 1,
    then scaled); the working set is modelled from the largest layer output (see
    WORKSPACE_FACTOR). With `cached` features (strategy head) only the head runs. Checked
    against measured peak RSS growth by tools/transfer_experiment.py --part memory.
    """
    optimizer_copies = 2 * LBFGS_HISTORY + 4 if solver == "lbfgs" else 2
    head_params = list(model.head.parameters())
    trainable = plan.trainable + head_params
    n_all = sum(t.numel() for t in model.parameters())
    n_train = sum(t.numel() for t in trainable)
    saved_bytes, work_bytes = 0, 0
    if not cached:
        import copy

        probe = copy.deepcopy(model)
        trainable_ids = {id(t) for t in plan.trainable}
        names = [n for n, t in model.named_parameters() if id(t) in trainable_ids]
        train_bn = [n for n, m in model.named_modules() if any(m is b for b in plan.bn_train)]

        def plan_of(copy_model: nn.Module) -> Plan:
            params_by_name = dict(copy_model.named_parameters())
            modules = dict(copy_model.named_modules())
            return Plan(
                [params_by_name[n] for n in names],
                plan.frozen_prefix,
                [modules[n] for n in train_bn],
            )

        params = {t.data_ptr() for t in probe.parameters()}
        saved: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.data_ptr() not in params:  # weights are counted once, as weights
                saved[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
            return t

        sizes: list[int] = []
        leaves = [m for m in probe.modules() if not list(m.children())]
        hooks = [
            m.register_forward_hook(
                lambda m, i, o: sizes.append(
                    o.numel() * o.element_size() if isinstance(o, torch.Tensor) else 0
                )
            )
            for m in leaves
        ]
        # A copy: a BatchNorm in train mode (--train-bn) would update its statistics.
        probe.eval()
        set_train_mode(probe.features, plan_of(probe))
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                probe(torch.zeros(1, 3, *p.input_size))
        finally:
            for h in hooks:
                h.remove()
        saved_bytes = sum(saved.values()) * batch
        # The forward working set: a layer's input and output, plus a block input kept for a
        # residual add or a copy in another memory layout (measured: ~3x the largest layer
        # output for mobilenet_v3_small and resnet18). Counted for the training and the
        # validation pass: freed blocks of one are rarely reused by the other.
        work_bytes = WORKSPACE_FACTOR * max(sizes, default=0) * batch
    mib = 1024 * 1024
    out = {
        "weights_mib": n_all * 4 / mib,
        "gradients_mib": n_train * 4 / mib,
        "optimizer_mib": optimizer_copies * n_train * 4 / mib,
        "activations_mib": saved_bytes / mib,
        "workspace_mib": work_bytes / mib,
    }
    out["total_mib"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}
