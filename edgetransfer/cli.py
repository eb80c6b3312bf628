"""The command line: each command parses options, calls one library function, prints a summary.

No torch import at start-up: library modules are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import click

from edgetransfer import __version__, config
from edgetransfer.errors import EdgeTransferError, EdgeTransferWarning, Terminated, printable

# OSErrors a user can fix; anything else is a bug and keeps its traceback.
_OS_ADVICE = {
    errno.ENOSPC: "no space left on device while writing {}; free some space and run again",
    errno.EDQUOT: "disk quota exceeded while writing {}; free some space and run again",
    errno.EROFS: "read-only file system: cannot write {}",  # + the command's output option
    errno.EACCES: "permission denied: {}",
    errno.EPERM: "operation not permitted: {}",
}
# the option that names a command's output, for "choose a writable ..." (verify has none)
_OUTPUT_PARAMS = {"out": "--out", "report_dir": "--report", "out_dir": "OUT_DIR"}


def _on_sigterm(signum, frame) -> None:
    raise Terminated  # (adapt's training loop handles SIGTERM itself: train.Stop)


class _Group(click.Group):
    """Turns library errors into one-line Click errors (exit 1), Ctrl-C into exit 130 and
    SIGTERM into exit 143, each after the temp files of the interrupted write are removed.

    Also: a full disk or a permission problem becomes one line, edgetransfer warnings print as
    one `Warning:` line, a command that needs PyTorch on a core install names the extra, and
    file names that are not valid UTF-8 never crash the output.
    """

    def invoke(self, ctx: click.Context):
        for stream in (sys.stdout, sys.stderr):
            # Undecodable bytes in a file name go out as the same bytes, as `ls`/`find` do.
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors="surrogateescape")
        main = threading.current_thread() is threading.main_thread()
        old_sigterm = signal.getsignal(signal.SIGTERM) if main else None
        # a process started with SIGTERM ignored (nohup-like launchers) keeps ignoring it
        ours = main and old_sigterm is not signal.SIG_IGN
        if ours:
            signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", EdgeTransferWarning)  # _show_warning dedupes
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning, set())
                return super().invoke(ctx)
        except OSError as e:
            if e.errno not in _OS_ADVICE:
                raise
            what = printable(os.fsdecode(e.filename)) if e.filename is not None else "output"
            message = _OS_ADVICE[e.errno].format(what)
            if e.errno == errno.EROFS:
                message += _writable_hint(self, ctx)
            raise click.ClickException(message) from None
        except ModuleNotFoundError as e:
            if (e.name or "").partition(".")[0] not in config.TORCH_MODULES:
                raise
            raise click.ClickException(
                f"this command needs PyTorch ({e.name} is not installed); {config.TORCH_EXTRA}"
            ) from None
        except EdgeTransferError as e:
            err = click.ClickException(printable(str(e)))
            err.exit_code = getattr(e, "exit_code", 1)  # 130/143 after an interrupted adapt
            raise err from None
        except Terminated:
            click.echo("Terminated (SIGTERM); nothing was written.", err=True)
            sys.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("Interrupted; nothing was written.", err=True)
            sys.exit(130)
        finally:
            if ours:
                signal.signal(signal.SIGTERM, old_sigterm or signal.SIG_DFL)


def _writable_hint(group: click.Group, ctx: click.Context) -> str:
    """The "; choose a writable --out" hint for a command with an output option, else ""."""
    cmd = group.get_command(ctx, ctx.invoked_subcommand or "")
    for param in getattr(cmd, "params", ()):
        if param.name in _OUTPUT_PARAMS:
            return f"; choose a writable {_OUTPUT_PARAMS[param.name]}"
    return ""


def _show_warning(other, shown, message, category, filename, lineno, file=None, line=None):
    if issubclass(category, EdgeTransferWarning):
        text = printable(str(message))
        if text not in shown:  # a folder scanned twice in one command warns once
            shown.add(text)
            click.echo(f"Warning: {text}", err=True)
    else:
        other(message, category, filename, lineno, file, line)


def _progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def _emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


# Options that several commands take, each written once (as sqlite-utils' output_options) and
# stacked on the commands. A factory's argument is the one thing that differs between commands.


def _json_option(help: str) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help=help)


def _force_option(what: str) -> Callable:
    """--force for a command that refuses to overwrite `what` without it."""
    return click.option("--force", is_flag=True, help=f"Replace an existing {what}.")


def _image_size_option() -> Callable:
    """--image-size: adapt's input size, and the bundle's that a head run at that size keeps."""
    return click.option(
        "--image-size",
        type=click.IntRange(min=8),
        default=None,
        help="Input size in pixels (default: the architecture's own).",
    )


def _batch_size_option(default: int, help: str | None = None) -> Callable:
    return click.option(
        "--batch-size", type=click.IntRange(min=1), default=default, show_default=True, help=help
    )


def _threads_option(help: str = "Threads [default: all cores].") -> Callable:
    return click.option("--threads", type=click.IntRange(min=1), default=None, help=help)


_quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
_provider_option = click.option(
    "--provider",
    type=click.Choice(config.PROVIDERS),
    default=config.PROVIDER,
    show_default=True,
    help="onnxruntime execution provider for ONNX models.",
)


def _eager_weights_option(use: str) -> Callable:
    return click.option(
        "--eager-weights",
        default=None,
        metavar="imagenet|none|PATH",
        help="For a run adapted on a backbone bundle: the weights the bundle was made from, to "
        + use,
    )


_trust_torchscript_option = click.option(
    "--trust-torchscript",
    is_flag=True,
    help="Also load model.pt (TorchScript) and model.pt2 (torch.export) from the folder. Both "
    "can run code when loaded: only for folders you exported or trust.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgetransfer")
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    envvar="EDGETRANSFER_MAX_PIXELS",
    help="Refuse images with more pixels than this, for every command (a decompression-bomb "
    f"guard, checked before decoding) [default: {config.MAX_PIXELS}; env "
    "EDGETRANSFER_MAX_PIXELS].",
)
@click.pass_context
def cli(ctx: click.Context, max_pixels: int | None) -> None:
    """Adapt a pretrained CNN to your own images, export it, and prove the exports agree.

    \b
    Example (the shipped demo, fully offline):
      edgetransfer demo
    Example (your own folder of images per class):
      edgetransfer adapt photos/ --out run && edgetransfer export run --out run/export
      edgetransfer verify run/export --data photos/
    """
    if max_pixels is not None:
        from edgetransfer.data import pixel_limit

        ctx.with_resource(pixel_limit(max_pixels))


@cli.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--arch",
    default=config.ARCH,
    show_default=True,
    help="Backbone architecture (see `edgetransfer archs`).",
)
@click.option(
    "--weights",
    default=config.WEIGHTS,
    show_default=True,
    help="Source weights: imagenet, none, or a .safetensors / .pth state_dict file.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=config.EPOCHS, show_default=True)
@_batch_size_option(config.BATCH_SIZE)
@click.option(
    "--lr",
    type=click.FloatRange(min=0, min_open=True),
    default=config.LR,
    show_default=True,
    help="Learning rate of the new head.",
)
@_image_size_option()
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 0.9),
    default=config.VAL_FRACTION,
    show_default=True,
    help="Share of each class held out for validation when there is no val/ folder.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="RUN_DIR to write [default: runs/<DATA_DIR name>].",
)
@click.option("--seed", type=int, default=config.SEED, show_default=True)
@click.option(
    "--max-bad",
    type=click.FloatRange(0, 1),
    default=config.MAX_BAD,
    show_default=True,
    help="Fail when more than this share of images cannot be read.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(min=1),
    default=None,
    help="Refuse images with more pixels than this [default: the global --max-pixels].",
)
@click.option(
    "--strategy",
    type=click.Choice(config.STRATEGY_CHOICES),
    default=config.STRATEGY,
    show_default=True,
    help="What trains: the head on cached features; also the last N blocks; biases only; "
    "everything; everything guided by --teacher; or auto: the best of head, bias, last-n "
    "and full on the validation images.",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=0, min_open=True),
    default=config.AUTO_BUDGET,
    metavar="SECONDS",
    help="--strategy auto: time for comparing strategies; those that would not fit are "
    "skipped [default: no limit].",
)
@click.option(
    "--unfreeze",
    type=click.IntRange(min=1),
    default=config.UNFREEZE,
    show_default=True,
    help="Blocks that train with --strategy last-n.",
)
@click.option(
    "--train-bn",
    is_flag=True,
    help="Let BatchNorm layers that train update statistics and affine weights.",
)
@click.option(
    "--backbone-lr",
    "backbone_lr_mult",
    type=click.FloatRange(0, 1),
    default=config.BACKBONE_LR_MULT,
    show_default=True,
    help="Backbone learning rate as a fraction of --lr.",
)
@click.option(
    "--l2sp",
    type=click.FloatRange(min=0),
    default=config.L2SP,
    show_default=True,
    help="L2-SP weight: pull trained backbone weights toward the source weights.",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    default=None,
    help="RUN_DIR of an adapted teacher whose soft labels guide training.",
)
@click.option(
    "--kd-alpha",
    type=click.FloatRange(0, 1),
    default=config.KD_ALPHA,
    show_default=True,
    help="Weight of the distillation loss against cross-entropy.",
)
@click.option(
    "--kd-temperature",
    type=click.FloatRange(min=0, min_open=True),
    default=config.KD_TEMPERATURE,
    show_default=True,
    help="Softmax temperature for distillation.",
)
@click.option(
    "--truncate",
    default=None,
    metavar="BLOCK",
    help="Cut the backbone after BLOCK (e.g. features.8) for a smaller model.",
)
@click.option(
    "--features",
    type=click.Choice(config.FEATURES),
    default=config.FEATURE,
    show_default=True,
    help="What the frozen head sees: the penultimate vector, the pooled outputs of the last "
    "stages, or both (concat). Strategy head only.",
)
@click.option(
    "--keep-source-head",
    is_flag=True,
    help="Keep the source head: the model also outputs source_logits.",
)
@click.option(
    "--source-data",
    type=click.Path(path_type=Path),
    default=None,
    help="Source-task images (class folders); source top-1 is measured before/after.",
)
@click.option(
    "--lwf",
    type=click.FloatRange(min=0),
    default=config.LWF,
    show_default=True,
    help="Learning-without-Forgetting weight protecting the source task.",
)
@click.option(
    "--augment",
    type=click.Choice(config.AUGMENTS),
    default=None,
    help="Augmentation [default: none for head, light otherwise].",
)
@click.option(
    "--views",
    type=click.IntRange(min=1),
    default=config.VIEWS,
    show_default=True,
    help="Augmented views cached per image with --strategy head.",
)
@click.option(
    "--accumulate",
    type=click.IntRange(min=1),
    default=config.ACCUMULATE,
    show_default=True,
    help="Micro-batches per optimizer step (gradient accumulation).",
)
@click.option(
    "--patience",
    type=click.IntRange(min=0),
    default=config.PATIENCE,
    show_default=True,
    help="Stop after N epochs without a better validation result (0: never).",
)
@click.option(
    "--head-solver",
    type=click.Choice(config.SOLVERS),
    default=config.HEAD_SOLVER,
    show_default=True,
    help="--strategy head: full-batch L-BFGS (the linear-probe optimum; --lr unused) "
    "or mini-batch AdamW at --lr.",
)
@click.option("--balance", is_flag=True, help="Class-weighted loss for imbalanced folders.")
@click.option(
    "--max-memory",
    type=click.FloatRange(min=1),
    default=None,
    metavar="MB",
    help="Training memory budget; the batch is split (accumulation) to fit.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=config.WORKERS,
    show_default=True,
    help="Workers decoding images: threads for feature extraction [0: automatic], "
    "processes for strategies that train the backbone [0: none].",
)
@click.option(
    "--backend",
    type=click.Choice(config.BACKENDS),
    default=config.BACKEND,
    show_default=True,
    help="What runs the frozen backbone for --strategy head (auto: onnxruntime when "
    "the exported backbone matches PyTorch).",
)
@click.option(
    "--backbone",
    "backbone_bundle",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE.onnx",
    help="A backbone bundle (`edgetransfer backbone`): features from onnxruntime and a head "
    "fitted in numpy, without importing PyTorch (--strategy head only).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same command).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the feature cache.")
@click.option(
    "--no-report",
    is_flag=True,
    help="Do not write RUN_DIR/report.html (saves matplotlib's ~0.5 s per run).",
)
@click.option(
    "--baseline",
    is_flag=True,
    default=config.BASELINE,
    help="Also train the same architecture from scratch (same split, epochs, batch, seed) "
    "and record both results in the manifest and report.html; the scratch model is not kept.",
)
@_force_option("RUN_DIR")
@_json_option("Print the manifest as JSON.")
@_quiet_option
def adapt(
    data_dir: Path,
    arch: str,
    weights: str,
    epochs: int,
    batch_size: int,
    lr: float,
    image_size: int | None,
    val_fraction: float,
    out: Path | None,
    seed: int,
    max_bad: float,
    max_pixels: int | None,
    strategy: str,
    budget: float | None,
    unfreeze: int,
    train_bn: bool,
    backbone_lr_mult: float,
    l2sp: float,
    teacher: Path | None,
    kd_alpha: float,
    kd_temperature: float,
    truncate: str | None,
    features: str,
    keep_source_head: bool,
    source_data: Path | None,
    lwf: float,
    augment: str | None,
    views: int,
    accumulate: int,
    patience: int,
    head_solver: str,
    balance: bool,
    max_memory: float | None,
    workers: int,
    backend: str,
    backbone_bundle: Path | None,
    resume: bool,
    no_cache: bool,
    no_report: bool,
    baseline: bool,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Adapt a pretrained backbone to DATA_DIR (one sub-folder of images per class).

    By default the backbone is frozen, its features are computed once and cached, and a new
    head is trained on them (full-batch L-BFGS; --head-solver adamw for mini-batches); the
    best epoch by validation accuracy is kept. Other strategies train part or all of the
    backbone with small batches (BatchNorm stays frozen unless --train-bn).
    Ctrl-C stops after the current step and saves a checkpoint: rerun with --resume.
    With --backbone FILE.onnx (a bundle from `edgetransfer backbone`) the features come from
    onnxruntime and the head is fitted in numpy: PyTorch is not imported. A head run keeps its
    backbone as such a bundle in the cache, and later head runs of the same --arch, --weights
    and --image-size use it the same way (--backend torch or --no-cache: not).

    \b
    Example:
      edgetransfer adapt photos/ --arch resnet18 --weights resnet18.pth --out run
      edgetransfer adapt photos/ --strategy last-n --unfreeze 3 --out run2
      edgetransfer adapt photos/ --backbone mnv3s.backbone.onnx --out run3
      edgetransfer adapt photos/ --strategy auto --budget 300 --out run4
    """
    if budget is not None and strategy != config.AUTO:
        raise click.UsageError(f"--budget is for --strategy {config.AUTO}")
    out = out or Path("runs") / (Path(data_dir).resolve().name or "run")
    ctx = click.get_current_context()
    bundle_options = dict(
        data_dir=data_dir,
        out=out,
        epochs=epochs,
        patience=patience,
        balance=balance,
        val_fraction=val_fraction,
        seed=seed,
        max_bad=max_bad,
        max_pixels=max_pixels,
        workers=workers,
        force=force,
        use_cache=not no_cache,
        progress=_progress(quiet or as_json),
    )
    if backbone_bundle is not None:
        _refuse_with_bundle(ctx)
        _adapt_on_bundle(backbone_bundle, bundle_options, as_json=as_json)
        return
    cached = _cached_bundle(ctx)
    if cached is not None:  # a bundle an earlier run of these weights kept: no torch import
        from edgetransfer.bundlecache import weights_spec

        click.echo(
            f"backbone from the cached bundle {cached.path} (kept by an earlier run; "
            "--backend torch runs PyTorch instead)",
            err=as_json,
        )
        _adapt_on_bundle(
            cached.path,
            bundle_options,
            as_json=as_json,
            weights=weights_spec(weights),
            report=not no_report,
        )
        return
    from edgetransfer.adapt import AdaptConfig
    from edgetransfer.adapt import adapt as run_adapt

    if strategy == config.AUTO:
        from edgetransfer.auto import AutoConfig, adapt_auto

        # the head is compared on each feature choice, unless --features names one
        kinds = (features,) if _given(ctx, ["features"]) else config.AUTO_FEATURES
        auto = AutoConfig(budget=budget, head_features=kinds)
        run_adapt = functools.partial(adapt_auto, auto=auto)
    res = run_adapt(
        AdaptConfig(
            data_dir=data_dir,
            out=out,
            arch=arch,
            weights=weights,
            strategy=strategy,
            epochs=epochs,
            batch_size=batch_size,
            accumulate=accumulate,
            lr=lr,
            backbone_lr_mult=backbone_lr_mult,
            unfreeze=unfreeze,
            train_bn=train_bn,
            l2sp=l2sp,
            teacher=teacher,
            kd_alpha=kd_alpha,
            kd_temperature=kd_temperature,
            truncate=truncate,
            features=features,
            keep_source_head=keep_source_head,
            source_data=source_data,
            lwf=lwf,
            augment=augment,
            views=views,
            balance=balance,
            patience=patience,
            head_solver=head_solver,
            image_size=image_size,
            val_fraction=val_fraction,
            seed=seed,
            max_bad=max_bad,
            max_pixels=max_pixels,
            max_memory=max_memory,
            workers=workers,
            backend=backend,
            force=force,
            resume=resume,
            use_cache=not no_cache,
            progress=_progress(quiet or as_json),
            report=not no_report,
            baseline=baseline,
        )
    )
    if as_json:
        _emit_json(res.manifest.to_dict())
        return
    m = res.manifest
    click.echo(
        f"adapted {m.arch} ({m.adapt['strategy']}) to {len(m.labels)} classes "
        f"({', '.join(m.labels)})"
    )
    click.echo(
        f"memory estimate {res.memory['total_mib']:.0f} MiB at batch "
        f"{m.adapt['batch_size']} x {m.adapt['accumulate']}; "
        f"{m.adapt['trainable_params']:,} trainable parameters"
    )
    click.echo(
        f"train {m.data['train']} / val {m.data['val']} images, best epoch "
        f"{m.adapt['best_epoch']} of {m.adapt['epochs_run']}: val top-1 "
        f"{m.metrics['val_top1']:.1%}"
    )
    if "auto" in m.adapt:
        _echo_auto(m.adapt["auto"])
    if "source_top1_before" in m.metrics:
        click.echo(
            f"source task top-1: {m.metrics['source_top1_before']:.1%} before, "
            f"{m.metrics['source_top1_after']:.1%} after"
        )
    if m.baseline:
        from edgetransfer.report import baseline_verdict

        click.echo(f"baseline: {baseline_verdict(m.baseline)[1]}")
    if res.bad_files:
        click.echo(
            f"skipped {len(res.bad_files)} unreadable image(s), listed in "
            f"{res.run_dir / 'bad_files.txt'}",
            err=True,
        )
    for note in res.notes:
        click.echo(note, err=True)
    click.echo(f"wrote {res.run_dir}")


