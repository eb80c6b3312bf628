"""One `adapt` run in a fresh Python process, measured; shared by perf.py and
transfer_experiment.py. A fresh process makes VmHWM (peak RSS) belong to that run alone.

    from adapt_child import run_adapt
    r = run_adapt({"data_dir": ..., "out": ..., "strategy": "bias"}, threads=1)
    # r: time_s, start_mib, before_fit_mib, peak_mib, memory (the printed estimate),
    #    metrics, trainable
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CODE = r"""
import json, sys, time
from pathlib import Path

from edgetransfer.bench import proc_status_mib

def status_mib(field):  # Linux: VmRSS now, VmHWM the peak of this process
    return proc_status_mib(field) or 0.0

import torch
if sys.argv[2] != "-":
    torch.set_num_threads(int(sys.argv[2]))
from edgetransfer.adapt import AdaptConfig, adapt
kw = json.loads(sys.argv[1])
for k in ("data_dir", "out", "teacher", "source_data"):
    if kw.get(k):
        kw[k] = Path(kw[k])
marks = {}
def on_phase(name):  # RSS when training starts: what training adds is measured from here
    if name == "fit":
        marks["before_fit"] = status_mib("VmRSS")
start_rss = status_mib("VmRSS")
start = time.perf_counter()
res = adapt(AdaptConfig(**kw, on_phase=on_phase))
print(json.dumps({"time_s": time.perf_counter() - start, "start_mib": start_rss,
    "before_fit_mib": marks.get("before_fit", 0.0), "peak_mib": status_mib("VmHWM"),
    "memory": res.memory, "metrics": res.manifest.metrics,
    "trainable": res.manifest.adapt["trainable_params"]}))
"""


def run_adapt(kw: dict, threads: int | None = None) -> dict:
    """adapt(AdaptConfig(**kw)) in a fresh interpreter (paths as strings); exits on failure."""
    proc = subprocess.run(
        [sys.executable, "-c", CODE, json.dumps(kw, default=str), str(threads or "-")],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"adapt failed ({kw.get('strategy', 'head')}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
