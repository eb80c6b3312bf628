"""Nothing lost, nothing half-trusted (issue 13): --force replaces only what edgetransfer wrote
and never an input; damaged checkpoints, full disks, SIGTERM and read-only folders end in one
line; concurrent writers of one folder never trip each other."""

from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from edgetransfer import fileio
from edgetransfer.errors import EdgeTransferError, ExportError, OutputExistsError
from edgetransfer.runs import checkpoint_path

from .conftest import DIGITS, patch_everywhere, run

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("et_fuzz_ckpt", ROOT / "tools" / "fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


# model.onnx only, by the faster TorchScript-based exporter: what is tested is the folder
FAST_EXPORT = ("--onnx", "--exporter", "torchscript", "--golden", "0")


def adapt_args(data, out, *extra):
    return ["adapt", data, "--arch", "tiny_test", "--weights", "none", "--epochs", "2",
            "--out", out, "-q", *extra]  # fmt: skip


def snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(fileio.TMP_PREFIX + "*"))


def refused_input(out, given, what="is") -> str:
    return (
        f"Error: refusing to write {out}: it {what} the input {given}; "
        "choose another output folder\n"
    )


def no_work(monkeypatch):
    """Make scanning a dataset fail loudly: a refusal must come before any work."""

    def boom(*a, **k):
        raise AssertionError("the command started working before refusing")

    patch_everywhere(monkeypatch, "edgetransfer.data.scan", boom)


# ---------------------------------------------------------------------------------------------
# 1. --force replaces only what edgetransfer wrote, and never an input of the command


def test_force_refuses_a_users_folder_before_any_work(colors, tmp_path, monkeypatch):
    docs = tmp_path / "Documents"
    (docs / "taxes").mkdir(parents=True)
    (docs / "letter.txt").write_text("mine")
    (docs / "taxes" / "2025.pdf").write_bytes(b"%PDF")
    before = snapshot(docs)
    no_work(monkeypatch)
    res = run(*adapt_args(colors, docs, "--force"))
    assert res.exit_code == 1
    assert res.output == (
        f"Error: refusing to replace {docs} with --force: it was not written by edgetransfer "
        "(no edgetransfer.json or .edgetransfer in it); choose a new output folder, or if an "
        "older edgetransfer wrote it, delete it yourself\n"
    )
    assert snapshot(docs) == before and temps(tmp_path) == []


def test_force_never_replaces_the_dataset_or_a_folder_holding_it(colors, tmp_path, monkeypatch):
    before = snapshot(colors)
    no_work(monkeypatch)
    res = run(*adapt_args(colors, colors, "--force"))
    assert res.exit_code == 1 and res.output == refused_input(colors, colors)
    # the parent of DATA_DIR, even when it looks like an earlier output
    (tmp_path / fileio.MARKER).write_text("")
    res = run(*adapt_args(colors, tmp_path, "--force"))
    assert res.exit_code == 1 and res.output == refused_input(tmp_path, colors, "contains")
    # through a symlink
    link = tmp_path / "link"
    link.symlink_to(colors, target_is_directory=True)
    res = run(*adapt_args(colors, link, "--force"))
    assert res.exit_code == 1 and res.output == refused_input(link, colors)
    assert snapshot(colors) == before


def test_force_never_replaces_the_teacher_or_source_data(colors, tmp_path, monkeypatch):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "edgetransfer.json").write_text("{}")  # written by edgetransfer, but an input
    no_work(monkeypatch)
    res = run(*adapt_args(colors, teacher, "--force", "--strategy", "distill",
                          "--teacher", teacher))  # fmt: skip
    assert res.exit_code == 1 and res.output == refused_input(teacher, teacher)
    source = tmp_path / "source"
    source.mkdir()
    res = run(*adapt_args(colors, source, "--force", "--source-data", source))
    assert res.exit_code == 1 and res.output == refused_input(source, source)
    assert (teacher / "edgetransfer.json").read_text() == "{}"


