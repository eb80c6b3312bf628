"""Latency, throughput and peak memory of every runtime available for a model.

Each runtime is measured in a fresh Python process (`python -m edgetransfer.bench SPEC`), so its
peak RSS is its own: onnxruntime rows never pay for an imported torch, and one runtime's arena
does not inflate the next one's number.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetransfer import config
from edgetransfer.errors import EdgeTransferError, EdgeTransferWarning, ManifestError
from edgetransfer.manifest import ARTIFACTS, CODE_FILES, untrusted_skip
from edgetransfer.onnxio import resolve_providers
from edgetransfer.runtime import (
    OnnxClassifier,
    PteClassifier,
    TorchClassifier,
    executorch_runtime,
)

# runtime name -> (file in an EXPORT_DIR or RUN_DIR, backend); the order is the table's order.
RUNTIMES = {
    "eager": (ARTIFACTS["weights"], "eager"),
    "torchscript": (ARTIFACTS["torchscript"], "torchscript"),
    "pt2": (ARTIFACTS["pt2"], "pt2"),
    "ort-fp32": (ARTIFACTS["onnx"], "onnx"),
    "ort-raw": (ARTIFACTS["raw"], "onnx"),
    "ort-opt": (ARTIFACTS["optimized"], "onnx"),
    "ort-int8": (ARTIFACTS["int8"], "onnx"),
    "ort-fp16": (ARTIFACTS["fp16"], "onnx"),
    "executorch": (ARTIFACTS["pte"], "executorch"),
    "executorch-int8": (ARTIFACTS["pte_int8"], "executorch"),
}
# Ratios are against the first of these that was measured.
BASELINES = ("ort-fp32", "eager")


class BenchError(EdgeTransferError):
    """A runtime could not be benchmarked."""


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how often."""

    model: Path
    runs: int = config.BENCH_RUNS  # timed runs at batch 1, and again at batch_size
    warmup: int = config.BENCH_WARMUP
    batch_size: int = config.BENCH_BATCH_SIZE
    threads: int | None = None
    provider: str = config.PROVIDER  # onnxruntime provider for the ORT runtimes
    trust_torchscript: bool = False  # also load model.pt / model.pt2 from a folder


