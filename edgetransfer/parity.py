"""Judging parity: the tolerances, the comparison of one runtime's outputs with the eager
reference, the check against adapt's recorded accuracy, and the report (table, parity.json).

Floor 1 (numpy only): verify runs the runtimes and hands their outputs here.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetransfer import config
from edgetransfer.data import softmax
from edgetransfer.errors import EdgeTransferWarning, ExportError, ParityError
from edgetransfer.fileio import USER_ERRNOS, atomic_write_text

# fp32 tolerance on logits: |a - b| <= ATOL + RTOL * |b|, b the eager reference.
ATOL = config.ATOL
RTOL = config.RTOL
MIN_TOP1_AGREEMENT = 1.0
# Raw-pixel model probabilities against the Python preprocessing path.
PROBS_ATOL = 1e-4
# Quantised/fp16 models are judged by accuracy: at most this drop in top-1 against eager.
MAX_TOP1_DROP = 0.01
PARITY_NAME = "parity.json"
# Eager top-1 on the run's own validation split may differ from the val_top1 adapt recorded by
# this much plus one image (adapt may decode JPEGs at a reduced scale and run the backbone on
# onnxruntime, which can flip a borderline image), plus the sampling error of a --limit subset.
MAX_RECORDED_GAP = 0.02


@dataclass
class RuntimeParity:
    """How one runtime's logits compare with the eager reference."""

    runtime: str
    kind: str  # "exact" or "reduced"
    shape_ok: bool
    max_abs: float
    max_rel: float
    violations: int  # logits outside the tolerance (judged for "exact" only)
    top1_agreement: float
    worst: str = ""  # where the largest difference is (image, class)
    top1: float | None = None  # accuracy against the folder labels, when known
    top1_drop: float | None = None
    flips: dict[str, int] = field(default_factory=dict)  # eager class -> images that changed
    probs_max_abs: float | None = None  # raw model: probabilities vs softmax(eager)

    @property
    def passed(self) -> bool:
        if not self.shape_ok:
            return False
        if self.kind == "reduced":
            if self.top1_drop is not None:
                return self.top1_drop <= MAX_TOP1_DROP + 1e-9
            return self.top1_agreement >= 1 - MAX_TOP1_DROP
        probs_ok = self.probs_max_abs is None or self.probs_max_abs <= PROBS_ATOL
        return self.violations == 0 and self.top1_agreement >= MIN_TOP1_AGREEMENT and probs_ok

    def problem(self, atol: float, rtol: float) -> str:
        if not self.shape_ok:
            return f"{self.runtime}: output shape differs from eager ({self.worst})"
        if self.kind == "reduced":
            drop = f"top-1 drop {self.top1_drop:.1%}" if self.top1_drop is not None else ""
            return (
                f"{self.runtime}: {drop or 'agreement'} over the {MAX_TOP1_DROP:.0%} allowed "
                f"(agreement {self.top1_agreement:.1%}, flips {self.flips})"
            )
        parts = []
        if self.violations:
            parts.append(
                f"{self.violations} logits outside |a-b| <= {atol:g} + {rtol:g}*|b| "
                f"(max abs {self.max_abs:.2e} at {self.worst})"
            )
        if self.top1_agreement < MIN_TOP1_AGREEMENT:
            parts.append(f"top-1 agreement {self.top1_agreement:.1%}, flips {self.flips}")
        if self.probs_max_abs is not None and self.probs_max_abs > PROBS_ATOL:
            parts.append(f"probabilities differ by {self.probs_max_abs:.2e} > {PROBS_ATOL:g}")
        return f"{self.runtime}: " + ", ".join(parts)


@dataclass
class RecordedCheck:
    """Eager top-1 on the run's validation images against the val_top1 adapt recorded.

    The other checks compare artifacts with the eager model rebuilt from the run's weights,
    which agree with each other even when the head was trained on features that did not come
    from this backbone (a tampered feature cache or cached ONNX backbone). This one compares
    the model with the images themselves: such a head scores far below what adapt recorded.
    """

    checked: bool
    reason: str = ""  # why it was not checked
    recorded: float | None = None
    eager: float | None = None
    images: int = 0
    allowed: float = 0.0

    @property
    def passed(self) -> bool:
        if not self.checked or self.eager is None or self.recorded is None:
            return True
        return abs(self.eager - self.recorded) <= self.allowed + 1e-9

    def problem(self) -> str:
        return (
            f"eager top-1 on the run's {self.images} validation images is {self.eager:.1%} but "
            f"adapt recorded {self.recorded:.1%} (allowed +-{self.allowed:.1%}): the head was "
            "trained on features this backbone does not produce (a damaged feature cache?); "
            "adapt again with --no-cache"
        )

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in vars(self).items() if v is not None and v != ""}
        d["passed"] = self.passed
        return d


