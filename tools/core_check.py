"""The core install on a device without PyTorch: run with the python of a venv made by
`pip install edgetransfer` alone (tools/core_check.sh makes one and CI runs it).

In one process, through the CLI: `demo` (its device path), then `adapt --backbone` on the
shipped bundle -> `export` -> `verify` -> `predict` on the sample data; after each command,
neither torch nor torchvision may have been imported (nor be importable at all).

    .venv-core/bin/python tools/core_check.py
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("torch", "torchvision")


def _run(*args: str) -> str:
    """One CLI command in this process; its output, or exit 1 with the command's own error."""
    import contextlib
    import io

    from edgetransfer.cli import cli

    out = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out):
        try:
            cli.main(list(args), prog_name="edgetransfer", standalone_mode=False)
        except Exception as e:  # noqa: BLE001 — report any failure as one line
            sys.exit(f"core_check: edgetransfer {' '.join(args)} failed: {e}")
    loaded = [m for m in HEAVY if m in sys.modules]
    if loaded:
        sys.exit(f"core_check: edgetransfer {args[0]} imported {', '.join(loaded)}")
    print(f"ok  {time.perf_counter() - start:5.1f} s  edgetransfer {' '.join(args)}")
    return out.getvalue()


def main() -> int:
    present = [m for m in HEAVY if importlib.util.find_spec(m) is not None]
    if present:
        sys.exit(f"core_check: {', '.join(present)} is installed here; run it in a core venv")
    from edgetransfer.demo import SOURCE_BUNDLE, sample_data, source_model

    data = sample_data()
    with tempfile.TemporaryDirectory(prefix="core_check.") as tmp:
        tmp = Path(tmp)
        demo = _run("demo", str(tmp / "demo"), "--quiet")
        if "parity: PASS" not in demo:
            sys.exit("core_check: the demo did not pass parity:\n" + demo)
        bundle = str(source_model(SOURCE_BUNDLE))
        _run("adapt", str(data), "--backbone", bundle, "--out", str(tmp / "run"), "--quiet")
        _run("export", str(tmp / "run"), "--out", str(tmp / "export"))
        _run("verify", str(tmp / "export"), "--data", str(data))
        six = sorted((data / "six").iterdir())[0]
        pred = json.loads(_run("predict", str(tmp / "export" / "model.onnx"), str(six), "--json"))
        if pred["topk"][0]["label"] != "six":
            sys.exit(f"core_check: {six.name} predicted as {pred['topk'][0]['label']}")
    print("core_check: the core install adapts, exports, verifies and predicts without PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