# adapt's options that a head on a bundle's features does not take: each needs PyTorch
_NOT_WITH_BUNDLE = (
    "arch",
    "weights",
    "image_size",
    "unfreeze",
    "train_bn",
    "backbone_lr_mult",
    "l2sp",
    "teacher",
    "kd_alpha",
    "kd_temperature",
    "truncate",
    "features",
    "keep_source_head",
    "source_data",
    "lwf",
    "augment",
    "views",
    "accumulate",
    "head_solver",
    "max_memory",
    "backend",
    "resume",
    "batch_size",
    "lr",
    "no_report",
    "baseline",
)
# ... of which a run on the cached bundle takes these: they choose the bundle (arch, weights,
# image size), or the backend that may be onnxruntime (auto), or report.html (written from the
# head's validation logits)
_CHOOSE_CACHED_BUNDLE = ("arch", "weights", "image_size", "backend", "no_report")


def _given(ctx: click.Context, names) -> list[str]:
    """Those of `names` given on the command line (or by the environment), in order."""
    from click.core import ParameterSource

    return [
        name
        for name in names
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)
    ]


def _refuse_with_bundle(ctx: click.Context) -> None:
    """adapt --backbone: refuse what needs PyTorch, in one line."""
    if ctx.params["strategy"] != config.STRATEGY:
        raise click.UsageError(
            f"--strategy {ctx.params['strategy']} trains the backbone, which needs PyTorch; "
            "with --backbone FILE.onnx only --strategy head runs"
        )
    given = _given(ctx, _NOT_WITH_BUNDLE)
    if given:
        flag = next(p.opts[0] for p in ctx.command.params if p.name == given[0])
        raise click.UsageError(
            f"{flag} does not apply with --backbone FILE.onnx (the bundle fixes the "
            "architecture, weights and preprocessing; the head is fitted with full-batch L-BFGS)"
        )