def test_export_never_replaces_its_run_but_may_write_inside_it(digits_run, tmp_path):
    rundir = tmp_path / "run"
    shutil.copytree(digits_run, rundir)
    before = snapshot(rundir)
    res = run("export", rundir, "--out", rundir, "--force", *FAST_EXPORT)
    assert res.exit_code == 1 and res.output == refused_input(rundir, rundir)
    res = run("export", rundir, "--out", tmp_path, "--force", *FAST_EXPORT)
    assert res.exit_code == 1 and res.output == refused_input(tmp_path, rundir, "contains")
    assert snapshot(rundir) == before
    # the default place, inside RUN_DIR, works and an earlier export is replaced with --force
    for extra in ((), ("--force",)):
        res = run("export", rundir, "--out", rundir / "export", *FAST_EXPORT, *extra)
        assert res.exit_code == 0, res.output
    assert (rundir / "export" / "model.onnx").is_file()


def test_evaluate_report_never_replaces_the_data_or_the_model(digits_export, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DIGITS / "five", data / "five")
    before = snapshot(data)
    for out, given in ((data, data), (digits_export, digits_export), (tmp_path, data)):
        res = run("evaluate", digits_export, data, "--report", out, "--force")
        what = "is" if out == given else "contains"
        assert res.exit_code == 1 and res.output == refused_input(out, given, what)
    assert snapshot(data) == before
    assert (digits_export / "model.onnx").is_file()


def test_demo_refuses_a_users_folder_and_the_sample_data(tmp_path, monkeypatch):
    from edgetransfer import demo

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    no_work(monkeypatch)
    with pytest.raises(OutputExistsError, match="it was not written by edgetransfer"):
        demo.run_demo(mine, force=True)
    data = tmp_path / "samples" / "digits59"
    data.mkdir(parents=True)
    monkeypatch.setattr(demo, "sample_data", lambda: data)
    with pytest.raises(OutputExistsError, match="contains the input"):
        demo.run_demo(tmp_path / "samples", force=True)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (mine / "notes.txt").read_text() == "keep"


def test_what_force_may_replace(tmp_path):
    out = tmp_path / "out"
    # an empty folder, a folder with a manifest, a folder with the marker: yes
    for setup in (lambda: None, lambda: (out / "edgetransfer.json").write_text("{}"),
                  lambda: (out / fileio.MARKER).write_text("")):  # fmt: skip
        out.mkdir()
        setup()
        fileio.check_can_write(out, force=True)
        shutil.rmtree(out)
    # without --force, nothing existing that holds something
    out.mkdir()
    (out / fileio.MARKER).write_text("")
    (out / "model.onnx").write_bytes(b"")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        fileio.check_can_write(out, force=False)
    # an output folder inside an input is fine; the input or a folder around it is not
    fileio.check_can_write(tmp_path / "data" / "run", force=True, inputs=[tmp_path / "data"])
    with pytest.raises(OutputExistsError, match="contains the input"):
        fileio.check_can_write(tmp_path, force=True, inputs=[None, tmp_path / "data"])


def _old_report(folder: Path, metrics: dict) -> Path:
    """An evaluation report as versions before the marker wrote it (report.write_eval_report)."""
    (folder / "mistakes").mkdir(parents=True)
    (folder / "index.html").write_text("<h1>Evaluation</h1>")
    (folder / "confusion.png").write_bytes(b"\x89PNG")
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


OLD_METRICS = {"model": "m", "data_dir": "d", "split": "all", "images": 3, "top1": 1.0,
               "top5": 1.0, "top5_k": 2, "macro_f1": 1.0, "per_class": {}, "skipped": [],
               "confusion": {"labels": [], "matrix": []}, "mistakes": []}  # fmt: skip


def _old_demo(folder: Path) -> Path:
    """A demo folder as versions before the marker wrote it: run/ and export/, no marker."""
    for sub in ("run", "export"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "edgetransfer.json").write_text("{}")
    (folder / "export" / "model.onnx").write_bytes(b"onnx")
    return folder


