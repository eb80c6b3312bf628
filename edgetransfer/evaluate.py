"""Accuracy of a model on a labelled folder: top-1/top-5, per-class P/R/F1, confusion matrix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from edgetransfer import config
from edgetransfer.data import load_image, run_split, softmax
from edgetransfer.errors import DataError
from edgetransfer.manifest import Manifest
from edgetransfer.runtime import TorchClassifier, load_predictor

SPLITS = config.SPLITS
TOPK = 5


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int  # images of this class in the data


@dataclass(frozen=True)
class Metrics:
    """Metrics over N images; rows of `confusion` are the true class, columns the prediction."""

    labels: list[str]
    confusion: np.ndarray  # [C, C] int64
    top1: float
    top5: float
    top5_k: int  # k actually used: min(5, number of classes)
    per_class: dict[str, ClassMetrics]

    @property
    def images(self) -> int:
        return int(self.confusion.sum())

    @property
    def macro_f1(self) -> float:
        """Mean F1 over the classes that occur in the data."""
        present = [m.f1 for m in self.per_class.values() if m.support]
        return float(np.mean(present)) if present else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "top1": round(self.top1, 6),
            "top5": round(self.top5, 6),
            "top5_k": self.top5_k,
            "macro_f1": round(self.macro_f1, 6),
            "per_class": {
                label: {
                    "precision": round(m.precision, 6),
                    "recall": round(m.recall, 6),
                    "f1": round(m.f1, 6),
                    "support": m.support,
                }
                for label, m in self.per_class.items()
            },
            "confusion": {"labels": list(self.labels), "matrix": self.confusion.tolist()},
        }


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """[classes, classes] counts; row = true class, column = predicted class."""
    cm = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(truth, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def compute_metrics(scores: np.ndarray, truth: np.ndarray, labels: list[str]) -> Metrics:
    """Metrics from per-image scores (logits or probabilities, [N, C]) and true indices [N].

    A class never predicted has precision 0 (as scikit-learn's zero_division=0), so an unused
    label drags macro F1 down instead of raising.
    """
    scores = np.asarray(scores)
    truth = np.asarray(truth, np.int64)
    if scores.ndim != 2 or scores.shape[1] != len(labels) or len(truth) != len(scores):
        raise ValueError(f"scores {scores.shape} do not match {len(truth)} labels of {len(labels)}")
    if len(truth) == 0:
        raise DataError("no images to evaluate")
    c = len(labels)
    pred = scores.argmax(1)
    k = min(TOPK, c)
    # Stable sort: ties count for the lower index, as argmax does, so top-1 <= top-5 always.
    topk = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    cm = confusion_matrix(truth, pred, c)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(0), cm.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(c), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    per_class = {
        label: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(actual[i]))
        for i, label in enumerate(labels)
    }
    return Metrics(
        labels=list(labels),
        confusion=cm,
        top1=float((pred == truth).mean()),
        top5=float((topk == truth[:, None]).any(1).mean()),
        top5_k=k,
        per_class=per_class,
    )


@dataclass(frozen=True)
class Mistake:
    path: str
    true: str
    pred: str
    prob: float  # the model's probability for its (wrong) prediction


@dataclass
class EvalResult:
    """Metrics plus what a report needs: every image's prediction and the unreadable files."""

    model: str
    data_dir: str
    split: str
    metrics: Metrics
    paths: list[str]
    truth: np.ndarray  # [N] model label index
    probs: np.ndarray  # [N, C] softmax
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    def mistakes(self, limit: int | None = None) -> list[Mistake]:
        """Wrong predictions, most confident first."""
        labels = self.metrics.labels
        pred = self.probs.argmax(1)
        wrong = np.flatnonzero(pred != self.truth)
        conf = self.probs[wrong, pred[wrong]]
        order = wrong[np.argsort(-conf, kind="stable")]
        return [
            Mistake(
                self.paths[i], labels[self.truth[i]], labels[pred[i]], float(self.probs[i, pred[i]])
            )
            for i in order[:limit]
        ]

    def to_dict(self, mistakes: int = config.MISTAKES) -> dict[str, Any]:
        return {
            "model": self.model,
            "data_dir": self.data_dir,
            "split": self.split,
            **self.metrics.to_dict(),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "mistakes": [vars(m) for m in self.mistakes(mistakes)],
        }


def label_indices(classes: list[str], labels: list[str]) -> list[int]:
    """Map the data folder's class names onto the model's label indices, by name."""
    by_name = {label: i for i, label in enumerate(labels)}
    unknown = [c for c in classes if c not in by_name]
    if unknown:
        raise DataError(
            f"class folder(s) the model does not know: {', '.join(unknown)}; "
            f"the model's labels are: {', '.join(labels)}"
        )
    return [by_name[c] for c in classes]


def run_samples(
    predictor,
    paths: list[Path],
    truth: list[int],
    *,
    model: str,
    data_dir: str,
    split: str,
    batch_size: int = config.INFER_BATCH_SIZE,
    progress: bool = False,
) -> EvalResult:
    """Run `predictor` (a runtime.Predictor) over images with known label indices.

    Unreadable images are skipped and listed, not fatal: one bad file should not hide the
    accuracy of the rest.
    """
    from tqdm import tqdm

    kept_paths: list[str] = []
    kept_truth: list[int] = []
    probs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    bar = tqdm(total=len(paths), desc="evaluate", unit="img", disable=not progress, leave=False)
    for i in range(0, len(paths), batch_size):
        xs = []
        for p, t in zip(paths[i : i + batch_size], truth[i : i + batch_size], strict=True):
            try:
                xs.append(predictor.prepare(load_image(p)))
            except DataError as e:
                skipped.append((os.fsdecode(p), str(e)))
                continue
            kept_paths.append(os.fsdecode(p))
            kept_truth.append(t)
        if xs:
            probs.append(softmax(predictor.logits(np.stack(xs)).astype(np.float64)))
        bar.update(min(batch_size, len(paths) - i))
    bar.close()
    if not kept_paths:
        raise DataError(f"no readable images to evaluate in {data_dir}")
    all_probs = np.concatenate(probs)
    labels = predictor.manifest.labels
    truth_arr = np.asarray(kept_truth, np.int64)
    return EvalResult(
        model=model,
        data_dir=data_dir,
        split=split,
        metrics=compute_metrics(all_probs, truth_arr, labels),
        paths=kept_paths,
        truth=truth_arr,
        probs=all_probs,
        skipped=skipped,
    )


def evaluate(
    model: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = config.SPLIT,
    batch_size: int = config.INFER_BATCH_SIZE,
    threads: int | None = None,
    provider: str = config.PROVIDER,
    progress: bool = False,
    predictor=None,
) -> EvalResult:
    """Evaluate MODEL (a file, EXPORT_DIR or RUN_DIR) on DATA_DIR (one folder per class).

    The folder is split as adapt split it (the manifest's val_fraction and seed), so
    ``split="val"`` is the held-out part of the data the model was adapted on.

    Args:
        predictor: an already loaded runtime.Predictor for MODEL (skips loading it again).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    clf = predictor or load_predictor(model, provider=provider, threads=threads)
    m = clf.manifest
    dataset = run_split(data_dir, m)
    index = label_indices(dataset.classes, m.labels)
    samples = dataset.samples if split == "all" else dataset.split(split)
    if not samples:
        raise DataError(f"no {split} images in {data_dir}")
    return run_samples(
        clf,
        [s.path for s in samples],
        [index[s.label] for s in samples],
        model=os.fsdecode(model),
        data_dir=os.fsdecode(data_dir),
        split=split,
        batch_size=batch_size,
        progress=progress,
    )


def validation_result(
    manifest: Manifest,
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    val_logits: ArrayLike,
    bad: Sequence[tuple[os.PathLike, str]] = (),
) -> EvalResult | None:
    """An evaluate.EvalResult for the validation split from logits computed during adapt.

    The split is scanned again as evaluate scans it (the manifest's val_fraction and seed);
    `val_logits` row i belongs to its i-th readable image. None when the counts differ (the
    folder changed since): the caller then runs the model instead.
    """
    m = manifest
    dataset = run_split(data_dir, m)
    index = label_indices(dataset.classes, m.labels)
    reasons = {Path(p): r for p, r in bad}
    val = dataset.split("val")
    kept = [s for s in val if s.path not in reasons]
    logits = np.asarray(val_logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) != len(kept) or not np.isfinite(logits).all():
        return None
    probs = softmax(logits)
    truth = np.asarray([index[s.label] for s in kept], np.int64)
    return EvalResult(
        model=os.fsdecode(run_dir),
        data_dir=os.fsdecode(data_dir),
        split="val",
        metrics=compute_metrics(probs, truth, m.labels),
        paths=[os.fsdecode(s.path) for s in kept],
        truth=truth,
        probs=probs,
        skipped=[(os.fsdecode(s.path), reasons[s.path]) for s in val if s.path in reasons],
    )


def run_validation(
    run_dir: str | os.PathLike,
    manifest: Manifest,
    data_dir: str | os.PathLike,
    *,
    model=None,
    val_logits: ArrayLike | None = None,
    bad: Sequence[tuple[os.PathLike, str]] = (),
    progress: bool = False,
) -> EvalResult:
    """The validation split's EvalResult for a RUN_DIR: from `val_logits` adapt already has
    when they match the split, else by running the model (`model`, the eager Classifier in
    memory, or the one in `run_dir`)."""
    result = None
    if val_logits is not None:
        result = validation_result(manifest, run_dir, data_dir, val_logits, bad)
    if result is None:
        predictor = (
            TorchClassifier.from_module(model, manifest, run_dir) if model is not None else None
        )
        result = evaluate(run_dir, data_dir, split="val", predictor=predictor, progress=progress)
    return result