def _cached_bundle(ctx: click.Context):
    """The bundle an earlier head run of these --arch, --weights and --image-size kept in the
    cache (bundlecache.lookup), when this run is one the bundle path does the same: --strategy
    head, --backend auto, the cache on, and none of the options only PyTorch takes. Else None
    (and the PyTorch path runs, as without a cache)."""
    p = ctx.params
    if (
        p["strategy"] != config.STRATEGY
        or p["backend"] != config.BACKEND
        or p["no_cache"]
        or _given(ctx, [n for n in _NOT_WITH_BUNDLE if n not in _CHOOSE_CACHED_BUNDLE])
    ):
        return None
    from edgetransfer.bundlecache import lookup

    return lookup(p["arch"], p["weights"], p["image_size"])


def _adapt_on_bundle(
    backbone: Path,
    options: dict,
    *,
    as_json: bool,
    weights: str | None = None,
    report: bool = False,
) -> None:
    """The device path (no torch import): a head on the bundle's features. `weights` (those the
    bundle was made from) go into run.json; with `report`, report.html is written from the
    head's validation logits."""
    from edgetransfer.device import BundleAdaptConfig, adapt_bundle

    res = adapt_bundle(BundleAdaptConfig(backbone=backbone, weights=weights, **options))
    notes = []
    if report:
        from edgetransfer.report import ReportUnavailable, write_run_report

        try:
            write_run_report(
                res.run_dir,
                data_dir=options["data_dir"],
                progress=options["progress"],
                val_logits=res.val_logits,
                bad=res.bad_files,
            )
        except ReportUnavailable as e:
            notes.append(f"no report.html: {e}")
    m = res.manifest
    if as_json:
        _emit_json(m.to_dict())
        return
    where = "the cached bundle" if weights is not None else f"the bundle {backbone.name}"
    click.echo(
        f"adapted {m.arch} (head on {where}) to {len(m.labels)} classes ({', '.join(m.labels)})"
    )
    click.echo(
        f"train {m.data['train']} / val {m.data['val']} images, best epoch "
        f"{m.adapt['best_epoch']} of {m.adapt['epochs_run']}: val top-1 "
        f"{m.metrics['val_top1']:.1%}"
    )
    if res.bad_files:
        click.echo(
            f"skipped {len(res.bad_files)} unreadable image(s), listed in "
            f"{res.run_dir / 'bad_files.txt'}",
            err=True,
        )
    for note in notes:
        click.echo(note, err=True)
    click.echo(f"wrote {res.run_dir}")