@dataclass
class BenchReport:
    config: BenchConfig
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # runtime -> measurements

    @property
    def baseline(self) -> str | None:
        return next((b for b in BASELINES if "error" not in self.rows.get(b, {"error": 1})), None)

    def ratios(self) -> dict[str, dict[str, float]]:
        """Per runtime: p50 speed-up, throughput and peak-RSS ratios against the baseline."""
        base = self.rows.get(self.baseline or "")
        out = {}
        for name, r in self.rows.items():
            if base is None or "error" in r:
                continue
            out[name] = {
                "speedup_p50": round(base["p50_ms"] / max(r["p50_ms"], 1e-9), 3),
                "throughput": round(r["throughput"] / max(base["throughput"], 1e-9), 3),
                "peak_rss": round(r["peak_rss_mb"] / max(base["peak_rss_mb"], 1e-9), 3)
                if r.get("peak_rss_mb") and base.get("peak_rss_mb")
                else None,
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        ratios = self.ratios()
        return {
            "model": os.fsdecode(c.model),
            "runs": c.runs,
            "warmup": c.warmup,
            "batch_size": c.batch_size,
            "threads": c.threads,
            "provider": c.provider,
            "baseline": self.baseline,
            "runtimes": {
                name: {**r, **({"vs_baseline": ratios[name]} if name in ratios else {})}
                for name, r in self.rows.items()
            },
        }

    def table(self) -> str:
        b = self.config.batch_size
        base = self.baseline
        head = (
            f"{'runtime':<12} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {f'img/s@{b}':>10} "
            f"{'peak MB':>8} {'speed-up':>9}"
        )
        rows = [head]
        ratios = self.ratios()
        for name, r in self.rows.items():
            if "error" in r:
                rows.append(f"{name:<12} failed: {r['error']}")
                continue
            rss = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-"
            speed = f"{ratios[name]['speedup_p50']:.2f}x" if name in ratios else "-"
            rows.append(
                f"{name:<12} {r['p50_ms']:>8.3f} {r['p90_ms']:>8.3f} {r['p99_ms']:>8.3f} "
                f"{r['throughput']:>10.1f} {rss:>8} {speed:>9}"
            )
        c = self.config
        rows.append(
            f"latency at batch 1 over {c.runs} runs after {c.warmup} warm-up, threads "
            f"{c.threads or 'all'}"
            + (f"; speed-up is p50 against {base} (higher is faster)" if base else "")
        )
        return "\n".join(rows)

    def raise_for_failures(self) -> None:
        failed = [f"{n}: {r['error']}" for n, r in self.rows.items() if "error" in r]
        if failed:
            raise BenchError("bench failed for " + "; ".join(failed))


def find_runtimes(
    model: str | os.PathLike, trust_torchscript: bool = False
) -> dict[str, tuple[Path, str]]:
    """Runtime name -> (path to load, backend) for a folder or a single model file.

    In a folder, model.pt and model.pt2 are skipped with an EdgeTransferWarning unless
    `trust_torchscript`: loading them can run code.
    """
    path = Path(model)
    if not path.exists():
        raise ManifestError(f"model {path} does not exist")
    if path.is_dir():
        found = {}
        for name, (fname, backend) in RUNTIMES.items():
            # A file named on its own is the user's explicit choice; a folder's needs trust.
            if (path / fname).is_file() and fname in CODE_FILES and not trust_torchscript:
                warnings.warn(
                    untrusted_skip(fname, "not measured"), EdgeTransferWarning, stacklevel=2
                )
            elif (path / fname).is_file():
                # eager rebuilds the Classifier from the folder (manifest + weights)
                found[name] = (path if backend == "eager" else path / fname, backend)
        if not found:
            raise ManifestError(
                f"{path} has no model files to benchmark (model.onnx, model.pt, "
                "model.safetensors, ...)"
            )
        return found
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        by_file = {fname: name for name, (fname, _) in RUNTIMES.items()}
        return {by_file.get(path.name, "ort"): (path, "onnx")}
    if suffix == ".pt":
        return {"torchscript": (path, "torchscript")}
    if suffix == ".pt2":
        return {"pt2": (path, "pt2")}
    if suffix == ".pte":
        by_file = {fname: name for name, (fname, _) in RUNTIMES.items()}
        return {by_file.get(path.name, "executorch"): (path, "executorch")}
    raise ManifestError(
        f"{path.name} is not a model: expected .onnx, .pte, .pt, .pt2, an EXPORT_DIR or a RUN_DIR"
    )


def bench(cfg: BenchConfig, progress: bool = False) -> BenchReport:
    """Measure every runtime found for `cfg.model`, each in its own subprocess."""
    from tqdm import tqdm

    runtimes = find_runtimes(cfg.model, cfg.trust_torchscript)
    if cfg.provider != "cpu" and any(b == "onnx" for _, b in runtimes.values()):
        resolve_providers(cfg.provider)  # fail before any subprocess starts
    report = BenchReport(cfg)
    bar = tqdm(runtimes.items(), desc="bench", disable=not progress, leave=False)
    for name, (path, backend) in bar:
        bar.set_postfix_str(name)
        spec = {
            "path": os.fsdecode(path),
            "backend": backend,
            "runs": cfg.runs,
            "warmup": cfg.warmup,
            "batch_size": cfg.batch_size,
            "threads": cfg.threads,
            "provider": cfg.provider if backend == "onnx" else "cpu",
        }
        proc = subprocess.run(
            [sys.executable, "-m", "edgetransfer.bench", json.dumps(spec)],
            capture_output=True,
            text=True,
        )
        try:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            row = {"error": lines[-1][:300] if lines else f"exit code {proc.returncode}"}
        fname = ARTIFACTS["weights"] if backend == "eager" else Path(path).name
        report.rows[name] = {"file": fname, **row}
    return report


def proc_status_mib(field: str) -> float | None:
    """A memory field of this process's /proc/self/status in MiB (Linux: VmRSS now, VmHWM
    the peak); None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float | None:
    """This process's peak resident memory in MiB.

    Linux: VmHWM, the high-water mark of this address space. Not ru_maxrss: that survives
    exec, so a worker forked from a big parent (a test runner holding torch) would report the
    parent's size.
    """
    if (peak := proc_status_mib("VmHWM")) is not None:
        return peak
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux and bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _percentiles(times_ms: list[float]) -> dict[str, float]:
    a = np.asarray(times_ms)
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 4),
        "p90_ms": round(float(np.percentile(a, 90)), 4),
        "p99_ms": round(float(np.percentile(a, 99)), 4),
        "mean_ms": round(float(a.mean()), 4),
    }


def measure(
    path: str | os.PathLike,
    backend: str,
    *,
    runs: int = config.BENCH_RUNS,
    warmup: int = config.BENCH_WARMUP,
    batch_size: int = config.BENCH_BATCH_SIZE,
    threads: int | None = None,
    provider: str = config.PROVIDER,
) -> dict[str, Any]:
    """Load one runtime and time it in this process: batch-1 latency percentiles after a
    warm-up, then throughput at `batch_size`. Inputs are random tensors of the model's shape."""
    if backend == "onnx":
        import onnx  # noqa: F401  both imported before the baseline RSS is taken
        import onnxruntime  # noqa: F401

        def load():
            return OnnxClassifier(path, threads, provider=provider)
    elif backend == "executorch":
        executorch_runtime()  # torch and the runtime imported before the baseline RSS is taken

        def load():
            # threads go to the runtime's threadpool (XNNPACK's workers), as in PteClassifier
            return PteClassifier(path, threads)
    else:
        import torch  # noqa: F401  imported before the baseline RSS is taken

        def load():
            return TorchClassifier(path, threads)

    rss_before = _peak_rss_mb()
    t = time.perf_counter()
    model = load()
    load_ms = (time.perf_counter() - t) * 1000
    x1, xb = model.example(1), model.example(batch_size)
    for _ in range(warmup):
        model.logits(x1)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        model.logits(x1)
        times.append((time.perf_counter() - t) * 1000)
    for _ in range(max(1, warmup // 2)):
        model.logits(xb)
    t = time.perf_counter()
    for _ in range(runs):
        model.logits(xb)
    elapsed = time.perf_counter() - t
    return {
        "backend": model.backend,
        "load_ms": round(load_ms, 2),
        **_percentiles(times),
        "throughput": round(runs * batch_size / elapsed, 2),
        "peak_rss_mb": round(p, 1) if (p := _peak_rss_mb()) else None,
        "rss_before_load_mb": round(rss_before, 1) if rss_before else None,
    }


def _worker(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    try:
        row = measure(
            spec["path"],
            spec["backend"],
            runs=spec["runs"],
            warmup=spec["warmup"],
            batch_size=spec["batch_size"],
            threads=spec["threads"],
            provider=spec["provider"],
        )
    except EdgeTransferError as e:
        row = {"error": str(e)}
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