def test_force_replaces_what_older_versions_wrote(tmp_path):
    report = _old_report(tmp_path / "report", OLD_METRICS)
    demo = _old_demo(tmp_path / "demo")
    half = tmp_path / "half"  # an older demo interrupted while adapting
    (half / "run").mkdir(parents=True)
    (half / "run" / "edgetransfer.json").write_text("{}")
    (half / "run.checkpoint").write_bytes(b"")
    for folder in (report, demo, half):
        fileio.check_can_write(folder, force=True)
        with pytest.raises(OutputExistsError, match="already exists; pass --force"):
            fileio.check_can_write(folder, force=False)
    # but nothing that only looks a little like them
    not_ours = {
        "a metrics.json of other keys": _old_report(tmp_path / "r2", {"top1": 1.0}),
        "a metrics.json that is a list": _old_report(tmp_path / "r3", [OLD_METRICS]),
        "a run/ beside a user's file": _old_demo(tmp_path / "d2"),
        "a run/ without a manifest": tmp_path / "d3",
    }
    (tmp_path / "d2" / "notes.txt").write_text("mine")
    (tmp_path / "d3" / "run").mkdir(parents=True)
    (tmp_path / "r4").mkdir()
    (tmp_path / "r4" / "index.html").write_text("<p>my site</p>")
    not_ours["an index.html alone"] = tmp_path / "r4"
    for what, folder in not_ours.items():
        with pytest.raises(OutputExistsError) as e:
            fileio.check_can_write(folder, force=True)
        assert str(e.value) == (
            f"refusing to replace {folder} with --force: it was not written by edgetransfer "
            "(no edgetransfer.json or .edgetransfer in it); choose a new output folder, or if "
            "an older edgetransfer wrote it, delete it yourself"
        ), what


def test_evaluate_report_force_replaces_an_older_versions_report(digits_export, tmp_path):
    out = _old_report(tmp_path / "rep", OLD_METRICS)
    res = run("evaluate", digits_export, DIGITS, "--report", out, "--force", "--split", "val")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "metrics.json").read_text())["model"] == str(digits_export)
    assert (out / fileio.MARKER).is_file() and temps(tmp_path) == []


class _Reached(Exception):
    """Raised instead of adapting: the demo got past its output check."""


def _demo_until_adapt(monkeypatch):
    from edgetransfer import demo

    def adapt(cfg):
        raise _Reached(cfg.out)

    patch_everywhere(monkeypatch, "edgetransfer.adapt.adapt", adapt)
    return demo


def test_demo_force_reuses_an_older_versions_demo_folder(tmp_path, monkeypatch):
    demo = _demo_until_adapt(monkeypatch)
    out = _old_demo(tmp_path / "demo")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        demo.run_demo(out)
    with pytest.raises(_Reached):
        demo.run_demo(out, force=True)


@pytest.mark.parametrize(
    "names",
    [
        [],
        [".DS_Store"],
        ["Thumbs.db", "desktop.ini"],
        [fileio.MARKER],
        [fileio.MARKER, ".DS_Store"],
    ],
)
def test_a_folder_with_only_the_marker_or_os_litter_counts_as_empty(tmp_path, names):
    out = tmp_path / "out"
    out.mkdir()
    for name in names:
        (out / name).write_text("")
    for force in (False, True):
        fileio.check_can_write(out, force=force)
    with fileio.output_dir(out, force=False) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [fileio.MARKER, "a.txt"]


def test_demo_after_a_demo_that_failed_early_needs_no_force(tmp_path, monkeypatch):
    demo = _demo_until_adapt(monkeypatch)
    out = tmp_path / "demo"
    for _ in range(2):  # the first run writes the marker and fails; the second is let in
        with pytest.raises(_Reached):
            demo.run_demo(out)
    assert [p.name for p in out.iterdir()] == [fileio.MARKER]


def test_the_input_under_another_name_is_refused(colors, tmp_path, monkeypatch):
    """On a case-insensitive file system `--out Colors` is the folder `colors`, and realpath
    keeps the case it is given. Simulated here: a symlink realpath is told not to resolve."""
    monkeypatch.setattr(fileio.os.path, "realpath", os.path.abspath)
    alias = tmp_path / "Colors"
    alias.symlink_to(colors, target_is_directory=True)
    outer = tmp_path / "Outer"
    outer.symlink_to(tmp_path, target_is_directory=True)
    no_work(monkeypatch)
    res = run(*adapt_args(colors, alias, "--force"))
    assert res.exit_code == 1 and res.output == refused_input(alias, colors)
    res = run(*adapt_args(colors, outer, "--force"))
    assert res.exit_code == 1 and res.output == refused_input(outer, colors, "contains")
    # a folder inside the input, reached by the other name, is still fine
    fileio.check_can_write(alias / "run", force=True, inputs=[colors])


def test_output_dir_marks_folders_without_a_manifest_so_force_can_replace_them(tmp_path):
    report, run_dir = tmp_path / "report", tmp_path / "run"
    with fileio.output_dir(report, force=False) as tmp:
        (tmp / "index.html").write_text("<p>1</p>")
    with fileio.output_dir(run_dir, force=False) as tmp:
        (tmp / "edgetransfer.json").write_text("{}")
    assert (report / fileio.MARKER).is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["edgetransfer.json"]  # no extra file
    with fileio.output_dir(report, force=True) as tmp:
        (tmp / "index.html").write_text("<p>2</p>")
    assert (report / "index.html").read_text() == "<p>2</p>"


