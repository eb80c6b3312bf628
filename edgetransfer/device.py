"""The device path: adapt, export and verify on a backbone bundle with numpy and onnxruntime
alone (no torch import), for a machine where PyTorch is missing or slow to start.

adapt_bundle: the bundle's features (bundle.extract), a head fitted by headfit, and a RUN_DIR
holding the head (head.safetensors) and naming the bundle by its sha256 (the manifest) and its
place on this machine (run.json). export_bundle: model.onnx and model.raw.onnx composed with the
onnx library, checked at batch 1, 2 and 8 against the reference — the bundle's features through
the numpy head — and golden/ from the same reference. verify_bundle: every ONNX artifact against
that reference on real images, judged by parity as for the torch path.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetransfer import config
from edgetransfer.bundle import Bundle, compose, extract, head_logits, open_bundle
from edgetransfer.data import (
    check_bad,
    load_image,
    normalize,
    relabel,
    resize_crop,
    run_data_dir,
    run_split,
    scan,
    train_val,
)
from edgetransfer.errors import DataError, EdgeTransferError, ExportError, ManifestError
from edgetransfer.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    check_can_write,
    output_dir,
    sha256_file,
)
from edgetransfer.golden import GOLDEN_DIR, write_golden
from edgetransfer.headfit import HEAD_L2, balanced_class_weights, fit_head
from edgetransfer.manifest import (
    ARTIFACTS,
    EXPORT_REPORT,
    MANIFEST_NAME,
    METADATA_KEY,
    RUN_INFO,
    Manifest,
    raw_manifest,
    read_manifest,
    versions,
)
from edgetransfer.onnxio import finish_proto, open_session
from edgetransfer.parity import (
    ATOL,
    CHECK_BATCHES,
    RTOL,
    Outputs,
    ParityReport,
    judge,
    recorded_check,
    require_close,
    write_parity,
)

# the one strategy a bundle run takes (its head on the bundle's features)
BUNDLE_STRATEGY = "head"


def bundle_of(manifest: Manifest) -> dict | None:
    """The bundle a run was adapted on ({"bundle", "sha256", "feature_dim"}), or None for a
    run adapted with PyTorch."""
    b = manifest.adapt.get("backbone")
    return b if isinstance(b, dict) and isinstance(b.get("sha256"), str) else None


def is_bundle_run(path: str | os.PathLike) -> bool:
    """Whether `path` (a RUN_DIR or EXPORT_DIR) holds a model adapted on a backbone bundle as
    the bundle and a head, without PyTorch weights: what this module exports and verifies. (An
    EXPORT_DIR the PyTorch path made from such a run has model.safetensors: it is not.)"""
    try:
        manifest = read_manifest(path)
    except EdgeTransferError:
        return False
    return bundle_of(manifest) is not None and not (Path(path) / ARTIFACTS["weights"]).exists()


# ---------------------------------------------------------------------------------------------
# adapt


@dataclass(frozen=True)
class BundleAdaptConfig:
    """adapt --backbone FILE.onnx: the options that apply to a head on a bundle's features
    (AdaptConfig's meanings and defaults)."""

    data_dir: Path
    out: Path
    backbone: Path
    epochs: int = config.EPOCHS
    patience: int = config.PATIENCE
    balance: bool = False
    val_fraction: float = config.VAL_FRACTION
    seed: int = config.SEED
    max_bad: float = config.MAX_BAD
    max_pixels: int | None = None
    workers: int = config.WORKERS
    force: bool = False
    use_cache: bool = True
    progress: bool = False
    # the --weights the bundle was made from, when known (a bundle from the cache): recorded in
    # run.json so the run's eager model can be rebuilt (runs.load_run)
    weights: str | None = None


@dataclass(frozen=True)
class BundleAdaptResult:
    run_dir: Path
    manifest: Manifest
    bad_files: list[tuple[Path, str]]
    timings: dict[str, float] = field(default_factory=dict)
    features_cached: bool = False
    val_logits: np.ndarray | None = None  # the kept head's, row i for validation sample i


def adapt_bundle(cfg: BundleAdaptConfig) -> BundleAdaptResult:
    """Fit a new head on the bundle's features of DATA_DIR and write RUN_DIR."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    inputs = [cfg.data_dir, cfg.backbone]
    check_can_write(cfg.out, cfg.force, inputs)
    bundle = open_bundle(cfg.backbone)
    dataset = scan(cfg.data_dir, cfg.val_fraction, cfg.seed)
    timings["prepare"] = time.perf_counter() - start
    start = time.perf_counter()
    feats = extract(
        bundle,
        dataset.samples,
        use_cache=cfg.use_cache,
        max_pixels=cfg.max_pixels,
        workers=cfg.workers or None,
        progress=cfg.progress,
    )
    check_bad(feats.bad, len(dataset.samples), cfg.max_bad)
    dataset = dataset.without([p for p, _ in feats.bad])
    train_s, val_s = train_val(dataset)
    timings["images"] = time.perf_counter() - start
    start = time.perf_counter()
    row = {s.path: i for i, s in enumerate(feats.samples)}
    x_train = feats.vectors[[row[s.path] for s in train_s]]
    x_val = feats.vectors[[row[s.path] for s in val_s]]
    y_train = np.array([s.label for s in train_s])
    y_val = np.array([s.label for s in val_s])
    classes = len(dataset.classes)
    fit = fit_head(
        x_train,
        y_train,
        x_val,
        y_val,
        classes=classes,
        l2=HEAD_L2,
        class_weights=balanced_class_weights(y_train, classes) if cfg.balance else None,
        epochs=cfg.epochs,
        patience=cfg.patience,
    )
    timings["train"] = timings["fit"] = time.perf_counter() - start
    manifest = _run_manifest(cfg, bundle, dataset, fit, len(train_s), len(val_s), len(feats.bad))
    start = time.perf_counter()
    with output_dir(cfg.out, cfg.force, inputs) as tmp:
        save_head(tmp / ARTIFACTS["head"], fit.weight, fit.bias, manifest)
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        atomic_write_text(tmp / "history.json", json.dumps(fit.history, indent=1) + "\n")
        run_info = {
            "data_dir": str(Path(cfg.data_dir).absolute()),
            "backbone": str(Path(cfg.backbone).absolute()),
            "stopped_early": fit.stopped_early,
        }
        if cfg.weights is not None:
            # a bundle from the cache, which a later run may replace and a user may delete:
            # the run keeps its own copy, named relative to the RUN_DIR
            shutil.copyfile(cfg.backbone, tmp / ARTIFACTS["bundle"])
            if sha256_file(tmp / ARTIFACTS["bundle"]) != bundle.sha256:
                raise ManifestError(
                    f"{cfg.backbone} changed while this run used it (another run replaced the "
                    "cached bundle); run the command again"
                )
            run_info["backbone"] = ARTIFACTS["bundle"]
            run_info["weights"] = cfg.weights
        atomic_write_text(tmp / RUN_INFO, json.dumps(run_info, indent=2) + "\n")
        if feats.bad:
            atomic_write_text(
                tmp / "bad_files.txt",
                "".join(f"{os.fsdecode(p)!r}\t{r}\n" for p, r in feats.bad),
            )
    timings["write"] = time.perf_counter() - start
    return BundleAdaptResult(
        Path(cfg.out), manifest, feats.bad, timings, feats.cached, fit.val_logits
    )


def _run_manifest(cfg, bundle: Bundle, dataset, fit, n_train: int, n_val: int, n_bad: int):
    """The run's manifest: the bundle's architecture, preprocessing and source, the head's
    training (as the torch path's head strategy records it), the bundle's sha256."""
    classes, dim = fit.weight.shape
    adapt = {
        "strategy": BUNDLE_STRATEGY,
        "epochs": cfg.epochs,
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history),
        "solver": "lbfgs",
        "l2": HEAD_L2,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "augment": "none",
        "views": 1,
        "trainable_params": classes * dim + classes,
        "backbone": {"bundle": bundle.path.name, "sha256": bundle.sha256, "feature_dim": dim},
    }
    if cfg.balance:
        adapt["balance"] = "class-weighted loss"
    return Manifest(
        arch=bundle.manifest.arch,
        labels=list(dataset.classes),
        preprocessing=bundle.manifest.preprocessing,
        source=dict(bundle.manifest.source),
        adapt=adapt,
        data={
            "fingerprint": dataset.fingerprint(),
            "classes": len(dataset.classes),
            "train": n_train,
            "val": n_val,
            "bad": n_bad,
        },
        metrics={"val_top1": round(fit.val_top1, 6), "val_loss": round(fit.val_loss, 6)},
        versions=versions(),
    )


def save_head(path: Path, weight: np.ndarray, bias: np.ndarray, manifest: Manifest) -> None:
    """The head as safetensors (numpy), with the manifest in the header metadata."""
    from safetensors.numpy import save

    tensors = {
        "head.weight": np.ascontiguousarray(weight, np.float32),
        "head.bias": np.ascontiguousarray(bias, np.float32),
    }
    atomic_write_bytes(path, save(tensors, metadata={METADATA_KEY: manifest.to_json()}))


def load_head(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of a head file, checked against the manifest's classes and
    feature size."""
    from safetensors.numpy import load_file

    try:
        t = load_file(str(path))
        weight, bias = t["head.weight"], t["head.bias"]
    except FileNotFoundError:
        raise ManifestError(
            f"{path.parent} has no {path.name}; is it from adapt --backbone?"
        ) from None
    except Exception as e:  # safetensors raises its own types; KeyError for a missing tensor
        raise ManifestError(f"{path} is not a readable head file: {e!r}") from None
    dim = bundle_of(manifest)["feature_dim"]
    if weight.shape != (len(manifest.labels), dim) or bias.shape != (len(manifest.labels),):
        raise ManifestError(
            f"{path.name} holds a head of shape {weight.shape}, not {len(manifest.labels)} "
            f"classes x {dim} features as its manifest says"
        )
    return weight, bias


def _run_bundle(run_dir: Path, manifest: Manifest) -> Bundle:
    """The bundle a RUN_DIR was adapted on: where run.json says, with the recorded sha256."""
    info = bundle_of(manifest)
    try:
        # absolute: the user's bundle (--backbone); relative: the run's own copy (a cached one)
        path = run_dir / json.loads((run_dir / RUN_INFO).read_text())["backbone"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ManifestError(f"{run_dir} does not say where its backbone bundle is") from None
    if not path.is_file():
        raise ManifestError(
            f"the backbone bundle {path} this run was adapted on is gone; put it back or adapt "
            "again"
        )
    bundle = open_bundle(path)
    if bundle.sha256 != info["sha256"]:
        raise ManifestError(
            f"{path} changed since this run was adapted on it (its sha256 differs); adapt again"
        )
    return bundle


# ---------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class BundleExportResult:
    out: Path
    files: list[Path]
    manifest: Manifest
    notes: list[str]
    report: dict


def export_bundle(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    onnx: bool = True,
    raw: bool = True,
    force: bool = False,
    data_dir: Path | None = None,
    golden: int = config.GOLDEN,
) -> BundleExportResult:
    """EXPORT_DIR for a run adapted on a bundle: model.onnx and model.raw.onnx (the bundle and
    the head composed), the bundle and the head beside them (verify's reference), golden/."""
    run_dir, out = Path(run_dir), Path(out)
    if not (onnx or raw):
        raise ExportError("nothing to export; pass --onnx or --raw")
    manifest = read_manifest(run_dir)
    if bundle_of(manifest) is None:
        raise ManifestError(f"{run_dir} was not adapted on a backbone bundle")
    data_dir = data_dir or run_data_dir(run_dir)
    inputs = [run_dir, data_dir]
    check_can_write(out, force, inputs)
    bundle = _run_bundle(run_dir, manifest)
    weight, bias = load_head(run_dir / ARTIFACTS["head"], manifest)
    notes: list[str] = []
    dataset = None
    if data_dir is not None:
        dataset = relabel(run_split(data_dir, manifest), manifest.labels)
    elif golden > 0:
        notes.append("no golden/ written: the run's data folder is gone; pass --data DATA_DIR")

    def reference(x: np.ndarray) -> np.ndarray:
        return head_logits(bundle.features(x), weight, bias)

    report: dict = {"exporter": "onnx.compose", "artifacts": {}, "notes": notes}
    p = manifest.preprocessing
    with output_dir(out, force, inputs) as tmp:
        for kind, wanted in (("onnx", onnx), ("raw", raw)):
            if not wanted:
                continue
            path = tmp / ARTIFACTS[kind]
            proto = compose(bundle.path, weight, bias, p, raw=kind == "raw")
            finish_proto(proto, path, raw_manifest(manifest) if kind == "raw" else manifest)
            _check_batches(path, reference, p, raw=kind == "raw")
        shutil.copyfile(bundle.path, tmp / ARTIFACTS["bundle"])
        shutil.copyfile(run_dir / ARTIFACTS["head"], tmp / ARTIFACTS["head"])
        atomic_write_text(tmp / "labels.txt", "".join(f"{label}\n" for label in manifest.labels))
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        if dataset is not None and golden > 0:
            write_golden(reference, manifest, dataset.samples, tmp / GOLDEN_DIR, golden)
        for kind in ("onnx", "raw"):
            f = tmp / ARTIFACTS[kind]
            if f.is_file():
                report["artifacts"][kind] = {
                    "file": f.name,
                    "bytes": f.stat().st_size,
                    "sha256": sha256_file(f),
                }
        atomic_write_text(tmp / EXPORT_REPORT, json.dumps(report, indent=2) + "\n")
        files = sorted(f.name for f in tmp.iterdir())
    return BundleExportResult(out, [out / f for f in files], manifest, notes, report)


def _check_batches(path: Path, reference, p, raw: bool) -> None:
    """`path` under onnxruntime at batch 1, 2 and 8 against the reference on the same inputs
    (random normalised tensors, or random pixels for the raw model)."""
    session = open_session(path)
    name = session.get_inputs()[0].name
    rng = np.random.default_rng(1)
    h, w = p.input_size
    for batch in CHECK_BATCHES:
        if raw:
            pixels = rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
            feed, x = pixels, normalize(pixels, p)
        else:
            feed = x = rng.standard_normal((batch, 3, h, w), dtype=np.float32)
        try:
            got = session.run(["logits"], {name: feed})
        except Exception as e:  # ORT shape errors: the batch dimension is not really dynamic
            raise ExportError(f"{path.name} fails at batch {batch}: {e}") from None
        require_close(got, [reference(x)], path.name, batch)


# ---------------------------------------------------------------------------------------------
# verify


def verify_bundle(
    export_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    batch_size: int = config.VERIFY_BATCH_SIZE,
    atol: float = ATOL,
    rtol: float = RTOL,
    write: bool = True,
    threads: int | None = None,
    eager: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ParityReport:
    """Every ONNX model in an EXPORT_DIR of a bundle run against the reference (the bundle's
    features through the numpy head) on the validation images of `data_dir`.

    Args:
        eager: the run's model in eager PyTorch (bundler.eager_head_logits), float32 NCHW ->
            logits; when given, it is judged against the reference like an exported model,
            which ties every artifact to eager PyTorch too. This module never imports torch.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    info = bundle_of(manifest)
    if info is None:
        raise ManifestError(f"{export_dir} was not exported from a run adapted on a bundle")
    bundle = open_bundle(export_dir / ARTIFACTS["bundle"], threads)
    if bundle.sha256 != info["sha256"]:
        raise ManifestError(
            f"{export_dir / ARTIFACTS['bundle']} is not the bundle the run was adapted on "
            "(its sha256 differs)"
        )
    weight, bias = load_head(export_dir / ARTIFACTS["head"], manifest)
    dataset = run_split(data_dir, manifest)
    p = manifest.preprocessing
    samples = dataset.split("val") or dataset.samples
    split_images = len(samples)
    if limit and limit < len(samples):
        samples = sorted(random.Random(0).sample(samples, limit), key=lambda s: str(s.path))
    pixels, kept = [], []
    for s in samples:
        try:
            pixels.append(np.asarray(resize_crop(load_image(s.path), p), dtype=np.uint8))
        except DataError:
            continue
        kept.append(s)
    if not kept:
        raise DataError(f"no readable validation images in {data_dir}")
    pixels_all = np.stack(pixels)
    tensors = normalize(pixels_all, p)
    names = [s.path.name for s in kept]
    truth = None
    if set(dataset.classes) <= set(manifest.labels):
        by_name = {c: i for i, c in enumerate(manifest.labels)}
        truth = np.array([by_name[dataset.classes[s.label]] for s in kept])
    ref = Outputs(
        np.concatenate(
            [
                head_logits(bundle.features(tensors[i : i + batch_size]), weight, bias)
                for i in range(0, len(tensors), batch_size)
            ]
        )
    )
    report = ParityReport(export_dir, len(kept), atol, rtol, reference="bundle")
    outputs = {}
    for runtime, kind in (("onnxruntime", "onnx"), ("raw", "raw")):
        path = export_dir / ARTIFACTS[kind]
        if path.is_file():
            x = pixels_all if kind == "raw" else tensors
            outputs[runtime] = _onnx_outputs(path, x, batch_size, threads)
    if eager is not None:
        outputs["eager"] = Outputs(
            np.concatenate(
                [eager(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
            )
        )
    for runtime, got in outputs.items():
        report.runtimes.append(
            judge(
                runtime,
                got,
                ref,
                names,
                kind="exact",
                labels=manifest.labels,
                truth=truth,
                atol=atol,
                rtol=rtol,
            )
        )
    if truth is not None:
        report.eager_top1 = float((ref.logits.argmax(1) == truth).mean())
    report.recorded = recorded_check(manifest, dataset, report.eager_top1, len(kept), split_images)
    if write:
        report.written = write_parity(report)
    return report


def _onnx_outputs(path: Path, x: np.ndarray, batch_size: int, threads: int | None) -> Outputs:
    session = open_session(path, threads)
    name = session.get_inputs()[0].name
    have = [o.name for o in session.get_outputs()]
    wanted = ["probs", "logits"] if "probs" in have else ["logits"]
    parts = [
        session.run(wanted, {name: x[i : i + batch_size]}) for i in range(0, len(x), batch_size)
    ]
    joined = [np.concatenate([part[k] for part in parts]) for k in range(len(wanted))]
    if len(wanted) == 2:
        return Outputs(joined[1], None, joined[0])
    return Outputs(joined[0])
