"""Orchestrates data + backbone + strategy + training into a RUN_DIR."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from edgetransfer import config, strategies
from edgetransfer.backbones import (
    Classifier,
    SourceModel,
    block_modules,
    check_truncate,
    feature_dim,
    feature_taps,
    get_arch,
    load_source,
    outputs,
    split,
    tap,
    truncate,
)
from edgetransfer.bundler import cache_bundle
from edgetransfer.data import (
    Dataset,
    Sample,
    check_bad,
    eval_transform,
    load_image,
    scan,
    train_val,
)
from edgetransfer.errors import DataError, EdgeTransferError, first_line
from edgetransfer.features import extract
from edgetransfer.fileio import atomic_write_text, check_can_write, output_dir
from edgetransfer.headfit import HEAD_L2, HeadData, balanced_class_weights
from edgetransfer.loaders import ImageBatches, train_transform
from edgetransfer.manifest import (
    MANIFEST_NAME,
    RUN_INFO,
    Manifest,
    Preprocessing,
    read_manifest,
    versions,
)
from edgetransfer.report import ReportUnavailable, write_run_report
from edgetransfer.runs import checkpoint_path, load_run, save_model, weights_id
from edgetransfer.train import (
    Checkpoint,
    Interrupted,
    Standardize,
    TensorBatches,
    TrainConfig,
    fit,
    fold,
    remove_checkpoint,
)

DEFAULT_ARCH = config.ARCH
MiB = 1024 * 1024


@dataclass(frozen=True)
class AdaptConfig:
    """Everything `adapt` needs; the CLI fills it from its options.

    Attributes:
        strategy: head | last-n | bias | full | distill (see strategies.py).
        teacher: a RUN_DIR whose model's soft labels guide training (knowledge transfer).
        truncate: cut the backbone after this block (structure transfer).
        features: what the frozen head sees (backbones.FEATURES): the penultimate vector, the
            pooled outputs of the last stages, or both concatenated; ``head`` only.
        keep_source_head: the exported model also answers the source task (source_logits).
        source_data: a folder of the source task's classes; source top-1 is measured before
            and after adaptation (the source task should not get worse).
        lwf: Learning without Forgetting weight: distil the source head's original outputs on
            the target images while the backbone trains.
        augment: none | light | standard; default none for ``head``, light otherwise.
        views: augmented views per training image cached for ``head`` (1 = no augmentation).
        max_memory: training memory budget in MiB; the batch is split to fit, or refused.
        backend: what runs the frozen backbone for ``head``: auto | torch | onnxruntime
            (see features.extract); workers > 0 also sets its decoding threads.
        head_solver: how the head on cached features trains (``head``): ``lbfgs`` (full-batch
            L-BFGS with an L2 penalty, the linear-probe optimum) or ``adamw`` (mini-batches at
            --lr, like the other strategies).
        report: write RUN_DIR/report.html (needs matplotlib, ~0.5 s); off for batch runs.
        baseline: also train the same architecture from random weights on the same split with
            the same epochs, batch size and seed (config.SCRATCH_STRATEGY at SCRATCH_LR), and
            record both results in the manifest's ``baseline`` section and report.html. The
            scratch model is not kept.
        auto: the comparison `--strategy auto` made before this run (auto.py), kept as the
            manifest's ``adapt.auto``; not part of the run's identity for --resume.
        on_step: called after each optimizer step with (epoch, step) (tests, progress).
        on_phase: called with a phase's name as it starts (see AdaptResult.timings): the seam
            benchmarks measure through, e.g. memory when training starts.
    """

    data_dir: Path
    out: Path
    arch: str = DEFAULT_ARCH
    weights: str = config.WEIGHTS
    strategy: str = config.STRATEGY
    epochs: int = config.EPOCHS
    batch_size: int = config.BATCH_SIZE
    accumulate: int = config.ACCUMULATE
    lr: float = config.LR
    backbone_lr_mult: float = config.BACKBONE_LR_MULT
    unfreeze: int = config.UNFREEZE
    train_bn: bool = False
    l2sp: float = config.L2SP
    teacher: Path | None = None
    kd_alpha: float = config.KD_ALPHA
    kd_temperature: float = config.KD_TEMPERATURE
    truncate: str | None = None
    features: str = config.FEATURE
    keep_source_head: bool = False
    source_data: Path | None = None
    lwf: float = config.LWF
    augment: str | None = None
    views: int = config.VIEWS
    balance: bool = False
    patience: int = config.PATIENCE
    head_solver: str = config.HEAD_SOLVER
    image_size: int | None = None
    val_fraction: float = config.VAL_FRACTION
    seed: int = config.SEED
    max_bad: float = config.MAX_BAD
    max_pixels: int | None = None
    max_memory: float | None = None
    workers: int = config.WORKERS
    backend: str = config.BACKEND
    force: bool = False
    resume: bool = False
    use_cache: bool = True
    progress: bool = False
    report: bool = True
    baseline: bool = config.BASELINE
    auto: dict | None = None
    on_step: Callable[[int, int], None] | None = None
    on_phase: Callable[[str], None] | None = None


@dataclass(frozen=True)
class AdaptResult:
    """What adapt made.

    Attributes:
        timings: wall-clock seconds per phase: ``prepare`` (options, scan, the model built),
            ``images`` (every image decoded once; for ``head`` that is the feature extraction),
            ``train`` (training, with any augmented views' features) and within it ``fit`` (the
            optimizer alone), ``baseline`` (the scratch run of --baseline), ``write`` (RUN_DIR)
            and within it ``report`` (report.html), ``bundle`` (the backbone kept in the cache
            as a bundle, see keeps_bundle; a lookup when it is there already).
        head_data: for ``head``, the clean features the head was fitted and validated on
            (None for the strategies that train the backbone).
    """

    run_dir: Path
    manifest: Manifest
    bad_files: list[tuple[Path, str]]
    memory: dict[str, float]
    notes: list[str]
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    head_data: HeadData | None = None


class Phases:
    """Times the phases of one adapt run (AdaptResult.timings), telling `on_phase` as each
    starts."""

    def __init__(self, on_phase: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.on_phase = on_phase

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_phase:
            self.on_phase(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def adapt(cfg: AdaptConfig) -> AdaptResult:
    """Adapt a source model to DATA_DIR with the chosen strategy and write RUN_DIR."""
    with _heap_frozen(), _no_checkpoint_left_on_a_full_disk(cfg):
        return _adapt(cfg)


def inputs(cfg: AdaptConfig) -> list:
    """What adapt reads: RUN_DIR may not be, or contain, any of these (fileio.check_can_write)."""
    weights = cfg.weights if cfg.weights and os.path.exists(cfg.weights) else None
    return [cfg.data_dir, cfg.teacher, cfg.source_data, weights]


@contextlib.contextmanager
def _no_checkpoint_left_on_a_full_disk(cfg: AdaptConfig):
    """A fresh run that fails on a full disk removes its checkpoint: it only holds space the
    user needs, and the advice is to run again. One being resumed from is the user's progress
    and stays."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and not cfg.resume:
            remove_checkpoint(checkpoint_path(cfg.out))
        raise