def _echo_auto(auto: dict) -> None:
    """The comparison --strategy auto made: one line per candidate, then how sure the pick is."""
    # "candidate" names a head's --features; manifests from before it name the strategy only
    names = [r.get("candidate", r["strategy"]) for r in auto["candidates"]]
    width = max(7, *map(len, names))
    for name, r in zip(names, auto["candidates"], strict=True):
        if "skipped" in r:
            click.echo(f"  auto: {name:<{width}} {r['skipped']}")
        else:
            click.echo(
                f"  auto: {name:<{width}} val top-1 {r['val_top1']:.1%} "
                f"({r['val_correct']}/{r['val_images']}, mean true-class probability "
                f"{r['val_true_prob']:.3f}), {r['schedule']} schedule "
                f"({r['epochs']} epochs), {r['seconds']:.1f} s"
                + (f", re-splits {r['resplit_top1']:.1%}" if "resplit_top1" in r else "")
            )
    # each part's own pick when the two met (alone, a part's pick is the run's, printed below);
    # manifests from before the re-splits have neither
    if "heads" in auto and "trainers" in auto:
        click.echo(f"  auto: the heads: {auto['heads']['pick']}")
        click.echo(f"  auto: the strategies that train: {auto['trainers']['pick']}")
    click.echo(f"auto picked {auto['pick']}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--onnx", "want_onnx", is_flag=True, help="model.onnx (normalised float input).")
