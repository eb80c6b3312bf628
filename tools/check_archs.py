"""Every registered architecture through the whole chain: adapt (head) -> export (ONNX, raw ONNX,
TorchScript, ExecuTorch) -> verify on real images. CI runs it after the test suite, which covers
only the demo model and one torchvision architecture (lowering to XNNPACK takes up to a minute
per architecture, too slow for the suite's budget).

Weights: the ones that load offline. efficientnet_lite0 uses its real ImageNet weights (the
`imagenet` extra), simple_cnn the shipped digits source model; the torchvision architectures
start from random weights here (their ImageNet weights are a download) — the head is still
trained, so outputs differ from image to image and a wrong export cannot hide.

    python tools/check_archs.py [--archs a,b] [--jobs 2] [--out DIR] [--features stages]

Prints one row per architecture and exits 1 if any step of any architecture failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("--onnx", "--raw", "--torchscript", "--executorch")


def _weights(arch: str) -> str:
    from edgetransfer.backbones import get_arch
    from edgetransfer.demo import source_model

    if arch == "simple_cnn":
        return str(source_model())
    if get_arch(arch).imagenet_loader is not None:  # offline ImageNet weights (a package)
        return "imagenet"
    return "none"


def _cli(*args: str) -> tuple[int, str, float]:
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "-m", "edgetransfer", *args], capture_output=True, text=True
    )
    last = (res.stderr.strip() or res.stdout.strip()).splitlines()[-1:] or [""]
    return res.returncode, last[0], time.perf_counter() - start


def check(arch: str, data: Path, out: Path, features: str = "penultimate") -> dict:
    """adapt -> export -> verify for one architecture (the head on `features`, adapt
    --features); the row printed for it."""
    from edgetransfer.demo import sample_data

    data = data or sample_data()
    run, export = out / arch / "run", out / arch / "export"
    row = {"arch": arch, "weights": _weights(arch), "ok": False}
    commands = [
        (
            "adapt",
            ["adapt", str(data), "--arch", arch, "--weights", row["weights"], "--epochs", "10"]
            + ["--features", features, "--out", str(run), "--no-report", "--quiet", "--force"],
        ),
        ("export", ["export", str(run), *FORMATS, "--out", str(export), "--force"]),
        ("verify", ["verify", str(export), "--data", str(data)]),
    ]
    for name, args in commands:
        code, last, seconds = _cli(*args)
        row[f"{name}_s"] = round(seconds, 1)
        if code and name == "adapt" and "is not available" in last:
            row.update(ok=True, skipped=last.removeprefix("Error: "))  # the arch does not offer it
            return row
        if code:
            row["failed"] = f"{name} (exit {code}): {last}"
            return row
    info = json.loads((export / "export.json").read_text())
    pte = info.get("executorch") or {}
    row["pte_batch"] = pte.get("batch")
    row["delegated"] = pte.get("delegated_share")
    row["ok"] = True
    return row


def main() -> int:
    from edgetransfer.backbones import ARCHS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated (default: all)")
    ap.add_argument("--data", type=Path, default=None, help="DATA_DIR (default: the sample data)")
    ap.add_argument("--jobs", type=int, default=2, help="architectures checked at once")
    ap.add_argument("--out", type=Path, default=None, help="keep the runs and exports here")
    ap.add_argument(
        "--features",
        default="penultimate",
        help="adapt --features of every run (default: %(default)s)",
    )
    args = ap.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(ARCHS))
    if unknown:
        ap.error(f"unknown architecture(s) {', '.join(unknown)}; choose from {', '.join(ARCHS)}")
    with tempfile.TemporaryDirectory(prefix="check_archs.") as tmp:
        out = args.out or Path(tmp)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(lambda a: check(a, args.data, out, args.features), archs))
    print(
        f"{'arch':20} {'weights':10} {'adapt':>6} {'export':>7} {'verify':>7} {'pte':>12}  result"
    )
    for r in rows:
        weights = r["weights"] if len(r["weights"]) <= 10 else "file"
        times = [f"{r.get(k, float('nan')):.0f}s" for k in ("adapt_s", "export_s", "verify_s")]
        result = (
            f"FAILED {r['failed']}"
            if not r["ok"]
            else f"n/a: {r['skipped']}"
            if "skipped" in r
            else "ok"
        )
        pte = f"{r['delegated']:.0%} XNNPACK" if r.get("delegated") is not None else "-"
        print(
            f"{r['arch']:20} {weights:10} {times[0]:>6} {times[1]:>7} {times[2]:>7} {pte:>12}  "
            + result
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