@contextlib.contextmanager
def _heap_frozen():
    """Python's full garbage collections skip what exists before adapt starts.

    torch, torchvision, onnxruntime and matplotlib leave ~380,000 long-lived objects, and
    every full collection walked them all: 0.2-0.45 s each, several per run, most of them
    triggered by the report's plots (tools/perf.py: report.html 0.43-0.96 s -> 0.48-0.60 s).
    Objects made during adapt are collected as usual. Nested or already frozen: left alone.
    """
    import gc

    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _adapt(cfg: AdaptConfig) -> AdaptResult:
    phase = Phases(cfg.on_phase)
    with phase("prepare"):
        scfg, augment = _check_options(cfg)
        check_can_write(cfg.out, cfg.force, inputs(cfg))
        dataset = scan(cfg.data_dir, cfg.val_fraction, cfg.seed)
        built = _build(cfg, scfg, len(dataset.classes))
        source_before = _source_top1(cfg, built)
    with phase("images"):
        bad, clean = _check_images(cfg, dataset, built)
        dataset = dataset.without([p for p, _ in bad])
        train_s, val_s = train_val(dataset)
    tcfg, memory = _fit_memory(cfg, built.model, built.plan, built.pre)
    with phase("train"):
        teacher_logits = _teacher_logits(cfg, dataset, train_s) if cfg.teacher else None
        lwf_logits = None
        if cfg.lwf:
            lwf_logits = _outputs_of(
                torch.nn.Sequential(built.features, built.source_head),
                train_s,
                built.pre,
                built.backbone_id + "|source-head",
                cfg,
            )
        run = _Training(
            tcfg=tcfg,
            scfg=scfg,
            augment=augment,
            train_s=train_s,
            val_s=val_s,
            fingerprint=_run_fingerprint(cfg, dataset, built.backbone_id),
            teacher_logits=teacher_logits,
            lwf_logits=lwf_logits,
            clean=clean,
        )
        result, head_data = _train(cfg, built, run, phase)
    metrics = {"val_top1": round(result.val_top1, 6), "val_loss": round(result.val_loss, 6)}
    if source_before is not None:
        metrics["source_top1_before"] = round(source_before, 6)
        metrics["source_top1_after"] = round(_source_top1(cfg, built), 6)
    baseline = {}
    if cfg.baseline:
        with phase("baseline"):
            baseline = _baseline(cfg, run, len(dataset.classes), result.val_top1)
        baseline["seconds"] = {
            "pretrained": round(phase.seconds["images"] + phase.seconds["train"], 3),
            "scratch": round(phase.seconds["baseline"], 3),
        }
    manifest = _manifest(
        cfg,
        built,
        dataset=dataset,
        counts={"train": len(train_s), "val": len(val_s), "bad": len(bad)},
        adapt_info=_adapt_info(cfg, built, run, result),
        metrics=metrics,
        baseline=baseline,
    )
    with phase("write"):
        notes = _write_run(cfg, built.model, manifest, result, bad=bad, memory=memory, phase=phase)
    remove_checkpoint(checkpoint_path(cfg.out))
    if keeps_bundle(cfg):
        with phase("bundle"):
            note = _keep_bundle(cfg)
        notes += [note] if note else []
    return AdaptResult(
        run_dir=Path(cfg.out),
        manifest=manifest,
        bad_files=bad,
        memory=memory,
        notes=notes,
        timings=dict(phase.seconds),
        head_data=head_data,
    )