def recorded_check(
    manifest, dataset, eager_top1: float | None, images: int, split_images: int
) -> RecordedCheck:
    """Judge `eager_top1` (on `images` of the `split_images` validation images) against the
    val_top1 in `manifest`; checked only when `dataset` is the data the run was adapted on."""
    recorded = manifest.metrics.get("val_top1")
    if not isinstance(recorded, int | float) or isinstance(recorded, bool):
        return RecordedCheck(False, "the manifest records no val_top1")
    if not (math.isfinite(recorded) and 0 <= recorded <= 1):
        return RecordedCheck(False, "the manifest's val_top1 is not a share between 0 and 1")
    if eager_top1 is None:
        return RecordedCheck(False, "the folder's class names are not the model's labels")
    if dataset.fingerprint() != manifest.data.get("fingerprint"):
        return RecordedCheck(
            False, "not the run's data (its fingerprint differs): its split is not the run's"
        )
    n, total, p = images, max(split_images, images), float(recorded)
    # a seeded subset (--limit) of the split: hypergeometric standard error, three of them
    sampling = 3 * (p * (1 - p) / n * (total - n) / max(total - 1, 1)) ** 0.5
    allowed = MAX_RECORDED_GAP + 1 / n + sampling
    return RecordedCheck(True, "", p, eager_top1, n, round(allowed, 6))


@dataclass
class ParityReport:
    export_dir: Path
    images: int
    atol: float
    rtol: float
    runtimes: list[RuntimeParity] = field(default_factory=list)
    eager_top1: float | None = None  # accuracy against the folder labels, when they match
    recorded: RecordedCheck | None = None
    skipped: list[str] = field(default_factory=list)  # files not loaded: they can run code
    written: Path | None = None  # parity.json, once written
    # what the runtimes are judged against: "eager" PyTorch, or "bundle" (a backbone bundle's
    # features through the numpy head, for a run adapted without torch)
    reference: str = "eager"

    @property
    def passed(self) -> bool:
        recorded_ok = self.recorded is None or self.recorded.passed
        return bool(self.runtimes) and all(r.passed for r in self.runtimes) and recorded_ok

    def to_dict(self) -> dict[str, Any]:
        def row(r: RuntimeParity) -> dict[str, Any]:
            d = {k: v for k, v in vars(r).items() if k != "runtime" and v is not None}
            d["passed"] = r.passed
            return d

        return {
            "passed": self.passed,
            "images": self.images,
            "reference": self.reference,
            "tolerance": {
                "atol": self.atol,
                "rtol": self.rtol,
                "min_top1_agreement": MIN_TOP1_AGREEMENT,
                "probs_atol": PROBS_ATOL,
                "max_top1_drop_reduced": MAX_TOP1_DROP,
            },
            "eager_top1": self.eager_top1,
            "recorded_val_top1": self.recorded.to_dict() if self.recorded else None,
            "runtimes": {r.runtime: row(r) for r in self.runtimes},
        }

    def table(self) -> str:
        head = (
            f"{'runtime':<12} {'max_abs':>9} {'max_rel':>9} {'outside':>7} {'agree':>7} "
            f"{'top1':>6}  result"
        )
        rows = [head]
        for r in self.runtimes:
            top1 = f"{r.top1:.1%}" if r.top1 is not None else "-"
            rows.append(
                f"{r.runtime:<12} {r.max_abs:>9.2e} {r.max_rel:>9.2e} "
                f"{r.violations if r.kind == 'exact' else '-':>7} "
                f"{r.top1_agreement:>7.1%} {top1:>6}  {'ok' if r.passed else 'FAIL'}"
            )
        c = self.recorded
        if c is not None and c.checked:
            rows.append(
                f"{self.reference} top-1 {c.eager:.1%} on {c.images} validation images, adapt "
                f"recorded {c.recorded:.1%}  {'ok' if c.passed else 'FAIL'}"
            )
        return "\n".join(rows)

    def raise_for_failures(self) -> None:
        """Raise one ParityError naming every failing runtime."""
        if not self.runtimes:
            why = (
                f"; {', '.join(self.skipped)} skipped: pass --trust-torchscript if you trust "
                "this folder"
                if self.skipped
                else ""
            )
            raise ParityError(f"no exported model to verify (model.onnx / model.pt / ...){why}")
        failed = [r.problem(self.atol, self.rtol) for r in self.runtimes if not r.passed]
        if self.recorded is not None and not self.recorded.passed:
            failed.append(self.recorded.problem())
        if failed:
            raise ParityError("parity failed: " + "; ".join(failed))