def test_run_report_folder_is_replaced_with_its_run(digits_run, tmp_path):
    from edgetransfer.report import write_run_report

    rundir = tmp_path / "run"
    shutil.copytree(digits_run, rundir)
    assert (rundir / "report" / fileio.MARKER).is_file()
    (rundir / "report" / "stale.png").write_bytes(b"old")
    write_run_report(rundir, data_dir=tmp_path / "gone")
    assert not (rundir / "report" / "stale.png").exists()


# ---------------------------------------------------------------------------------------------
# "Also": two writers replacing one folder at the same time


def _hammer(out: Path, tag: str, n: int, failures: list, wins: list) -> None:
    for i in range(n):
        try:
            with fileio.output_dir(out, force=True) as tmp:
                (tmp / "a.txt").write_text(f"{tag}{i}")
                (tmp / "b.txt").write_text(f"{tag}{i}")
            wins.append(tag)
        except EdgeTransferError as e:  # a clean one-line refusal is allowed
            if "\n" in str(e):
                failures.append(e)
        except BaseException as e:  # noqa: BLE001 - anything else is the bug
            failures.append(e)


def test_two_threads_replacing_one_folder(tmp_path):
    out, failures, wins = tmp_path / "out", [], []
    threads = [threading.Thread(target=_hammer, args=(out, t, 200, failures, wins)) for t in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert min(wins.count("x"), wins.count("y")) >= 100, (wins.count("x"), wins.count("y"))
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text()  # one writer's folder
    assert temps(tmp_path) == []


_WRITER = """
import sys
import time
from pathlib import Path
from edgetransfer import fileio
from edgetransfer.errors import EdgeTransferError
out, tag = Path(sys.argv[1]), sys.argv[2]
while not (out.parent / "go").exists():  # both start together
    time.sleep(0.001)
wins = 0
for i in range(int(sys.argv[3])):
    try:
        with fileio.output_dir(out, force=True) as tmp:
            (tmp / "a.txt").write_text(f"{tag}{i}")
            (tmp / "b.txt").write_text(f"{tag}{i}")
        wins += 1
    except EdgeTransferError as e:
        assert "\\n" not in str(e), e
print(wins)
"""


def test_two_processes_replacing_one_folder(tmp_path):
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(out), tag, "200"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in "xy"
    ]
    time.sleep(1.0)  # both imported
    (tmp_path / "go").write_text("")
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(int(o) >= 100 for o, _ in outs), outs  # each wrote at least half of its 200
    assert (out / "a.txt").read_text() == (out / "b.txt").read_text()
    assert temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5f. errors name the user's path, never an internal temp path


def test_errors_inside_output_dir_name_the_users_path(tmp_path, monkeypatch):
    out = tmp_path / "exp"
    with pytest.raises(ExportError) as e:
        with fileio.output_dir(out, force=False) as tmp:
            raise ExportError(f"onnx.checker: cannot read {tmp / 'model.onnx'}")
    assert str(e.value) == f"onnx.checker: cannot read {out / 'model.onnx'}"
    # a failed rename names the file, not the temp file it came from
    real = os.replace

    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", src, None, dst)

    monkeypatch.setattr(fileio.os, "replace", denied)
    with pytest.raises(PermissionError) as e:
        fileio.atomic_write_text(tmp_path / "labels.txt", "a\n")
    assert e.value.filename == str(tmp_path / "labels.txt")
    assert fileio.TMP_PREFIX not in str(e.value.filename2 or "")
    with pytest.raises(PermissionError) as e:
        with fileio.output_dir(out, force=False) as tmp:
            pass
    names = [os.fsdecode(n) for n in (e.value.filename, e.value.filename2) if n is not None]
    assert names and not any(fileio.TMP_PREFIX in n for n in names), names
    monkeypatch.setattr(fileio.os, "replace", real)
    assert temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5b. a full disk during export is the promised one line, naming the user's file