def keeps_bundle(cfg: AdaptConfig) -> bool:
    """Whether this run keeps its frozen backbone in the cache as a bundle, for later runs to
    adapt on without PyTorch: a head run of the source weights (a file or imagenet) whose
    backend may be onnxruntime and which may use the cache; its head sees the penultimate
    features (a bundle outputs those)."""
    return (
        cfg.strategy == "head"
        and cfg.weights != "none"
        and not cfg.truncate
        and cfg.features == config.FEATURE
        and cfg.backend == "auto"
        and cfg.use_cache
    )


def _keep_bundle(cfg: AdaptConfig) -> str | None:
    """bundler.cache_bundle; a failure is a note, not an error: the run itself is complete."""
    try:
        res = cache_bundle(cfg.arch, cfg.weights, image_size=cfg.image_size, data_dir=cfg.data_dir)
    except (EdgeTransferError, OSError) as e:
        return f"backbone not kept in the cache as a bundle: {first_line(e)}"
    if res is None:
        return None
    return (
        f"kept the backbone in the cache as a bundle ({res.path.name}): the next --strategy "
        f"head run of {cfg.arch} with these weights adapts without loading PyTorch"
    )


def _check_options(cfg: AdaptConfig) -> tuple[strategies.StrategyConfig, str]:
    """Every option checked before any work: the strategy's settings and the augmentation
    preset in effect."""
    spec = get_arch(cfg.arch)  # fail on a bad name before any work
    if cfg.truncate:
        check_truncate(spec, cfg.truncate)
    feature_taps(spec, cfg.features)  # an unknown kind, or one the architecture does not offer
    if cfg.features != config.FEATURE and cfg.strategy != "head":
        raise EdgeTransferError(
            f"--features {cfg.features} is for --strategy head (a frozen backbone); "
            f"--strategy {cfg.strategy} trains the penultimate features"
        )
    if cfg.features != config.FEATURE and cfg.truncate:
        raise EdgeTransferError(
            f"--features {cfg.features} cannot be combined with --truncate: it chooses its own "
            "stages of the whole backbone"
        )
    scfg = strategies.StrategyConfig(
        cfg.strategy,
        cfg.unfreeze,
        cfg.train_bn,
        1.0 if cfg.weights == "none" else cfg.backbone_lr_mult,
    )
    strategies.check(scfg)
    if cfg.head_solver not in config.SOLVERS:
        raise EdgeTransferError(
            f"unknown --head-solver {cfg.head_solver!r}; choose one of: {', '.join(config.SOLVERS)}"
        )
    augment = cfg.augment or ("none" if cfg.strategy == "head" else "light")
    if augment not in config.AUGMENTS:
        raise EdgeTransferError(
            f"unknown --augment {augment!r}; choose one of: {', '.join(config.AUGMENTS)}"
        )
    if cfg.baseline and cfg.weights == "none":
        raise EdgeTransferError(
            "--baseline compares the source weights with training from scratch; with "
            "--weights none this run is already from scratch"
        )
    if cfg.strategy == "distill" and cfg.teacher is None:
        raise EdgeTransferError("--strategy distill needs --teacher RUN_DIR (an adapted model)")
    if cfg.views > 1 and augment == "none":
        augment = "light"  # several identical views would only cost time
    if cfg.strategy == "head" and cfg.views == 1 and augment != "none":
        raise EdgeTransferError(
            f"--augment {augment} needs --views K (K > 1) with --strategy head: features are "
            "computed once per cached view"
        )
    return scfg, augment


