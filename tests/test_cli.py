"""The command line: happy paths, every user mistake as one line + exit code, nothing damaged."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgetransfer.backbones import ARCHS
from edgetransfer.cli import cli

from .conftest import DIGITS, SOURCE, patch_everywhere, run


def _adapt_args(data, out, *extra):
    return [
        "adapt",
        data,
        "--arch",
        "tiny_test",
        "--weights",
        "none",
        "--epochs",
        "3",
        "--out",
        out,
        "-q",
        *extra,
    ]


def test_adapt_export_verify_predict_on_synthetic(colors, tmp_path):
    res = run(*_adapt_args(colors, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert "adapted tiny_test (head) to 3 classes (blue, green, red)" in res.output
    m = json.loads((tmp_path / "run" / "edgetransfer.json").read_text())
    assert m["adapt"]["strategy"] == "head" and m["data"]["train"] + m["data"]["val"] == 24
    assert len(m["data"]["fingerprint"]) == 64 and m["versions"]["torch"]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    # the L-BFGS head may converge before --epochs: then it stops
    assert 1 <= len(history) == m["adapt"]["epochs_run"] <= 3
    assert m["adapt"]["solver"] == "lbfgs"

    res = run("export", tmp_path / "run", "--onnx", "--out", tmp_path / "exp")
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "exp" / "model.pt").exists()
    assert (tmp_path / "exp" / "model.onnx").is_file()

    res = run("verify", tmp_path / "exp", "--data", colors, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["runtimes"]["onnxruntime"]["passed"] is True

    res = run("predict", tmp_path / "exp", colors / "red", "--json", "--topk", "2")
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.splitlines()]
    assert len(lines) == 8 and all(len(x["topk"]) == 2 for x in lines)


def test_adapt_is_reproducible(colors, tmp_path):
    for name in ("a", "b"):
        assert run(*_adapt_args(colors, tmp_path / name, "--no-cache")).exit_code == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    assert a == b


def test_feature_cache_is_reused(colors, tmp_path, monkeypatch):
    assert run(*_adapt_args(colors, tmp_path / "a")).exit_code == 0

    def fail(*a, **k):
        raise AssertionError("decoded although cached")

    patch_everywhere(monkeypatch, "edgetransfer.data.eval_transform", fail)
    res = run(*_adapt_args(colors, tmp_path / "b"))
    assert res.exit_code == 0, res.output


def test_bad_images_are_skipped_and_listed(colors, tmp_path):
    (colors / "red" / "zz_broken.png").write_bytes(b"not an image at all")
    res = run(*_adapt_args(colors, tmp_path / "run", "--max-bad", "0.2"))
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image(s)" in res.output
    assert "zz_broken.png" in (tmp_path / "run" / "bad_files.txt").read_text()


def test_too_many_bad_images_fail(colors, tmp_path):
    for i in range(6):
        (colors / "red" / f"zz{i}.jpg").write_bytes(b"")
    res = run(*_adapt_args(colors, tmp_path / "run"))
    assert res.exit_code == 1
    assert res.output.startswith(
        "Error: 6 of 30 images could not be read (more than --max-bad 10%)"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["adapt", "{tmp}/missing"],
            "Error: data folder {tmp}/missing does not exist; pass a folder with one sub-folder of "
            "images per class\n",
        ),
        (
            ["adapt", "{colors}", "--arch", "vgg99"],
            "Error: unknown architecture 'vgg99'; choose one of: "
            + ", ".join(sorted(ARCHS))
            + "\n",
        ),
        (
            ["adapt", "{colors}", "--arch", "tiny_test", "--weights", "{tmp}/w.pth"],
            "Error: weights file {tmp}/w.pth does not exist; pass imagenet, none or a path to "
            ".safetensors / .pth\n",
        ),
        (
            ["export", "{tmp}"],
            "Error: {tmp} has no edgetransfer.json; is it a RUN_DIR or EXPORT_DIR?\n",
        ),
        (["predict", "{tmp}/m.onnx", "x.png"], "Error: model {tmp}/m.onnx does not exist\n"),
        (["info", "{tmp}/nothing"], "Error: {tmp}/nothing does not exist\n"),
    ],
)
def test_user_errors_are_one_line(colors, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, colors=colors) for a in args]
    res = run(*args)
    assert res.exit_code == 1
    assert res.output == message.format(tmp=tmp_path)
    assert "Traceback" not in res.output


def test_existing_out_needs_force_and_is_not_damaged(colors, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".edgetransfer").write_text("")  # an earlier output: --force may replace it
    (out / "keep.txt").write_text("mine")
    res = run(*_adapt_args(colors, out))
    assert res.exit_code == 1
    assert res.output == f"Error: {out} already exists; pass --force to replace it\n"
    assert (out / "keep.txt").read_text() == "mine"
    # a failing run with --force leaves the old folder as it was
    res = run(*_adapt_args(tmp_path / "missing", out, "--force"))
    assert res.exit_code == 1 and (out / "keep.txt").read_text() == "mine"
    res = run(*_adapt_args(colors, out, "--force"))
    assert res.exit_code == 0 and not (out / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgetransfer-tmp")]


def test_export_needs_force(digits_run, tmp_path):
    out = tmp_path / "exp"
    assert run("export", digits_run, "--out", out, "--torchscript").exit_code == 0
    before = (out / "model.pt").read_bytes()
    res = run("export", digits_run, "--out", out)
    assert res.exit_code == 1 and "already exists; pass --force" in res.output
    assert (out / "model.pt").read_bytes() == before


def test_predict_reads_labels_from_model(digits_export):
    res = run("predict", digits_export / "model.onnx", DIGITS / "six", "--topk", "1")
    assert res.exit_code == 0, res.output
    rows = res.output.splitlines()
    assert len(rows) == 40
    assert sum(" six " in r for r in rows) >= 32  # the adapted model knows its sixes


def test_predict_unreadable_image(digits_export, tmp_path):
    (tmp_path / "a.jpg").write_text("hello")
    res = run("predict", digits_export, tmp_path / "a.jpg")
    assert res.exit_code == 1
    assert (
        res.output == "Error: a.jpg: not a readable image (cannot identify image file "
        f"'{tmp_path / 'a.jpg'}')\n"
    )


def test_info_prints_manifest(digits_export):
    res = run("info", digits_export / "model.pt", "--json")
    assert res.exit_code == 0
    assert json.loads(res.output)["manifest"]["arch"] == "simple_cnn"


def test_archs_lists_every_arch():
    res = run("archs")
    assert res.exit_code == 0
    assert [line.split()[0] for line in res.output.splitlines()] == list(ARCHS)


def test_every_command_has_help_with_example():
    res = run("--help")
    assert "Example" in res.output
    for name in cli.commands:
        out = run(name, "--help").output
        assert "Example:" in out and "edgetransfer " + name in out, name


def _installed(name):
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else shutil.which(name)


def test_help_does_not_import_torch():
    code = (
        "import sys; from edgetransfer.cli import cli; "
        "sys.argv=['edgetransfer','--help']\n"
        "try: cli()\nexcept SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch imported at start-up'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_installed_console_script_runs_demo(tmp_path):
    """The demo's cheap path (the shipped digits source; the ImageNet one is run by hand, see
    README): adapted and scratch results, the verdict, held-out predictions."""
    exe = _installed("edgetransfer")
    assert exe, "the edgetransfer console script is not installed"
    env = dict(os.environ, EDGETRANSFER_CACHE=str(tmp_path / "cache"))
    args = [exe, "demo", str(tmp_path / "demo"), "--source", "digits"]
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "parity: PASS" in res.stdout
    lines = res.stdout.splitlines()
    adapted = next(x for x in lines if x.startswith("adapted (head, source weights):  val top-1 "))
    scratch = next(x for x in lines if x.startswith("from scratch (full, random weights): val"))
    top1 = [float(x.split("val top-1 ")[1].split("%")[0]) for x in (adapted, scratch)]
    assert min(top1) >= 70, lines
    verdict = lines[lines.index(scratch) + 1]
    helps = top1[0] > top1[1]
    assert verdict.startswith(
        "the source model helps by" if helps else "warning: the source model does not help"
    ), verdict
    held = next(x for x in lines if x.startswith("held out (neither run saw them): "))
    assert held.split(": ")[1].split(" right")[0].endswith(" of 50")
    predicted = [x.split()[1] for x in lines if x.startswith("predict ")]
    # one held-out image per class: the 31st of 40 (20 train, 10 validate)
    assert predicted == [f"{c}/031.png:" for c in ("eight", "five", "nine", "seven", "six")]
    assert (tmp_path / "demo" / "export" / "model.onnx").is_file()
    assert not (tmp_path / "demo" / "data" / "val" / "six" / "031.png").exists()
    assert (tmp_path / "demo" / "data" / "val" / "six" / "030.png").is_file()
    again = subprocess.run(
        [exe, "demo", str(tmp_path / "demo")], capture_output=True, text=True, env=env, timeout=60
    )
    assert again.returncode == 1
    assert (
        again.stderr == f"Error: {tmp_path / 'demo'} already exists; pass --force to replace it\n"
    )


def test_python_dash_m(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "edgetransfer", "info", str(SOURCE)], capture_output=True, text=True
    )
    assert res.returncode == 0 and "(zero, one, two, three, four)" in res.stdout


def test_head_solver_option(colors, tmp_path):
    res = run(*_adapt_args(colors, tmp_path / "run", "--head-solver", "adamw"))
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "edgetransfer.json").read_text())
    assert m["adapt"]["solver"] == "adamw" and "l2" not in m["adapt"]
    assert len(json.loads((tmp_path / "run" / "history.json").read_text())) == 3  # no early stop
    res = run(*_adapt_args(colors, tmp_path / "bad", "--head-solver", "sgd"))
    assert res.exit_code == 2 and "--head-solver" in res.output
    assert not (tmp_path / "bad").exists()