@click.option("--torchscript", "want_ts", is_flag=True, help="model.pt (traced TorchScript).")
@click.option("--raw", "want_raw", is_flag=True, help="model.raw.onnx (uint8 NHWC pixels in).")
@click.option("--pt2", "want_pt2", is_flag=True, help="model.pt2 (torch.export program).")
@click.option("--int8", "want_int8", is_flag=True, help="model.int8.onnx (static QDQ int8).")
@click.option("--fp16", "want_fp16", is_flag=True, help="model.fp16.onnx (fp16 weights).")
@click.option("--optimize", is_flag=True, help="model.opt.onnx (ORT EXTENDED optimisations).")
@click.option(
    "--executorch", is_flag=True, help="model.pte (ExecuTorch program, XNNPACK-delegated)."
)
@click.option(
    "--pte-max-batch",
    type=click.IntRange(min=1),
    default=config.PTE_MAX_BATCH,
    show_default=True,
    help="Largest batch model.pte accepts; its memory is planned for it when it loads.",
)
@click.option(
    "--exporter",
    type=click.Choice(config.EXPORTER_CHOICES),
    default=config.EXPORTER,
    show_default=True,
    help="torch.onnx exporter; auto tries dynamo, then torchscript if dynamo fails its checks.",
)
@click.option("--opset", type=click.IntRange(min=13), default=None, help="ONNX opset.")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="EXPORT_DIR to write [default: RUN_DIR/export].",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Images for golden/, calibration and the guard [default: the run's DATA_DIR].",
)
@click.option(
    "--golden",
    type=click.IntRange(min=0),
    default=config.GOLDEN,
    show_default=True,
    help="How many golden test vectors to write (0: none).",
)
@click.option(
    "--calib-size",
    type=click.IntRange(min=1),
    default=config.CALIB_SIZE,
    show_default=True,
    help="Training images used to calibrate int8.",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(0, 100),
    default=config.MAX_DROP * 100,  # shown in points, passed on as a fraction
    show_default=True,
    help="Top-1 points a quantised model may lose and still be recommended.",
)
@_threads_option("onnxruntime threads for the latency guard [default: all cores].")
@_force_option("EXPORT_DIR")
@_json_option("Print the files written and the export report as JSON.")
@_eager_weights_option(
    "build its PyTorch model for --torchscript, --pt2, --executorch, --int8, --fp16 and "
    "--optimize [default: the weights run.json records, or imagenet]."
)
def export(
    run_dir: Path,
    want_onnx: bool,
    want_ts: bool,
    want_raw: bool,
    want_pt2: bool,
    want_int8: bool,
    want_fp16: bool,
    optimize: bool,
    executorch: bool,
    pte_max_batch: int,
    exporter: str,
    opset: int | None,
    out: Path | None,
    data_dir: Path | None,
    golden: int,
    calib_size: int,
    max_drop: float,
    threads: int | None,
    force: bool,
    as_json: bool,
    eager_weights: str | None,
) -> None:
    """Export RUN_DIR for deployment; every file carries labels and preprocessing.

    With no format flag, model.onnx, model.pt and model.raw.onnx are written. Every ONNX file
    is checked against eager PyTorch at batch 1, 2 and 8. With --int8/--fp16/--optimize, top-1
    and batch-1 latency of each ONNX variant are measured on this machine and the fastest one
    within --max-drop is recommended (export.json). --executorch lowers the model to an
    XNNPACK-delegated ExecuTorch program, checked at batch 1, 2 and --pte-max-batch.

    \b
    Example:
      edgetransfer export run --onnx --torchscript --int8 --out deploy
      edgetransfer export run --onnx --executorch
    """
    from edgetransfer.device import is_bundle_run
    from edgetransfer.runs import eager_here

    out = out or Path(run_dir) / "export"
    torch_only = want_ts or want_pt2 or want_int8 or want_fp16 or optimize or executorch
    bundle_run = is_bundle_run(run_dir)
    if eager_weights is not None and not bundle_run:
        raise click.UsageError(
            "--eager-weights is for a run adapted on a backbone bundle; other runs keep their "
            "whole PyTorch model"
        )
    # A run on a bundle exports without torch, unless it is asked for a PyTorch format, for
    # eager parity (--eager-weights), or it ran on the cached bundle where PyTorch is installed:
    # then its eager model (runs.load_run: the recorded weights and the head) exports what a
    # PyTorch run would, model.pt included.
    with_torch = torch_only or eager_weights is not None
    if bundle_run and not (with_torch or eager_here(run_dir)):  # the bundle and head composed
        from edgetransfer.device import export_bundle

        both = not (want_onnx or want_raw)
        res = export_bundle(
            run_dir,
            out,
            onnx=want_onnx or both,
            raw=want_raw or both,
            force=force,
            data_dir=data_dir,
            golden=golden,
        )
    else:
        from edgetransfer.export import ExportConfig
        from edgetransfer.export import export as run_export

        default = not (want_onnx or want_raw or torch_only)
        res = run_export(
            ExportConfig(
                run_dir=run_dir,
                out=out,
                onnx=want_onnx or default,
                torchscript=want_ts or default,
                raw=want_raw or default,
                pt2=want_pt2,
                int8=want_int8,
                fp16=want_fp16,
                optimize=optimize,
                executorch=executorch,
                pte_max_batch=pte_max_batch,
                exporter=exporter,
                opset=opset,
                force=force,
                data_dir=data_dir,
                golden=golden,
                calib_size=calib_size,
                max_drop=max_drop / 100,
                threads=threads,
                source_weights=eager_weights,
            )
        )
    _print_export(res, as_json)


def _print_export(res, as_json: bool) -> None:
    if as_json:
        _emit_json({"out": str(res.out), "files": [str(f) for f in res.files], **res.report})
        return
    for f in res.files:
        size = sum(p.stat().st_size for p in f.rglob("*")) if f.is_dir() else f.stat().st_size
        click.echo(f"wrote {f} ({size / 1024:.0f} KiB)")
    et = res.report.get("executorch")
    if et:
        low, high = et["batch"]
        click.echo(
            f"model.pte: XNNPACK runs {et['delegated_nodes']} of "
            f"{et['delegated_nodes'] + et['outside_nodes']} nodes "
            f"({', '.join(et['outside_ops']) or 'none'} outside); batch "
            + (f"{low}..{high}" if low != high else f"fixed at {low}")
        )
    for kind in ("int8", "pte_int8"):
        q = res.report.get(kind)
        if q and q["kept_float"]:
            layers = ", ".join(f"{k['layer']} (cost {k['cost']:g})" for k in q["kept_float"])
            click.echo(
                f"{res.report['artifacts'][kind]['file']}: kept in float {layers}; top-1 drop "
                f"{q['steps'][0]['top1_drop']:.1%} -> {q['top1_drop']:.1%}"
            )
    guard = res.report.get("guard")
    if guard:
        click.echo(f"{'artifact':<18} {'top1':>7} {'drop':>6} {'p50 ms':>8}")
        for r in guard["artifacts"].values():
            click.echo(
                f"{r['file']:<18} {r['top1']:>7.1%} {r['top1_drop']:>6.1%} "
                f"{r['latency_ms_p50']:>8.3f}"
            )
    for note in res.notes:
        click.echo(note, err=True)


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    required=True,
    help="DATA_DIR with real images (its validation split is used).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most N images.")