def test_export_on_a_full_disk_names_the_file(digits_run, tmp_path, monkeypatch):
    out = tmp_path / "exp"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    res = run("export", digits_run, "--out", out, *FAST_EXPORT)
    assert res.exit_code == 1
    assert res.output == (
        f"Error: no space left on device while writing {out / 'model.onnx'}; free some space "
        "and run again\n"
    )
    assert not out.exists() and temps(tmp_path) == []


def test_export_full_disk_wrapped_by_the_exporter(digits_run, tmp_path, monkeypatch):
    out = tmp_path / "exp"

    def exporter(*a, **k):  # what torch's writers do: a RuntimeError raised during the ENOSPC
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr("edgetransfer.onnxio.torch_onnx_export", exporter)
    res = run("export", digits_run, "--out", out, *FAST_EXPORT)
    assert res.exit_code == 1
    assert res.output == (
        f"Error: no space left on device while writing {out / 'model.onnx'}; free some space "
        "and run again\n"
    )


# ---------------------------------------------------------------------------------------------
# 5c. a full disk while training or writing RUN_DIR leaves no checkpoint behind


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, b) -> int:
        if len(b) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def test_checkpoint_write_on_a_full_disk_is_an_oserror_naming_it(tmp_path, monkeypatch):
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real(obj, _FullDisk(f, 100)))
    ckpt = tmp_path / "run.checkpoint"
    with pytest.raises(OSError) as e:
        fuzz._ckpt_fit("adamw", ckpt, 2, False)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ckpt)
    assert list(tmp_path.iterdir()) == []


