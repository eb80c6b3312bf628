"""tools/perf.py, the performance harness, runs from a checkout: its cheapest benchmark end to
end, and its argument checking. (Its timings are never asserted: benchmarks, not tests.)"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PERF = ROOT / "tools" / "perf.py"


def test_startup_benchmark_writes_its_rows(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(PERF), "--quick", "--only", "startup", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "## startup: CLI start-up" in res.stdout
    assert "| measurement | target | measured | result |" in res.stdout
    rows = json.loads(out.read_text())
    assert {r["bench"] for r in rows} == {"startup"}
    assert {r["what"] for r in rows} >= {
        "edgetransfer --help wall time",
        "heavy modules imported by edgetransfer.cli",
    }
    imports = next(r for r in rows if r["what"].startswith("imports a working command pays"))
    assert "torch / torchvision / onnxruntime" in imports["what"] and imports["ok"] is None
    heavy = next(r for r in rows if r["what"].startswith("heavy"))
    assert heavy["ok"] is True and "torch" not in heavy["measured"]


def test_unknown_benchmark_is_refused():
    res = subprocess.run(
        [sys.executable, str(PERF), "--only", "adapt,warp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "unknown benchmark(s) warp" in res.stderr