@_batch_size_option(config.VERIFY_BATCH_SIZE)
@click.option(
    "--atol", type=float, default=config.ATOL, show_default=True, help="Absolute tolerance."
)
@click.option(
    "--rtol", type=float, default=config.RTOL, show_default=True, help="Relative tolerance."
)
@_threads_option("onnxruntime and ExecuTorch threads [default: all cores].")
@_json_option("Print parity.json to stdout.")
@_trust_torchscript_option
@_eager_weights_option(
    "also compare with eager PyTorch (that architecture with these weights and the run's head)."
)
def verify(
    export_dir: Path,
    data_dir: Path,
    limit: int | None,
    batch_size: int,
    atol: float,
    rtol: float,
    threads: int | None,
    as_json: bool,
    trust_torchscript: bool,
    eager_weights: str | None,
) -> None:
    """Prove that every exported file answers like eager PyTorch on real images.

    fp32 runtimes (TorchScript, .pt2, ONNX, raw-pixel, optimised, ExecuTorch .pte) are
    compared elementwise (|a-b| <= atol + rtol*|b|) with 100% top-1 agreement; int8/fp16 by
    their top-1 drop (at most export's --max-drop, or one image under 100 images). Writes
    EXPORT_DIR/parity.json; exits with 1 when an fp32 runtime fails, 3 when only a quantised
    model misses its accuracy bound. model.pt (TorchScript) and model.pt2 can run code when
    loaded: they are skipped unless --trust-torchscript is given, which is for folders you
    exported or trust. model.pte holds no code and is always run.

    \b
    Example:
      edgetransfer verify run/export --data photos/
    """
    from edgetransfer.device import is_bundle_run

    if is_bundle_run(export_dir):  # no torch: the bundle's features through the numpy head
        from edgetransfer.device import verify_bundle

        eager = None
        if eager_weights is not None:  # the one case that imports torch
            from edgetransfer.bundler import eager_of_export

            eager = eager_of_export(export_dir, eager_weights)
        report = verify_bundle(
            export_dir,
            data_dir,
            limit=limit,
            batch_size=batch_size,
            atol=atol,
            rtol=rtol,
            threads=threads,
            eager=eager,
        )
        reference = "the backbone bundle's features through the numpy head"
    else:
        if eager_weights is not None:
            raise click.UsageError(
                "--eager-weights is for a run adapted on a backbone bundle; other runs are "
                "always compared with eager PyTorch"
            )
        from edgetransfer import verify as v

        report = v.verify(
            export_dir,
            data_dir,
            limit=limit,
            batch_size=batch_size,
            atol=atol,
            rtol=rtol,
            threads=threads,
            trust_torchscript=trust_torchscript,
        )
        reference = "eager PyTorch"
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(f"{report.images} images, reference: {reference}")
        click.echo(report.table())
        if report.written:
            click.echo(f"wrote {report.written}")
    report.raise_for_failures()
    if not as_json:
        click.echo("parity: PASS")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True)