def test_adapt_on_a_full_disk_removes_its_checkpoint(colors, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def full(model, manifest, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("edgetransfer.adapt.save_model", full)
    res = run(*adapt_args(colors, out, "--no-cache"))
    assert res.exit_code == 1
    assert res.output.startswith("Error: no space left on device while writing ")
    assert fileio.TMP_PREFIX not in res.output and len(res.output.splitlines()) == 1
    assert not checkpoint_path(out).exists() and not out.exists()
    assert temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5d. SIGTERM during export: one line, exit 143, no temp folder left


def test_sigterm_during_export_cleans_up(digits_run, tmp_path):
    out = tmp_path / "exp"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgetransfer", "export", str(digits_run), "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not temps(tmp_path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert temps(tmp_path), "export never started writing"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.splitlines()[-1] == "Terminated (SIGTERM); nothing was written.", err
    assert "Traceback" not in err
    assert temps(tmp_path) == [] and not out.exists()


def test_second_sigterm_during_training_ends_as_sigterm(colors, tmp_path, monkeypatch):
    import edgetransfer.adapt as adapt_mod

    real = adapt_mod.AdaptConfig

    def twice(epoch, step):  # the first asks to stop after the step, the second ends it now
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(adapt_mod, "AdaptConfig", lambda **kw: real(**kw, on_step=twice))
    out = tmp_path / "run"
    res = run(*adapt_args(colors, out, "--no-cache"))
    assert res.exit_code == 128 + signal.SIGTERM, res.output
    assert res.output == "Terminated (SIGTERM); nothing was written.\n"
    assert not out.exists() and temps(tmp_path) == []


def test_an_ignored_sigterm_stays_ignored(colors, monkeypatch):
    """A process started with SIGTERM ignored (nohup-like launchers) keeps ignoring it."""
    from edgetransfer.errors import DataError
    from edgetransfer.train import Stop

    seen = []

    def scan(*a, **k):
        seen.append(signal.getsignal(signal.SIGTERM))
        with Stop():
            seen.append(signal.getsignal(signal.SIGTERM))
        raise DataError("stop here")

    patch_everywhere(monkeypatch, "edgetransfer.data.scan", scan)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        res = run(*adapt_args(colors, colors.parent / "run"))
        after = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert res.exit_code == 1 and res.output == "Error: stop here\n"
    assert seen == [signal.SIG_IGN, signal.SIG_IGN] and after is signal.SIG_IGN


# ---------------------------------------------------------------------------------------------
# 5e. a read-only EXPORT_DIR in verify: no advice about an --out verify does not have


def test_verify_on_a_read_only_folder_fits_the_command(digits_export, monkeypatch):
    def read_only(fd):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fileio.os, "fsync", read_only)
    res = run("verify", digits_export, "--data", DIGITS, "--limit", "5", "--trust-torchscript")
    # the comparison stands: one warning naming the file, no advice about an --out it lacks
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    warned = [ln for ln in lines if ln.startswith("Warning:")]
    assert warned == [
        f"Warning: {digits_export / 'parity.json'} not written (Read-only file system); the "
        "results below stand: verify a writable copy of the folder to keep parity.json"
    ]
    assert "--out" not in res.output and not any(ln.startswith("wrote") for ln in lines)
    assert lines[-1] == "parity: PASS"


# ---------------------------------------------------------------------------------------------
# 5a. malformed checkpoints: one line on --resume, never torch's weights_only advice

DAMAGED = r"^checkpoint .+ is damaged \(.+\); delete it or run without --resume$"


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    work = tmp_path_factory.mktemp("ckpt")
    return dict(zip(("adamw", "lbfgs", "mid"), fuzz.checkpoint_seeds(work), strict=True))


def _state(seeds, which):
    return torch.load(io.BytesIO(seeds[which][1]), weights_only=True)


def _damage_cases():
    def drop(key):
        def f(s):
            del s[key]
            return s

        return f

    def opt_moment(s):
        s["opt"]["state"][0]["exp_avg"] = torch.zeros(2, 2)
        return s

    def lbfgs_history(s):
        s["opt"]["state"][0]["ro"].pop()
        return s

    def weights_shape(s):
        s["model"]["weight"] = torch.zeros(3, 7)
        return s

    def rng(s):
        s["rng"] = torch.zeros(10, dtype=torch.uint8)
        return s

    def epoch(s):
        s["epoch"] = 99
        return s

    def history(s):
        s["history"] = ["x"] * (s["epoch"] - 1)
        return s

    return {
        "a list": ("adamw", lambda s: [s]),
        "missing keys": ("adamw", drop("opt")),
        "wrong shapes": ("adamw", weights_shape),
        "a bad RNG state": ("mid", rng),
        "an optimizer moment of another shape": ("adamw", opt_moment),
        "an L-BFGS history out of step": ("lbfgs", lbfgs_history),
        "an epoch past the run": ("adamw", epoch),
        "history rows that are not rows": ("adamw", history),
    }


@pytest.mark.parametrize("case", sorted(_damage_cases()))
def test_malformed_checkpoint_is_one_line(seeds, tmp_path, case):
    solver, damage = _damage_cases()[case]
    path = tmp_path / "run.checkpoint"
    torch.save(damage(_state(seeds, solver)), path)
    with pytest.raises(EdgeTransferError, match=DAMAGED) as e:
        fuzz._ckpt_fit(seeds[solver][0], path, 3, True)
    assert "\n" not in str(e.value)


def test_random_bytes_checkpoint_hides_torchs_advice(seeds, tmp_path):
    path = tmp_path / "run.checkpoint"
    path.write_bytes(os.urandom(300))
    with pytest.raises(EdgeTransferError, match=DAMAGED) as e:
        fuzz._ckpt_fit("adamw", path, 3, True)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)


def test_adapt_resume_with_a_damaged_checkpoint(colors, tmp_path):
    out = tmp_path / "run"
    checkpoint_path(out).write_bytes(b"PK\x03\x04" + os.urandom(200))
    res = run(*adapt_args(colors, out, "--resume", "--no-cache"))
    assert res.exit_code == 1
    assert res.output == (
        f"Error: checkpoint {checkpoint_path(out)} is damaged (not a readable checkpoint: "
        "RuntimeError); delete it or run without --resume\n"
    )


def test_the_seed_checkpoints_resume(seeds, tmp_path):
    """The fuzz seeds are accepted: the checkpoint mode is not rejecting everything."""
    for name, (solver, data) in seeds.items():
        path = tmp_path / f"{name}.ckpt"
        path.write_bytes(data)
        assert fuzz.check_checkpoint(path, solver) == "decoded", name


def test_fuzz_checkpoint_mode_small_budget(tmp_path):
    counts = fuzz.fuzz_checkpoint(20, 0, None, tmp_path)  # seed 0: 3 decoded, 17 rejected
    assert counts["crashes"] == 0, counts["first_crash"]
    assert counts["decoded"] > 0 and counts["rejected"] > 0


def test_fuzz_checkpoint_mode_counts_crashes(tmp_path, monkeypatch):
    def broken(path, solver):
        raise KeyError("model")

    monkeypatch.setattr(fuzz, "check_checkpoint", broken)
    assert fuzz.fuzz_checkpoint(3, 0, None, tmp_path)["crashes"] == 3