@dataclass(frozen=True)
class _Built:
    """The model adapt trains: the source split into backbone and source head, a new head."""

    source: SourceModel  # the loaded model, its preprocessing, labels and provenance
    pre: Preprocessing
    features: torch.nn.Module
    source_head: torch.nn.Linear
    head: torch.nn.Linear
    model: Classifier
    plan: strategies.Plan
    backbone_id: str  # pins the backbone's exact weights (feature cache keys)


def _build(cfg: AdaptConfig, scfg: strategies.StrategyConfig, classes: int) -> _Built:
    """Load the source model, split off its head, apply truncation and the strategy's plan,
    and put a new head for `classes` classes on the backbone."""
    spec = get_arch(cfg.arch)
    torch.manual_seed(cfg.seed)  # before building: --weights none must be reproducible
    source = load_source(cfg.arch, cfg.weights)
    pre = source.preprocessing or spec.preprocessing
    if cfg.image_size:
        pre = pre.with_size(cfg.image_size)
    features, source_head = split(spec, source.model)
    _check_source_options(cfg, source)
    if cfg.truncate:
        features = truncate(spec, features, cfg.truncate)
    features.eval()
    source_head.requires_grad_(False)  # the source task's classifier is kept as it is
    blocks = block_modules(spec, features, cfg.truncate)
    taps = feature_taps(spec, cfg.features)
    features = tap(spec, features, cfg.features, taps)
    plan = strategies.apply(scfg, features, blocks)
    head = torch.nn.Linear(feature_dim(features, pre), classes)
    model = Classifier(features, head, source_head if cfg.keep_source_head else None)
    # a file's sha256, or a hash of the random init
    source_id = source.provenance.get("sha256") or _state_hash(features)
    backbone_id = "|".join([cfg.arch, source_id, cfg.truncate or ""])
    if taps:  # what the backbone outputs is part of the feature cache key
        backbone_id += f"|{cfg.features}:{','.join(taps)}"
    return _Built(
        source=source,
        pre=pre,
        features=features,
        source_head=source_head,
        head=head,
        model=model,
        plan=plan,
        backbone_id=backbone_id,
    )


def _adapt_info(cfg: AdaptConfig, built: _Built, run: _Training, result) -> dict:
    """The manifest's ``adapt`` section: how this run trained."""
    tcfg = run.tcfg
    info = {
        "strategy": cfg.strategy,
        "epochs": cfg.epochs,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "batch_size": tcfg.batch_size,
        "accumulate": tcfg.accumulate,
        "lr": cfg.lr,
        "solver": tcfg.solver,
        **({"l2": tcfg.weight_decay} if tcfg.solver == "lbfgs" else {}),
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "augment": run.augment,
        "views": cfg.views,
        "trainable_params": sum(p.numel() for p in built.plan.trainable)
        + sum(p.numel() for p in built.head.parameters()),
    }
    if cfg.strategy == "last-n":
        info["unfreeze"] = cfg.unfreeze
    if cfg.strategy != "head":
        info["backbone_lr_mult"] = run.scfg.backbone_lr_mult
        info["train_bn"] = cfg.train_bn
    optional = {
        "l2sp": cfg.l2sp,
        "balance": "class-weighted loss" if cfg.balance else None,
        "truncate": cfg.truncate,
        # what the head sees, and the trunk modules pooled for it (runs.load_run rebuilds them)
        "features": cfg.features if cfg.features != config.FEATURE else None,
        "taps": list(feature_taps(get_arch(cfg.arch), cfg.features)) or None,
        "keep_source_head": True if cfg.keep_source_head else None,
        "lwf": cfg.lwf,
    }
    info.update({k: v for k, v in optional.items() if v})
    if cfg.auto:
        info["auto"] = cfg.auto
    if cfg.teacher:
        tm = read_manifest(cfg.teacher)
        info["teacher"] = {
            "arch": tm.arch,
            "val_top1": tm.metrics.get("val_top1"),
            "alpha": cfg.kd_alpha,
            "temperature": cfg.kd_temperature,
        }
    return info


