"""The core install (no PyTorch): commands that run .onnx files work, the others say in one line
which extra brings PyTorch. PyTorch is hidden from a subprocess the way a missing install hides
it (importing it raises ModuleNotFoundError)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgetransfer import config
from tests.conftest import DIGITS

SIXES = sorted((DIGITS / "six").iterdir())


def _without_torch(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {config.TORCH_MODULES!r}:\n    sys.modules[name] = None\n"
        "from edgetransfer.cli import cli\n"
        f"sys.argv = ['edgetransfer', *{list(args)!r}]\n"
        "cli()\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_command_that_needs_torch_names_the_extra(tmp_path):
    res = _without_torch("adapt", str(DIGITS), "--out", str(tmp_path / "run"))
    assert res.returncode == 1
    assert res.stderr == (
        f"Error: this command needs PyTorch (torch is not installed); {config.TORCH_EXTRA}\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["predict", "info"])
def test_onnx_commands_run_without_torch(digits_export, command):
    args = [command, str(digits_export / "model.onnx")]
    args += [str(SIXES[0]), "--json"] if command == "predict" else ["--json"]
    res = _without_torch(*args)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    if command == "predict":
        assert out["topk"][0]["label"] == "six"