@click.option("--topk", type=click.IntRange(min=1), default=3, show_default=True)
@_json_option("One JSON object per image (JSON Lines).")
@_provider_option
@_threads_option()
@_batch_size_option(config.INFER_BATCH_SIZE)
@_quiet_option
def predict(
    model: Path,
    images: tuple[str, ...],
    topk: int,
    as_json: bool,
    provider: str,
    threads: int | None,
    batch_size: int,
    quiet: bool,
) -> None:
    """Classify IMAGES (files, folders or globs) with MODEL.

    MODEL is a .onnx file (onnxruntime), a .pte file (ExecuTorch), a .pt (TorchScript) or .pt2
    file, an EXPORT_DIR (its model.onnx) or a RUN_DIR (the eager PyTorch model). Labels and
    preprocessing come from the model itself. TorchScript files are code: run only models you
    exported or trust.

    \b
    Example:
      edgetransfer predict run/export/model.onnx photos/cat/*.jpg --topk 3
    """
    from edgetransfer.runtime import collect_images, load_predictor

    clf = load_predictor(model, provider=provider, threads=threads)
    paths = collect_images(list(images))
    skipped: list[tuple[str, str]] = []
    preds = clf.predict(
        paths, topk=topk, batch_size=batch_size, progress=_progress(quiet), skipped=skipped
    )
    if not preds and len(skipped) == 1:
        raise EdgeTransferError(skipped[0][1])  # the one image named: its own error
    for path, reason in skipped:  # listed, as adapt and evaluate list theirs
        # the reason starts with the file's name as DataError prints it (printable)
        why = reason.removeprefix(printable(Path(path).name) + ": ")
        click.echo(f"skipped unreadable {printable(path)}: {why}", err=True)
    if not preds:
        raise EdgeTransferError(f"none of the {len(paths)} images could be read")
    if as_json:
        for p in preds:
            top = [{"label": lb, "prob": round(pr, 6)} for lb, pr in p.topk]
            click.echo(json.dumps({"path": p.path, "topk": top}))
        return
    width = max(len(p.path) for p in preds) + 1
    label_w = max(len(lb) for lb in clf.manifest.labels)
    for p in preds:
        best = "  ".join(f"{lb:<{label_w}} {pr:>6.1%}" for lb, pr in p.topk)
        click.echo(f"{p.path + ':':<{width}} {best}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option(
    "--split",
    type=click.Choice(config.SPLITS),
    default=config.SPLIT,
    show_default=True,
    help="Which images of DATA_DIR, split as adapt split them.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Write an HTML report (confusion matrix, per-class table, mistakes) into this folder.",
)
@_force_option("--report folder")
@click.option(
    "--mistakes",
    type=click.IntRange(min=0),
    default=config.MISTAKES,
    show_default=True,
    help="Most confident mistakes to list in --json and show in the report.",
)
@_provider_option
@_threads_option()
@_batch_size_option(config.INFER_BATCH_SIZE)
@_json_option("Print the metrics as JSON.")
@_quiet_option
def evaluate(
    model: Path,
    data_dir: Path,
    split: str,
    report_dir: Path | None,
    force: bool,
    mistakes: int,
    provider: str,
    threads: int | None,
    batch_size: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Measure MODEL on DATA_DIR: top-1, top-5, per-class precision/recall/F1, confusion matrix.

    DATA_DIR has one sub-folder per class; folder names are matched to the model's labels by
    name. MODEL is anything predict accepts.

    \b
    Example:
      edgetransfer evaluate run/export photos/ --report eval-report
    """
    from edgetransfer.evaluate import evaluate as run_evaluate

    if report_dir is not None:
        from edgetransfer.fileio import check_can_write
        from edgetransfer.report import require_matplotlib

        require_matplotlib()  # fail before the work, not after it
        check_can_write(report_dir, force, (model, data_dir))
    res = run_evaluate(
        model,
        data_dir,
        split=split,
        batch_size=batch_size,
        threads=threads,
        provider=provider,
        progress=_progress(quiet or as_json),
    )
    index = None
    if report_dir is not None:
        from edgetransfer.report import write_eval_report

        index = write_eval_report(res, report_dir, force=force, mistakes=mistakes)
    if as_json:
        _emit_json({**res.to_dict(mistakes), "report": str(index) if index else None})
        return
    m = res.metrics
    click.echo(f"{m.images} images of {data_dir} (split {split})")
    click.echo(f"top-1 {m.top1:.1%}   top-{m.top5_k} {m.top5:.1%}   macro F1 {m.macro_f1:.1%}")
    w = max(5, *(len(lb) for lb in m.labels))
    click.echo(f"{'class':<{w}} {'images':>6} {'precision':>9} {'recall':>7} {'F1':>7}")
    for label, c in m.per_class.items():
        click.echo(f"{label:<{w}} {c.support:>6} {c.precision:>9.1%} {c.recall:>7.1%} {c.f1:>7.1%}")
    click.echo("confusion matrix (rows: true, columns: predicted)")
    cw = max(4, *(len(lb) for lb in m.labels), len(str(int(m.confusion.max()))))
    click.echo(" " * w + "".join(f" {lb:>{cw}}" for lb in m.labels))
    for label, row in zip(m.labels, m.confusion, strict=True):
        click.echo(f"{label:<{w}}" + "".join(f" {v:>{cw}}" for v in row))
    if res.skipped:
        click.echo(f"skipped {len(res.skipped)} unreadable image(s): {res.skipped[0][1]}", err=True)
    if index:
        click.echo(f"wrote {index}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=config.BENCH_RUNS,
    show_default=True,
    help="Timed runs.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=config.BENCH_WARMUP,
    show_default=True,
    help="Untimed runs.",
)
@_batch_size_option(
    config.BENCH_BATCH_SIZE,
    help="Batch size for the throughput measurement (latency is at batch 1).",
)
@_threads_option()
@_provider_option
@_trust_torchscript_option
@_json_option("Print the measurements as JSON.")
@_quiet_option
def bench(
    model: Path,
    runs: int,
    warmup: int,
    batch_size: int,
    threads: int | None,
    provider: str,
    trust_torchscript: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Time every runtime of MODEL on this machine: latency, throughput, peak memory.

    For an EXPORT_DIR every file present is measured (eager from model.safetensors,
    ONNX fp32/raw/opt/int8/fp16, ExecuTorch model.pte, and with --trust-torchscript model.pt
    and model.pt2, which can run code when loaded); for a single file, that file. Each runtime
    runs in its own process, so its peak RSS is its own. Speed-ups are against ONNX fp32 (or eager)
    measured in the same run.

    \b
    Example:
      edgetransfer bench run/export --threads 2 --runs 100
    """
    from edgetransfer.bench import BenchConfig
    from edgetransfer.bench import bench as run_bench

    report = run_bench(
        BenchConfig(
            model=model,
            runs=runs,
            warmup=warmup,
            batch_size=batch_size,
            threads=threads,
            provider=provider,
            trust_torchscript=trust_torchscript,
        ),
        progress=_progress(quiet or as_json),
    )
    if as_json:
        _emit_json(report.to_dict())
    else:
        click.echo(report.table())
    report.raise_for_failures()


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@_json_option("Print the description as JSON.")
def info(path: Path, as_json: bool) -> None:
    """Describe an artifact or folder: manifest, inputs/outputs, size, sha256, parity.

    PATH is a .onnx, .pte, .pt, .pt2 or .safetensors file, a RUN_DIR or an EXPORT_DIR.
    TorchScript and .pt2 files are read as archives and .pte programs as flatbuffers: no model
    code is loaded.

    \b
    Example:
      edgetransfer info run/export
    """
    from edgetransfer.info import describe

    d = describe(path)
    if as_json:
        _emit_json(d)
        return
    m = d["manifest"]
    if m["adapt"].get("kind") == "backbone":  # bundle.KIND; a bundle answers features
        click.echo(
            f"backbone bundle of {m['arch']}: {m['adapt'].get('feature_dim')} features; "
            f"source head of {len(m['labels'])} classes"
        )
    click.echo(
        f"{m['arch']}: {len(m['labels'])} classes ({', '.join(m['labels'][:10])}"
        f"{', ...' if len(m['labels']) > 10 else ''})"
    )
    pre = m["preprocessing"]
    click.echo(
        f"input {pre['input_size'][0]}x{pre['input_size'][1]} RGB, resize {pre['resize']}, "
        f"mean {pre['mean']}, std {pre['std']}"
    )
    for f in d["files"]:
        click.echo(f"{f['file']:<20} {f['bytes'] / 1024:>9.0f} KiB  sha256 {f['sha256'][:16]}…")
        for io_kind in ("inputs", "outputs"):
            for t in f.get(io_kind, []):
                click.echo(f"    {io_kind[:-1]:<6} {t['name']:<8} {t['dtype']:<8} {t['shape']}")
        if f.get("batch"):
            low, high = f["batch"]
            click.echo(f"    batch  {low}..{high}" if low != high else f"    batch  fixed at {low}")
        if "delegated_share" in f:
            outside = ", ".join(f["kernel_ops"]) or "-"
            click.echo(
                f"    XNNPACK runs {f['delegate_calls']} delegate call(s); "
                f"{f['kernel_calls']} kernel call(s) outside it ({outside})"
            )
    if "parity" in d:
        status = "PASS" if d["parity"]["passed"] else "FAIL"
        click.echo(
            f"parity: {status} on {d['parity']['images']} images "
            f"({', '.join(d['parity']['runtimes'])})"
        )
    if "recommended" in d:
        click.echo(f"recommended: {d['recommended']}")


@cli.command()
@click.argument("arch")
@click.option(
    "--weights",
    default=config.WEIGHTS,
    show_default=True,
    help="Source weights: imagenet, none, or a .safetensors / .pth state_dict file.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="The bundle to write [default: ARCH.backbone.onnx].",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Real images (class folders) the bundle is checked on against eager PyTorch "
    "[default: the shipped sample digits].",
)
@_image_size_option()
@_force_option("bundle")
@_json_option("Print the bundle's manifest as JSON.")
def backbone(
    arch: str,
    weights: str,
    out: Path | None,
    data_dir: Path | None,
    image_size: int | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write ARCH's frozen feature extractor as a backbone bundle (ONNX, manifest inside).

    Needs PyTorch; the bundle does not: `adapt DATA --backbone FILE.onnx` then adapts, exports
    and verifies with onnxruntime and numpy alone (e.g. on a device without PyTorch). The
    bundle outputs the features and the source head's logits, and is checked against eager
    PyTorch at batch 1, 2 and 8 and on real images before it is written.

    \b
    Example:
      edgetransfer backbone mobilenet_v3_small --out mnv3s.backbone.onnx
      edgetransfer backbone efficientnet_lite0 --image-size 112 --out lite0-112.onnx
    """
    from edgetransfer.bundler import write_bundle
    from edgetransfer.demo import sample_data

    res = write_bundle(
        arch,
        weights,
        out or Path(f"{arch}.backbone.onnx"),
        data_dir=data_dir or sample_data(),
        image_size=image_size,
        force=force,
    )
    if as_json:
        _emit_json({"path": str(res.path), "sha256": res.sha256, **res.manifest.to_dict()})
        return
    m = res.manifest
    click.echo(
        f"wrote {res.path} ({res.path.stat().st_size / 1024:.0f} KiB, sha256 {res.sha256[:16]}…)"
    )
    click.echo(
        f"{m.arch}: {m.adapt['feature_dim']} features, source head of {len(m.labels)} classes; "
        f"matches eager PyTorch on {res.checked_images} real images ({res.exporter} exporter)"
    )


@cli.command()
def archs() -> None:
    """List the registered architectures.

    \b
    Example:
      edgetransfer archs
    """
    from edgetransfer.backbones import ARCHS

    for spec in ARCHS.values():
        size = spec.preprocessing.input_size[0]
        weights = "imagenet" if spec.imagenet_weights else "file/none"
        click.echo(f"{spec.name:<20} {size:>4}px  {weights:<9}  {spec.description}")


@cli.command()
@click.argument("out_dir", type=click.Path(path_type=Path), default="edgetransfer-demo")
@click.option(
    "--source",
    type=click.Choice(config.DEMO_SOURCES),
    default=config.DEMO_SOURCE,
    show_default=True,
    help="imagenet: efficientnet_lite0 with ImageNet weights (the imagenet extra); digits: the "
    "shipped digits 0-4 model; device: its backbone bundle, without PyTorch; auto: imagenet when "
    "installed, else digits, else (no PyTorch) device, with a note.",
)
@_force_option("OUT_DIR")
@_quiet_option
def demo(out_dir: Path, source: str, force: bool, quiet: bool) -> None:
    """Adapt a pretrained backbone to the shipped digits 5-9 beside the same network trained
    from scratch, then export -> verify -> predict held-out images, offline.

    Of the 40 shipped images per class, 20 train, 10 validate and 10 are held out: the
    predictions are on those. Without PyTorch (a core install) the demo runs on the shipped
    backbone bundle of the digits model, with onnxruntime and numpy alone.

    \b
    Example:
      edgetransfer demo /tmp/et-demo
    """
    from edgetransfer.demo import TRAIN, VAL, pick_source, run_demo, sample_data

    src = pick_source(source)
    if src.note:
        click.echo(src.note)
    what = {
        "imagenet": f"{src.arch}, ImageNet weights, at {src.image_size} px, the head on "
        f"--features {src.features}",
        "digits": f"{src.arch}, the shipped digits 0-4 model ({Path(src.weights).name})",
        "device": f"{src.arch}, the shipped digits 0-4 model's bundle ({Path(src.weights).name})",
    }[src.name]
    click.echo(f"source model: {what}")
    click.echo(
        f"target data:  {sample_data()}: {TRAIN} training + {VAL} validation images per class, "
        "the rest held out"
    )
    res = run_demo(out_dir, force=force, progress=_progress(quiet), source=src.name)
    m, b = res.manifest, res.manifest.baseline
    if b:  # (report renders with the torch floors below it; the device path has no baseline)
        from edgetransfer.report import baseline_verdict

        click.echo(
            f"adapted ({m.adapt['strategy']}, source weights):  val top-1 "
            f"{b['pretrained_val_top1']:.1%} in {b['seconds']['pretrained']:.1f} s   "
            f"run: {res.run_dir}"
        )
        click.echo(
            f"from scratch ({b['strategy']}, random weights): val top-1 "
            f"{b['scratch_val_top1']:.1%} in {b['seconds']['scratch']:.1f} s (same images, "
            f"{b['epochs']} epochs, batch {b['batch_size']}; best epoch {b['best_epoch']}: short "
            "for a network from scratch)"
        )
        click.echo(baseline_verdict(b)[1])
    else:
        click.echo(
            f"adapted (head on the bundle): val top-1 {m.metrics['val_top1']:.1%}   "
            f"run: {res.run_dir}"
        )
    if res.source_top1:
        before, after = res.source_top1
        click.echo(f"source task (digits 0-4) top-1: {before:.1%} before, {after:.1%} after")
    files = "backbone.onnx, head.safetensors" if src.name == "device" else "model.pt"
    click.echo(
        f"exported: {res.export_dir} (model.onnx, model.raw.onnx, {files}, golden/, "
        "labels.txt, edgetransfer.json)"
    )
    click.echo(res.parity_table)
    click.echo(
        f"held out (neither run saw them): {res.held_out_right} of {res.held_out} right "
        f"({res.held_out_right / res.held_out:.1%})"
    )
    for p in res.predictions:
        click.echo(
            f"predict {Path(p.path).parent.name}/{Path(p.path).name}: {p.topk[0][0]} "
            f"{p.topk[0][1]:.1%}"
        )
    click.echo(f"parity: {'PASS' if res.parity_passed else 'FAIL'}")
    if not res.parity_passed:
        raise SystemExit(1)


def main() -> None:
    cli(prog_name="edgetransfer")