def compare(
    runtime: str,
    got: np.ndarray,
    ref: np.ndarray,
    names: list[str],
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    kind: str = "exact",
    labels: list[str] | None = None,
    truth: np.ndarray | None = None,
) -> RuntimeParity:
    """Shapes first, then values, then top-1 agreement (and accuracy when `truth` is known)."""
    if got.shape != ref.shape:
        return RuntimeParity(
            runtime=runtime,
            kind=kind,
            shape_ok=False,
            max_abs=float("inf"),
            max_rel=float("inf"),
            violations=int(ref.size),
            top1_agreement=0.0,
            worst=f"shape {got.shape} vs {ref.shape}",
        )
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    i, j = np.unravel_index(int(diff.argmax()), diff.shape)
    g, r = got.argmax(1), ref.argmax(1)
    flips: dict[str, int] = {}
    for k in np.flatnonzero(g != r):
        name = labels[r[k]] if labels else str(r[k])
        flips[name] = flips.get(name, 0) + 1
    res = RuntimeParity(
        runtime=runtime,
        kind=kind,
        shape_ok=True,
        max_abs=float(diff.max()),
        max_rel=float(rel.max()),
        violations=int((diff > atol + rtol * np.abs(ref)).sum()),
        top1_agreement=float((g == r).mean()),
        worst=f"{names[i]} class {j}",
        flips=flips,
    )
    if truth is not None:
        res.top1 = float((g == truth).mean())
        res.top1_drop = round(float((r == truth).mean()) - res.top1, 6)
    return res


def require_close(got: list, want: list, what: str, batch: int) -> None:
    """Every output of `what` within the fp32 tolerance of eager's `want` at `batch` (the
    export-time check), or one ExportError naming the largest difference."""
    if len(got) != len(want):
        raise ExportError(f"{what} has {len(got)} outputs, eager has {len(want)}")
    for g, expected in zip(got, want, strict=True):
        try:
            np.testing.assert_allclose(g, expected, rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            lines = [ln for ln in str(e).splitlines() if "Max absolute" in ln]
            raise ExportError(
                f"{what} differs from eager PyTorch at batch {batch} "
                f"({lines[0].strip() if lines else 'values differ'})"
            ) from None


@dataclass
class Outputs:
    """One runtime's answers on the verify images."""

    logits: np.ndarray
    source: np.ndarray | None = None  # source_logits, when a source head was kept
    probs: np.ndarray | None = None  # the raw-pixel model's probabilities


def judge(
    runtime: str,
    got: Outputs,
    ref: Outputs,
    names: list[str],
    *,
    kind: str,
    labels: list[str],
    truth: np.ndarray | None = None,
    atol: float = ATOL,
    rtol: float = RTOL,
) -> RuntimeParity:
    """`got` against the eager reference `ref`: the logits, the kept source head's logits
    (judged like the logits), and a raw-pixel model's probabilities against softmax(eager)."""
    row = compare(
        runtime,
        got.logits,
        ref.logits,
        names,
        atol=atol,
        rtol=rtol,
        kind=kind,
        labels=labels,
        truth=truth,
    )
    if ref.source is not None and row.shape_ok:
        src = got.source if got.source is not None else np.zeros((0,))
        src_row = compare(runtime, src, ref.source, names, atol=atol, rtol=rtol, kind=kind)
        if not src_row.shape_ok:
            row.shape_ok, row.worst = False, f"source_logits: {src_row.worst}"
        elif kind == "exact":
            row.violations += src_row.violations
            if src_row.max_abs > row.max_abs:
                row.max_abs, row.worst = src_row.max_abs, f"source_logits {src_row.worst}"
            row.max_rel = max(row.max_rel, src_row.max_rel)
    if got.probs is not None and row.shape_ok:
        row.probs_max_abs = float(np.abs(got.probs - softmax(ref.logits.astype(np.float64))).max())
    return row


def write_parity(report: ParityReport) -> Path | None:
    """Write parity.json; on a folder that cannot be written (read-only, full, forbidden) the
    comparison still stands: one warning, and None."""
    path = report.export_dir / PARITY_NAME
    try:
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        warnings.warn(
            f"{path} not written ({os.strerror(e.errno)}); the results below stand: verify a "
            "writable copy of the folder to keep parity.json",
            EdgeTransferWarning,
            stacklevel=3,
        )
        return None
    return path