def _manifest(
    cfg: AdaptConfig,
    built: _Built,
    *,
    dataset: Dataset,
    counts: dict[str, int],
    adapt_info: dict,
    metrics: dict,
    baseline: dict,
) -> Manifest:
    """The run's manifest: labels, preprocessing, source provenance, how it trained, results
    (and the scratch baseline's, with --baseline)."""
    src = dict(built.source.provenance)
    if built.source.labels is not None:
        src["labels"] = built.source.labels
    elif cfg.keep_source_head:
        src["labels"] = [f"source_{i}" for i in range(built.source_head.out_features)]
    io_names = {"input": "input", "output": "logits"}
    if cfg.keep_source_head:
        io_names["source_output"] = "source_logits"
    return Manifest(
        arch=cfg.arch,
        labels=list(dataset.classes),
        preprocessing=built.pre,
        source=src,
        adapt=adapt_info,
        data={"fingerprint": dataset.fingerprint(), "classes": len(dataset.classes), **counts},
        metrics=metrics,
        versions=versions(),
        io=io_names,
        baseline=baseline,
    )


def _check_source_options(cfg: AdaptConfig, source) -> None:
    """The source-task options need a real source head on the untruncated backbone."""
    wanted = [
        name
        for name, on in (
            ("--keep-source-head", cfg.keep_source_head),
            ("--lwf", cfg.lwf),
            ("--source-data", cfg.source_data),
        )
        if on
    ]
    if not wanted:
        return
    if cfg.weights == "none":
        raise EdgeTransferError(
            f"{wanted[0]} needs source weights (a source task); --weights none has none"
        )
    if cfg.truncate:
        raise EdgeTransferError(
            f"{wanted[0]} cannot be combined with --truncate: the source "
            "head needs the whole backbone"
        )
    if cfg.features != config.FEATURE:
        raise EdgeTransferError(
            f"{wanted[0]} cannot be combined with --features {cfg.features}: the source head "
            "sits on the penultimate features"
        )
    if cfg.lwf and cfg.strategy == "head":
        raise EdgeTransferError(
            "--lwf protects a backbone that trains; with --strategy head "
            "the source task cannot change anyway"
        )


def _outputs_of(module, samples, pre, module_id: str, cfg: AdaptConfig):
    """`module` outputs on the un-augmented `samples`, through the feature cache."""
    out = extract(
        module,
        samples,
        pre,
        backbone_id=module_id,
        use_cache=cfg.use_cache,
        max_pixels=cfg.max_pixels,
        progress=cfg.progress,
    )
    if out.bad:
        raise DataError(f"{out.bad[0][0]}: {out.bad[0][1]}")
    return out.vectors


def _source_top1(cfg: AdaptConfig, built: _Built) -> float | None:
    """Top-1 of the backbone + source head on --source-data (None without it)."""
    if cfg.source_data is None:
        return None
    ds = scan(cfg.source_data, val_fraction=0.0)
    labels = built.source.labels or [f"source_{i}" for i in range(built.source_head.out_features)]
    unknown = [c for c in ds.classes if c not in labels]
    if unknown:
        raise DataError(
            f"--source-data has classes the source model does not know: "
            f"{', '.join(unknown)} (it knows {', '.join(labels[:10])})"
        )
    truth = torch.tensor([labels.index(ds.classes[s.label]) for s in ds.samples])
    logits = _outputs_of(
        torch.nn.Sequential(built.features, built.source_head),
        ds.samples,
        built.pre,
        "source-eval",
        dataclasses.replace(cfg, use_cache=False),
    )
    return float((logits.argmax(1) == truth).float().mean())


def _check_images(cfg: AdaptConfig, dataset: Dataset, built: _Built):
    """Decode every image once; unreadable ones are dropped (and fail the run past max_bad).

    For ``head`` this pass is the feature extraction itself: returns the bad files and, for
    head, the clean feature vectors by path (None otherwise), so training reuses them.
    """
    if cfg.strategy == "head":
        feats = extract(
            built.features,
            dataset.samples,
            built.pre,
            backbone_id=built.backbone_id,
            use_cache=cfg.use_cache,
            max_pixels=cfg.max_pixels,
            progress=cfg.progress,
            backend=cfg.backend,
            workers=cfg.workers or None,
        )
        bad = feats.bad
        clean = {s.path: row for s, row in zip(feats.samples, feats.vectors, strict=True)}
    else:
        clean = None
        from tqdm import tqdm

        bad = []
        for s in tqdm(
            dataset.samples, desc="checking images", disable=not cfg.progress, leave=False
        ):
            try:
                load_image(s.path, cfg.max_pixels)
            except DataError as e:
                bad.append((s.path, str(e)))
    check_bad(bad, len(dataset.samples), cfg.max_bad)
    return bad, clean


