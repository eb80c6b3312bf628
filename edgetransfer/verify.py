"""Parity across runtimes: eager PyTorch vs TorchScript vs onnxruntime on real images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetransfer.errors import DataError, ParityError

# Default fp32 tolerance on logits: |a - b| <= ATOL + RTOL * |b|, b the eager reference.
ATOL = 1e-4
RTOL = 1e-3
MIN_TOP1_AGREEMENT = 1.0
PARITY_NAME = "parity.json"


@dataclass
class RuntimeParity:
    """How one runtime's logits compare with the eager reference."""

    runtime: str
    shape_ok: bool
    max_abs: float
    max_rel: float
    violations: int  # elements outside the tolerance
    top1_agreement: float
    worst: str = ""  # where the largest difference is (image, class)

    @property
    def passed(self) -> bool:
        return self.shape_ok and self.violations == 0 and self.top1_agreement >= MIN_TOP1_AGREEMENT


@dataclass
class ParityReport:
    export_dir: Path
    images: int
    atol: float
    rtol: float
    runtimes: list[RuntimeParity] = field(default_factory=list)
    eager_top1: float | None = None  # accuracy against the folder labels, when they match

    @property
    def passed(self) -> bool:
        return bool(self.runtimes) and all(r.passed for r in self.runtimes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "images": self.images,
            "tolerance": {
                "atol": self.atol,
                "rtol": self.rtol,
                "min_top1_agreement": MIN_TOP1_AGREEMENT,
            },
            "reference": "eager",
            "eager_top1": self.eager_top1,
            "runtimes": {
                r.runtime: {
                    "passed": r.passed,
                    "shape_ok": r.shape_ok,
                    "max_abs": r.max_abs,
                    "max_rel": r.max_rel,
                    "violations": r.violations,
                    "top1_agreement": r.top1_agreement,
                    "worst": r.worst,
                }
                for r in self.runtimes
            },
        }

    def table(self) -> str:
        rows = [
            f"{'runtime':<12} {'max_abs':>10} {'max_rel':>10} {'outside':>8} {'top1 agree':>11}"
            "  result"
        ]
        for r in self.runtimes:
            rows.append(
                f"{r.runtime:<12} {r.max_abs:>10.2e} {r.max_rel:>10.2e} {r.violations:>8d} "
                f"{r.top1_agreement:>10.1%}  {'ok' if r.passed else 'FAIL'}"
            )
        return "\n".join(rows)

    def raise_for_failures(self) -> None:
        """Raise one ParityError naming every failing runtime."""
        failed = [r for r in self.runtimes if not r.passed]
        if not self.runtimes:
            raise ParityError("no exported model to verify (model.onnx / model.pt)")
        if failed:
            parts = []
            for r in failed:
                if not r.shape_ok:
                    parts.append(f"{r.runtime}: output shape differs from eager")
                else:
                    parts.append(
                        f"{r.runtime}: {r.violations} logits outside |a-b| <= "
                        f"{self.atol:g} + {self.rtol:g}*|b| (max abs {r.max_abs:.2e} at "
                        f"{r.worst}), top-1 agreement {r.top1_agreement:.1%}"
                    )
            raise ParityError("parity failed: " + "; ".join(parts))


def compare(
    runtime: str,
    got: np.ndarray,
    ref: np.ndarray,
    names: list[str],
    atol: float = ATOL,
    rtol: float = RTOL,
) -> RuntimeParity:
    """Shapes first, then values, then top-1 agreement."""
    if got.shape != ref.shape:
        return RuntimeParity(
            runtime,
            False,
            float("inf"),
            float("inf"),
            int(ref.size),
            0.0,
            f"shape {got.shape} vs {ref.shape}",
        )
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bound = atol + rtol * np.abs(ref)
    rel = diff / np.maximum(np.abs(ref), 1e-12)
    i, j = np.unravel_index(int(diff.argmax()), diff.shape) if diff.size else (0, 0)
    return RuntimeParity(
        runtime=runtime,
        shape_ok=True,
        max_abs=float(diff.max()) if diff.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        violations=int((diff > bound).sum()),
        top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()) if len(ref) else 1.0,
        worst=f"{names[i]} class {j}" if diff.size else "",
    )


def verify(
    export_dir: str | Path,
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    atol: float = ATOL,
    rtol: float = RTOL,
    write: bool = True,
) -> ParityReport:
    """Run every exported model in `export_dir` on validation images from `data_dir`.

    The same preprocessed batches go to every runtime, in batches of `batch_size` (so the
    dynamic batch dimension is exercised), and each is compared with eager PyTorch.
    Writes parity.json into `export_dir` when `write` is set.
    """
    import torch

    from edgetransfer.adapt import load_run
    from edgetransfer.data import eval_transform, load_image, scan
    from edgetransfer.fileio import atomic_write_text

    export_dir = Path(export_dir)
    model, manifest = load_run(export_dir)
    seed = int(manifest.adapt.get("seed", 0))
    dataset = scan(data_dir, float(manifest.adapt.get("val_fraction", 0.2)), seed)
    samples = dataset.split("val") or dataset.samples
    samples = samples[:limit] if limit else samples
    tf = eval_transform(manifest.preprocessing)
    tensors, kept = [], []
    for s in samples:
        try:
            tensors.append(tf(load_image(s.path)))
            kept.append(s)
        except DataError:
            continue
    if not tensors:
        raise DataError(f"no readable validation images in {data_dir}")
    x = torch.stack(tensors)
    names = [s.path.name for s in kept]

    runners = {"eager": model}
    ts_path, onnx_path = export_dir / "model.pt", export_dir / "model.onnx"
    if ts_path.is_file():
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
            runners["torchscript"] = torch.jit.load(str(ts_path), map_location="cpu").eval()
    outputs: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        for name, m in runners.items():
            outputs[name] = np.concatenate(
                [m(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
            )
    if onnx_path.is_file():
        from edgetransfer.runtime import OnnxClassifier

        ort_model = OnnxClassifier(onnx_path)
        xn = x.numpy()
        outputs["onnxruntime"] = np.concatenate(
            [ort_model.logits(xn[i : i + batch_size]) for i in range(0, len(xn), batch_size)]
        )

    ref = outputs["eager"]
    report = ParityReport(export_dir, len(kept), atol, rtol)
    report.runtimes = [
        compare(n, o, ref, names, atol, rtol) for n, o in outputs.items() if n != "eager"
    ]
    if dataset.classes == manifest.labels:
        truth = np.array([s.label for s in kept])
        report.eager_top1 = float((ref.argmax(1) == truth).mean())
    if write:
        atomic_write_text(export_dir / PARITY_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report