def _fit_memory(cfg: AdaptConfig, model, plan, pre):
    """The training config, with the batch split into accumulation steps to fit max_memory,
    and the memory estimate (strategies.estimate_memory) at that batch."""
    batch, accumulate = cfg.batch_size, cfg.accumulate
    # only the head on cached features can take L-BFGS (one fixed full-batch objective)
    solver = cfg.head_solver if cfg.strategy == "head" else "adamw"
    cached = cfg.strategy == "head"
    while True:
        memory = strategies.estimate_memory(model, plan, batch, pre, cached, solver)
        need = memory["total_mib"]
        if not cfg.max_memory or need <= cfg.max_memory:
            break
        if batch == 1:
            raise EdgeTransferError(
                f"--strategy {cfg.strategy} needs about {need:.0f} MiB even at batch size 1, "
                f"over --max-memory {cfg.max_memory:g}; try --strategy bias or head, "
                "--truncate, or a smaller --image-size"
            )
        batch, accumulate = max(1, batch // 2), accumulate * 2
    return TrainConfig(
        epochs=cfg.epochs,
        batch_size=batch,
        lr=cfg.lr,
        seed=cfg.seed,
        accumulate=accumulate,
        patience=cfg.patience,
        solver=solver,
        **({"weight_decay": HEAD_L2} if solver == "lbfgs" else {}),
    ), memory


def _teacher_logits(cfg: AdaptConfig, dataset, train_s):
    """The teacher's logits on the (un-augmented) training images, computed once and cached."""
    teacher, tm = load_run(cfg.teacher)
    if tm.labels != dataset.classes:
        raise EdgeTransferError(
            f"teacher {cfg.teacher} knows {', '.join(tm.labels)}, but the data has "
            f"{', '.join(dataset.classes)}; adapt the teacher on the same classes first"
        )
    tid = "teacher:" + weights_id(cfg.teacher)

    class Logits(torch.nn.Module):  # a teacher that kept its source head answers two tasks
        def forward(self, x):
            return outputs(teacher(x))[0]

    out = extract(
        Logits(),
        train_s,
        tm.preprocessing,
        backbone_id=tid,
        use_cache=cfg.use_cache,
        max_pixels=cfg.max_pixels,
        progress=cfg.progress,
    )
    if out.bad:
        raise DataError(f"the teacher could not read {out.bad[0][0]}: {out.bad[0][1]}")
    return out.vectors


def _state_hash(module) -> str:
    """sha256 of a module's weights, for cache keys when no weights file identifies them."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _run_fingerprint(cfg: AdaptConfig, dataset, backbone_id: str = "") -> str:
    """Identifies a run's inputs and settings, so --resume only continues the same run."""
    fields = {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k
        not in (
            "out",
            "force",
            "resume",
            "progress",
            "on_step",
            "on_phase",
            "use_cache",
            "workers",
            "backend",
            "report",
            "baseline",
            "auto",
        )
    }
    if cfg.strategy != "head":
        fields.pop("head_solver")  # not used: changing it is still the same run
    fields["data"] = dataset.fingerprint()
    fields["backbone"] = backbone_id  # contents, not paths: a replaced weights file is another run
    if cfg.teacher:
        fields["teacher"] = weights_id(cfg.teacher)
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class _Training:
    """What one training run uses beside the model: its config, samples and extra targets."""

    tcfg: TrainConfig
    scfg: strategies.StrategyConfig
    augment: str
    train_s: list[Sample]
    val_s: list[Sample]
    fingerprint: str  # identifies the run for --resume
    teacher_logits: torch.Tensor | None = None  # distillation targets per training image
    lwf_logits: torch.Tensor | None = None  # the source head's outputs, for LwF
    clean: dict | None = None  # head: features extracted while checking the images, by path


def _train(cfg: AdaptConfig, built: _Built, run: _Training, phase: Phases):
    """Train with the strategy's loss and batches; the optimizer runs in phase "fit". Returns
    the training result and, for ``head``, the features it was fitted on (AdaptResult's
    head_data)."""
    loss = _base_loss(cfg, run, classes=built.head.out_features)
    fit_options = dict(
        checkpoint=Checkpoint(checkpoint_path(cfg.out), run.fingerprint),
        resume=cfg.resume,
        progress=cfg.progress,
        on_step=cfg.on_step,
        cfg=run.tcfg,
    )
    if cfg.strategy == "head":
        return _train_head(cfg, built, run, loss, fit_options, phase)
    return _train_backbone(cfg, built, run, loss, fit_options, phase), None


def _base_loss(cfg: AdaptConfig, run: _Training, classes: int):
    """Cross-entropy (class-weighted with --balance), mixed with the teacher's soft labels when
    distilling."""
    weights = None
    if cfg.balance:
        weights = torch.from_numpy(balanced_class_weights(_labels(run.train_s).numpy(), classes))
    teacher = run.teacher_logits

    def base_loss(logits, y, idx):
        loss = torch.nn.functional.cross_entropy(logits, y, weight=weights)
        if teacher is not None:
            kd = strategies.kd_loss(logits, teacher[idx], cfg.kd_temperature)
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd
        return loss

    return base_loss


def _labels(samples: list[Sample]) -> torch.Tensor:
    return torch.tensor([s.label for s in samples])


def _train_head(cfg: AdaptConfig, built: _Built, run: _Training, loss, fit_options, phase):
    """A new head on cached features (and augmented views), standardised, then folded back."""

    def feats(samples, aug="none", view=0):
        if aug == "none" and run.clean is not None:  # extracted while checking the images
            return torch.stack([run.clean[s.path] for s in samples])
        out = extract(
            built.features,
            samples,
            built.pre,
            backbone_id=built.backbone_id,
            use_cache=cfg.use_cache,
            max_pixels=cfg.max_pixels,
            progress=cfg.progress,
            augment=aug,
            view=view,
            seed=cfg.seed,
            backend=cfg.backend,
            workers=cfg.workers or None,
        )
        if out.bad:
            raise DataError(f"{out.bad[0][0]}: {out.bad[0][1]}")
        return out.vectors

    x_train = feats(run.train_s)
    if cfg.views > 1:  # view 0 is the clean image, the others augmented copies
        x_train = torch.stack(
            [x_train] + [feats(run.train_s, run.augment, v) for v in range(1, cfg.views)]
        )
    x_val = feats(run.val_s)
    std = Standardize(x_train[0] if cfg.views > 1 else x_train)
    y_train = _labels(run.train_s)
    train = TensorBatches(x_train, y_train, run.tcfg.batch_size, cfg.seed, views=cfg.views)
    val_labels = _labels(run.val_s)
    val = TensorBatches(x_val, val_labels, 256, cfg.seed, shuffle=False)
    groups = [{"params": list(built.head.parameters()), "lr": cfg.lr}]
    # one thread: a head's tensors are too small to share out (see fit's `threads`)
    with phase("fit"):
        result = fit(
            torch.nn.Sequential(std, built.head),
            param_groups=groups,
            train=train,
            val=val,
            loss_fn=loss,
            threads=1,
            **fit_options,
        )
    fold(std, built.head)
    clean = x_train[0] if cfg.views > 1 else x_train
    data = HeadData(  # the tensors above, shared (numpy views): no copy
        x_train=clean.numpy(),
        y_train=y_train.numpy(),
        x_val=x_val.numpy(),
        y_val=val_labels.numpy(),
        classes=built.head.out_features,
    )
    return result, data


def _train_backbone(cfg: AdaptConfig, built: _Built, run: _Training, loss, fit_options, phase):
    """Backbone and head on decoded image batches, with L2-SP and LwF when asked."""
    model, plan, pre = built.model, built.plan, built.pre
    batches = dict(workers=cfg.workers, max_pixels=cfg.max_pixels)
    train = ImageBatches(
        run.train_s, train_transform(pre, run.augment), run.tcfg.batch_size, cfg.seed, **batches
    )
    # evaluation at the training batch keeps the memory plan true
    val = ImageBatches(
        run.val_s, eval_transform(pre), run.tcfg.batch_size, cfg.seed, shuffle=False, **batches
    )
    source_weights = [p.detach().clone() for p in plan.trainable]
    lwf_logits = run.lwf_logits
    stash: dict = {}

    def forward(m, x):
        # The new head's logits drive training; the source head's (for LwF) are kept aside.
        f = m.features(x)
        if lwf_logits is not None:
            stash["source"] = built.source_head(f)
        return m.head(f)

    def loss_fn(logits, y, idx):
        total = loss(logits, y, idx)
        if cfg.l2sp:
            total = total + cfg.l2sp * strategies.l2sp_penalty(plan.trainable, source_weights)
        if lwf_logits is not None:
            total = total + cfg.lwf * strategies.kd_loss(stash["source"], lwf_logits[idx], 2.0)
        return total

    groups = [
        {"params": plan.trainable, "lr": cfg.lr * run.scfg.backbone_lr_mult},
        {"params": list(model.head.parameters()), "lr": cfg.lr},
    ]

    def train_mode():
        model.train()
        strategies.set_train_mode(model.features, plan)

    with phase("fit"):
        return fit(
            model,
            param_groups=groups,
            train=train,
            val=val,
            loss_fn=loss_fn,
            forward=forward,
            train_mode=train_mode,
            **fit_options,
        )


def scratch_config(cfg: AdaptConfig) -> AdaptConfig:
    """The --baseline run: the same architecture (truncation and input size included), data,
    split, epochs, batch size, seed, patience and --balance, from random weights with the
    scratch recipe; nothing that carries the source task (teacher, source head, L2-SP, LwF)."""
    return dataclasses.replace(
        cfg,
        weights="none",
        strategy=config.SCRATCH_STRATEGY,
        lr=config.SCRATCH_LR,
        augment=None,  # the strategy's default
        views=config.VIEWS,
        teacher=None,
        keep_source_head=False,
        source_data=None,
        lwf=config.LWF,
        l2sp=config.L2SP,
        baseline=False,
        resume=False,
        on_step=None,
        features=config.FEATURE,  # the whole network trains: no frozen features to choose
    )


def _baseline(cfg: AdaptConfig, run: _Training, classes: int, pretrained_top1: float) -> dict:
    """Train the same architecture from scratch on the adapted run's own split (same readable
    images) and return the manifest's ``baseline`` section (without the timings)."""
    bcfg = scratch_config(cfg)
    scfg, augment = _check_options(bcfg)
    built = _build(bcfg, scfg, classes)
    tcfg, _ = _fit_memory(bcfg, built.model, built.plan, built.pre)
    brun = _Training(
        tcfg=tcfg, scfg=scfg, augment=augment, train_s=run.train_s, val_s=run.val_s, fingerprint=""
    )
    fit_options = dict(checkpoint=None, resume=False, progress=cfg.progress, cfg=tcfg)
    loss = _base_loss(bcfg, brun, classes)
    try:
        result = _train_backbone(bcfg, built, brun, loss, fit_options, Phases())
    except Interrupted as e:  # the adapted run's checkpoint (its last epoch) is still there
        signum = e.exit_code - 128
        raise Interrupted(
            f"{signal.Signals(signum).name}: stopped while training the --baseline from "
            f"scratch; the adapted model is in {checkpoint_path(cfg.out)}: run the same command "
            "with --resume to finish (the baseline starts over)",
            signum,
        ) from None
    return {
        "strategy": bcfg.strategy,
        "weights": bcfg.weights,
        "lr": bcfg.lr,
        "augment": augment,
        "epochs": bcfg.epochs,
        "best_epoch": result.best_epoch,
        "batch_size": tcfg.batch_size,
        "accumulate": tcfg.accumulate,
        "seed": bcfg.seed,
        "val_images": len(run.val_s),
        "scratch_val_top1": round(result.val_top1, 6),
        "pretrained_val_top1": round(pretrained_top1, 6),
        "gain_points": round(100 * (pretrained_top1 - result.val_top1), 2),
    }


def _write_run(
    cfg: AdaptConfig, model, manifest: Manifest, result, *, bad, memory, phase: Phases
) -> list[str]:
    """RUN_DIR, replaced only when complete; returns notes (a report that could not be made)."""
    with output_dir(cfg.out, cfg.force, inputs(cfg)) as tmp:
        save_model(model, manifest, tmp / "model.safetensors")
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        atomic_write_text(tmp / "history.json", json.dumps(result.history, indent=1) + "\n")
        # Where the data lives stays in RUN_DIR only; artifacts carry just its fingerprint.
        run_info = {
            "data_dir": str(Path(cfg.data_dir).absolute()),
            "weights": cfg.weights,
            "memory_estimate": memory,
            "stopped_early": result.stopped_early,
        }
        atomic_write_text(tmp / RUN_INFO, json.dumps(run_info, indent=2) + "\n")
        if bad:
            atomic_write_text(
                tmp / "bad_files.txt", "".join(f"{os.fsdecode(p)!r}\t{r}\n" for p, r in bad)
            )
        if not cfg.report:
            return []
        try:  # report.html needs the optional matplotlib; the run is complete without it
            with phase("report"):
                write_run_report(
                    tmp,
                    model=model,
                    data_dir=cfg.data_dir,
                    progress=cfg.progress,
                    val_logits=result.val_logits,
                    bad=bad,
                )
        except ReportUnavailable as e:
            return [f"no report.html: {e}"]
    return []
