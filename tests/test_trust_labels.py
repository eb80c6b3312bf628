"""Received artifacts and hostile names (issue 13, items 3-5): TorchScript is loaded only when the
user chooses it, labels are checked wherever a manifest is read or a class folder scanned, plot
text is plain, FIFOs are never opened, and predict lists what it skipped."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import signal
import unicodedata
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgetransfer.cli import cli
from edgetransfer.data import list_images, load_image, scan
from edgetransfer.errors import DataError, EdgeTransferWarning, ManifestError, printable
from edgetransfer.manifest import (
    METADATA_KEY,
    Manifest,
    Preprocessing,
    read_manifest,
    untrusted_skip,
)
from edgetransfer.runtime import OnnxClassifier, TorchClassifier

from .conftest import DIGITS, make_images, run

_spec = importlib.util.spec_from_file_location(
    "et_fuzz", Path(__file__).resolve().parents[1] / "tools" / "fuzz.py"
)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


# --------------------------------------------------------------------------- item 3: TorchScript


class WritesFiles(torch.nn.Module):
    """A real TorchScript payload: its __setstate__ (run by torch.jit.load) and its forward
    create files through torch.from_file(shared=True), which opens with O_CREAT."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def forward(self, x):
        t = torch.from_file(self.where + "/ran_forward", shared=True, size=4, dtype=torch.uint8)
        t.fill_(65)
        return torch.zeros(x.shape[0], 5) + t.sum() * 0

    @torch.jit.export
    def __getstate__(self) -> list[str]:
        return [self.where, str(self.training)]

    @torch.jit.export
    def __setstate__(self, state: list[str]) -> None:
        self.where = state[0]
        t = torch.from_file(self.where + "/ran_load", shared=True, size=4, dtype=torch.uint8)
        t.fill_(66)
        self.training = state[1] == "True" and int(t.sum()) >= 0


@pytest.fixture
def hostile_export(digits_export, tmp_path) -> tuple[Path, Path]:
    """A copy of the digits EXPORT_DIR whose model.pt writes files; (folder, marker folder)."""
    out, marks = tmp_path / "received", tmp_path / "marks"
    shutil.copytree(digits_export, out)
    marks.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(WritesFiles(str(marks)))
        manifest = (digits_export / "edgetransfer.json").read_text()
        torch.jit.save(
            scripted, str(out / "model.pt"), _extra_files={"edgetransfer.json": manifest}
        )
    return out, marks


def test_the_payload_really_runs_code(hostile_export):
    """The fixture is a real demonstration: loading it (as verify did implicitly) writes a file."""
    folder, marks = hostile_export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        m = torch.jit.load(str(folder / "model.pt"))
    assert (marks / "ran_load").read_bytes() == b"BBBB"
    m(torch.zeros(1, 3, 32, 32))
    assert (marks / "ran_forward").read_bytes() == b"AAAA"


def test_verify_does_not_load_torchscript_unless_trusted(hostile_export):
    folder, marks = hostile_export
    res = run("verify", folder, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    assert list(marks.iterdir()) == []  # no code of model.pt ran
    assert (
        "Warning: model.pt not verified: TorchScript is code and runs when loaded; pass "
        "--trust-torchscript to include it (only for a folder you exported or trust)"
    ) in res.output
    assert "torchscript" not in json.loads((folder / "parity.json").read_text())["runtimes"]
    assert res.output.rstrip().endswith("parity: PASS")

    res = run("verify", folder, "--data", DIGITS, "--trust-torchscript")  # the user's choice
    assert (marks / "ran_load").exists() and (marks / "ran_forward").exists()
    assert res.exit_code == 1 and "Error: parity failed: torchscript:" in res.output


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pt2_is_not_loaded_unless_trusted(digits_export, tmp_path):
    """torch.export.load unpickles a weight marked use_pickle (torch.load, weights_only=False):
    a crafted .pt2 runs code as it loads, even when loading then fails. Same rule as model.pt."""
    import pickle
    import zipfile

    folder, marker = tmp_path / "received", tmp_path / "ran_pt2"
    shutil.copytree(digits_export, folder)
    (folder / "model.pt").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(torch.nn.Linear(3, 2), (torch.zeros(1, 3),))
        buf = io.BytesIO()
        torch.export.save(program, buf)
    with zipfile.ZipFile(buf) as src:
        files = {info.filename: src.read(info) for info in src.infolist()}
    config_name = next(n for n in files if n.endswith("model_weights_config.json"))
    config = json.loads(files[config_name])
    entry = config["config"]["bias"]
    entry["use_pickle"] = True  # the bias "weight" is now a pickle: the payload
    files[config_name] = json.dumps(config).encode()
    files[next(n for n in files if n.endswith("/weights/" + entry["path_name"]))] = pickle.dumps(
        _Payload(marker)
    )
    with zipfile.ZipFile(folder / "model.pt2", "w") as dst:
        for name, data in files.items():
            dst.writestr(name, data)

    res = run("verify", folder, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    assert not marker.exists()
    assert "Warning: model.pt2 not verified: torch.export's loader unpickles" in res.output

    res = run("verify", folder, "--data", DIGITS, "--trust-torchscript")  # the user's choice
    assert marker.exists()  # the payload ran: what the flag protects against
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1].startswith("Error: model.pt2 is not loadable: ")


def test_unloadable_torchscript_is_one_line(digits_export, tmp_path):
    folder = tmp_path / "received"
    shutil.copytree(digits_export, folder)
    (folder / "model.pt").write_bytes(b"PK\x03\x04 truncated")
    res = run("verify", folder, "--data", DIGITS, "--trust-torchscript")
    assert res.exit_code == 1
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("Error: model.pt is not loadable: ") and "Traceback" not in res.output


def test_bench_does_not_load_torchscript_unless_trusted(hostile_export):
    folder, marks = hostile_export
    for name in ("model.raw.onnx", "model.safetensors"):  # fewer runtimes: a faster test
        (folder / name).unlink()
    res = run("bench", folder, "--runs", "1", "--warmup", "0", "--batch-size", "1", "--json")
    assert res.exit_code == 0, res.output
    assert list(marks.iterdir()) == []
    assert untrusted_skip("model.pt", "not measured") in res.output
    rows = json.loads(res.output[res.output.index("{") :])["runtimes"]
    assert list(rows) == ["ort-fp32"]


def test_predict_never_picks_torchscript_from_a_folder(hostile_export, tmp_path):
    folder, marks = hostile_export
    only_pt = tmp_path / "only_pt"
    only_pt.mkdir()
    shutil.copy(folder / "model.pt", only_pt / "model.pt")
    shutil.copy(folder / "edgetransfer.json", only_pt / "edgetransfer.json")
    image = DIGITS / "five" / "001.png"
    for command in (["predict", only_pt, image], ["evaluate", only_pt, DIGITS]):
        res = run(*command)
        assert res.exit_code == 1
        assert res.output.startswith(f"Error: {only_pt} has neither model.onnx nor ")
        assert "(model.pt is not used from a folder: it can run code when loaded" in res.output
    assert list(marks.iterdir()) == []
    res = run("predict", only_pt / "model.pt", image)  # named explicitly: the user's choice
    assert res.exit_code == 0 and (marks / "ran_load").exists()
    help_text = run("predict", "--help").output
    assert "TorchScript files are code" in help_text


# --------------------------------------------------------------------- item 4: labels, manifests

P = Preprocessing(input_size=(32, 32), resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def manifest_dict(labels, source: dict | None = None) -> dict:
    d = Manifest(arch="tiny_test", labels=["a", "b"], preprocessing=P).to_dict()
    d["labels"] = labels
    if source is not None:
        d["source"] = source
    return d


NFC, NFD = unicodedata.normalize("NFC", "caf\u00e9"), unicodedata.normalize("NFD", "caf\u00e9")


@pytest.mark.parametrize(
    "labels, message",
    [
        (["cat", "dog", "cat"], r"^manifest labels 'cat' and 'cat' are the same; class names "),
        ([NFC, NFD], r"'caf\\xe9' and 'cafe\\u0301' are the same after Unicode normalisation"),
        (["cat", "a\x1b[31mred"], r"^manifest label 'a\\x1b\[31mred' contains the control "
         r"character U\+001B; re-export the model with valid class names$"),
        (["cat", "x\x1b]0;pwned\x07"], r"contains the control character U\+001B"),
        (["cat", "ok\rdog"], r"contains the control character U\+000D"),
        (["cat", "del\x7f"], r"contains the control character U\+007F"),
        (["cat", "c1\x9b31m"], r"contains the control character U\+009B"),
        (["cat", "two\nlines"], r"contains the control character U\+000A"),
        (["cat", "rtl\u202eevil"], r"contains the control character U\+202E"),
        (["cat", "\ud800"], r"is not valid Unicode"),
        (["cat", ""], r"label '' is empty"),
        (["cat", "x" * 257], r"is 257 characters long \(at most 256\)"),
        (["c"] * 100_001, r"^100,001 manifest labels is more than the 100,000 supported$"),
    ],
)  # fmt: skip
def test_bad_labels_are_refused_on_read(labels, message, tmp_path):
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(manifest_dict(labels))
    path = tmp_path / "edgetransfer.json"
    path.write_text(json.dumps(manifest_dict(labels)))
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_source_labels_are_checked_too():
    with pytest.raises(ManifestError, match=r"^manifest source labels 'a' and 'a' are the same"):
        Manifest.from_dict(manifest_dict(["x", "y"], {"labels": ["a", "a"]}))
    with pytest.raises(ManifestError, match="'source.labels' is not a list of strings"):
        Manifest.from_dict(manifest_dict(["x", "y"], {"labels": "ab"}))


def test_case_only_labels_are_warned():
    with pytest.warns(EdgeTransferWarning, match="^classes 'Cat' and 'cat' differ only in case"):
        m = Manifest.from_dict(manifest_dict(["Cat", "cat"]))
    assert m.labels == ["Cat", "cat"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Manifest.from_dict(manifest_dict(["a" * 256, NFC, "\u732b", "$\\foo$"]))  # all fine


def relabel(export_dir: Path, out: Path, labels: list) -> Path:
    """Copy model.onnx with `labels` in its manifest."""
    model = onnx.load(str(export_dir / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            d = json.loads(prop.value)
            d["labels"] = labels
            prop.value = json.dumps(d)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))
    return out / "model.onnx"


@pytest.mark.parametrize("count", [4, 6, 1000])
def test_label_count_must_match_outputs(digits_export, tmp_path, count):
    """Too few labels gave tracebacks; too many were silently cut to the model's 5 outputs.
    The digits model declares its 5 outputs: refused when loaded."""
    labels = (["eight", "five", "nine", "seven", "six"] + [f"c{i}" for i in range(count)])[:count]
    path = relabel(digits_export, tmp_path / "m", labels)
    want = (
        f"Error: model.onnx: its manifest lists {count} labels but the model outputs Nx5; "
        "labels and model do not belong together (re-export it with edgetransfer)\n"
    )
    for args in (["predict", path, DIGITS / "five" / "001.png"], ["evaluate", path, DIGITS]):
        res = run(*args)
        assert res.exit_code == 1 and res.output == want, res.output


@pytest.mark.parametrize("count", [4, 6])
def test_label_count_checked_on_first_output(tmp_path, count):
    """A model whose width is not declared (named dimensions) is checked when it first runs."""
    model = fuzz.labels_model(dynamic=True)
    labels = (fuzz.LABELS_BASE + ["extra"])[:count]
    m = Manifest("tiny_test", labels, Preprocessing((5, 5), 5, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    model.metadata_props.add(key=METADATA_KEY, value=m.to_json())
    onnx.save(model, str(tmp_path / "model.onnx"))
    make_images(tmp_path / "data", per_class=2, size=(6, 6), classes={"cat": (9, 9, 9)})
    clf = OnnxClassifier(tmp_path / "model.onnx")  # loads: only running it can tell
    assert clf.session.get_outputs()[0].shape == ["N", "W"]
    res = run("predict", tmp_path / "model.onnx", tmp_path / "data")
    assert res.exit_code == 1 and res.output == (
        f"Error: model.onnx: its manifest lists {count} labels but the model outputs 2x5; "
        "labels and model do not belong together (re-export it with edgetransfer)\n"
    )


def test_torch_backend_checks_label_count_on_first_output(digits_run):
    from edgetransfer.runs import load_run

    model, manifest = load_run(digits_run)
    fewer = Manifest.from_dict({**manifest.to_dict(), "labels": manifest.labels[:4]})
    clf = TorchClassifier.from_module(model, fewer, digits_run)
    with pytest.raises(
        ManifestError, match="its manifest lists 4 labels but the model outputs 2x5"
    ):
        clf.logits(np.zeros((2, 3, 32, 32), np.float32))


def test_hostile_label_never_reaches_the_terminal(digits_export, tmp_path):
    osc = "five\x1b]0;owned\x07"
    path = relabel(digits_export, tmp_path / "m", ["eight", osc, "nine", "seven", "six"])
    res = run("predict", path, DIGITS / "five" / "001.png")
    assert res.exit_code == 1 and "\x1b" not in res.output and "\x07" not in res.output
    assert res.output == (
        "Error: manifest label 'five\\x1b]0;owned\\x07' contains the control character U+001B; "
        "re-export the model with valid class names\n"
    )


def test_duplicate_labels_cannot_skew_metrics(digits_export, tmp_path):
    """evaluate once reported 50% top-1 for a perfect model whose labels repeated."""
    path = relabel(digits_export, tmp_path / "m", ["eight", "five", "nine", "seven", "five"])
    res = run("evaluate", path, DIGITS)
    assert res.exit_code == 1
    assert res.output == (
        "Error: manifest labels 'five' and 'five' are the same; class names must be unique\n"
    )


def _class_folders(root: Path, *names: str) -> Path:
    for name in names:
        make_images(root, per_class=3, classes={name: (200, 40, 40)})
    return root


def test_class_folder_with_newline_is_refused(tmp_path):
    root = _class_folders(tmp_path / "d", "ok", "two\nlines")
    with pytest.raises(DataError, match=r"^class folder 'two\\nlines' contains the control"):
        scan(root)
    res = run("adapt", root, "--arch", "tiny_test", "--weights", "none", "--out", tmp_path / "r")
    assert res.exit_code == 1 and res.output == (
        "Error: class folder 'two\\nlines' contains the control character U+000A; rename it\n"
    )
    assert not (tmp_path / "r").exists()


def test_class_folders_equal_after_normalisation_are_refused(tmp_path):
    root = _class_folders(tmp_path / "d", NFC, NFD)
    if len(os.listdir(root)) < 2:
        pytest.skip("this file system normalises names itself")
    with pytest.raises(DataError, match="are the same after Unicode normalisation; class names"):
        scan(root)


def test_case_only_class_folders_warn(tmp_path):
    root = _class_folders(tmp_path / "d", "Cat", "cat")
    if len(os.listdir(root)) < 2:
        pytest.skip("case-insensitive file system")
    with pytest.warns(EdgeTransferWarning, match="^classes 'Cat' and 'cat' differ only in case"):
        ds = scan(root)
    assert ds.classes == ["Cat", "cat"]
    res = run("adapt", root, "--arch", "tiny_test", "--weights", "none", "--epochs", "1",
              "--out", tmp_path / "run")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.count("differ only in case") == 1  # scan and manifest reads: one line


def test_math_markup_class_name_is_plain_text(tmp_path):
    """`$\\foo$` was parsed as mathtext: adapt died after training and wrote no RUN_DIR."""
    root = make_images(tmp_path / "d", per_class=4, classes={"$\\foo$": (200, 40, 40),
                                                            "a$b": (40, 40, 200)})  # fmt: skip
    out = tmp_path / "run"
    res = run("adapt", root, "--arch", "tiny_test", "--weights", "none", "--epochs", "1",
              "--out", out)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (out / "report.html").is_file() and (out / "report" / "confusion.png").is_file()
    res = run("evaluate", out, root, "--report", tmp_path / "rep")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rep" / "confusion.png").is_file()


# -------------------------------------------------------------- item 5: FIFOs, skips, one image


@pytest.fixture
def alarm():
    """Fail instead of hanging forever."""

    def boom(*_):
        raise TimeoutError("hung")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_skipped_not_opened(colors, tmp_path, alarm):
    os.mkfifo(colors / "red" / "zz.png")
    assert colors / "red" / "zz.png" in list_images(colors / "red")  # listed, then refused
    with pytest.raises(DataError, match=r"^zz.png: not a regular file \(a FIFO\)"):
        load_image(colors / "red" / "zz.png")
    out = tmp_path / "run"
    res = run("adapt", colors, "--arch", "tiny_test", "--weights", "none", "--epochs", "1",
              "--out", out, "--no-report")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "zz.png: not a regular file (a FIFO)" in (out / "bad_files.txt").read_text()
    res = run("evaluate", out, colors)
    assert res.exit_code == 0, res.output
    assert "skipped 1 unreadable image(s): zz.png: not a regular file (a FIFO)" in res.output


def test_device_file_is_refused(tmp_path):
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    with pytest.raises(DataError, match=r"^zero.png: not a regular file \(a device or socket\)"):
        load_image(link)


def test_predict_skips_and_lists_unreadable_files(digits_export, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "c.png"):
        shutil.copy(DIGITS / "six" / "001.png", folder / name)
    (folder / "b.png").write_bytes(b"not a png")
    res = CliRunner().invoke(cli, ["predict", str(digits_export), str(folder), "--json"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [Path(r["path"]).name for r in rows] == ["a.png", "c.png"]
    assert res.stderr == (
        f"skipped unreadable {folder / 'b.png'}: not a readable image (cannot identify image "
        f"file '{folder / 'b.png'}')\n"
    )
    (folder / "a.png").write_bytes(b"")
    (folder / "c.png").write_bytes(b"")
    res = CliRunner().invoke(cli, ["predict", str(digits_export), str(folder)])
    assert res.exit_code == 1 and res.stderr.endswith("Error: none of the 3 images could be read\n")


def test_predict_names_an_odd_unreadable_file_once(digits_export, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(DIGITS / "six" / "001.png", folder / "a.png")
    odd = os.fsdecode(bytes(folder) + b"/b\xff.png")  # not valid UTF-8
    Path(odd).write_bytes(b"not a png")
    res = CliRunner().invoke(cli, ["predict", str(digits_export), str(folder)])
    assert res.exit_code == 0, res.output
    (line,) = res.stderr.splitlines()
    # the name once, then the reason (not "name: name: not a readable image")
    assert line.startswith(f"skipped unreadable {printable(odd)}: not a readable image ("), line


def test_single_image_class_is_warned(tmp_path):
    root = make_images(tmp_path / "d", per_class=4)
    for f in sorted((root / "blue").iterdir())[1:]:
        f.unlink()
    with pytest.warns(EdgeTransferWarning, match="^class blue has a single image: it trains on it"):
        ds = scan(root)
    assert not [s for s in ds.split("val") if ds.classes[s.label] == "blue"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan(root, val_fraction=0)  # no validation asked for: nothing to warn about


# ------------------------------------------------------------------ fuzz: manifests vs a model


def test_fuzz_manifest_vs_model_small_budget(tmp_path):
    counts = fuzz.fuzz_labels(150, seed=1, crashes=None, work=tmp_path)
    assert counts["crashes"] == 0, counts["first_crash"]
    # both outcomes are exercised (seed 1: 46 decoded, 104 rejected)
    assert counts["decoded"] > 20 and counts["rejected"] > 50


def test_fuzz_manifest_vs_model_detects_a_crash(tmp_path, monkeypatch):
    """The property can fail: a foreign exception on the predict path counts as a crash."""

    def broken(self, batch):
        raise IndexError("list index out of range")

    monkeypatch.setattr(OnnxClassifier, "logits", broken)
    counts = fuzz.fuzz_labels(20, seed=1, crashes=tmp_path / "crashes", work=tmp_path)
    assert counts["crashes"] > 0 and counts["decoded"] == 0  # every accepted one crashed
    assert len(list((tmp_path / "crashes").iterdir())) == counts["crashes"]
    assert "IndexError" in counts["first_crash"]


def test_source_labels_differing_in_case_do_not_warn_on_every_read(digits_run):
    # ImageNet's own classes include 'Cardigan' and 'cardigan': every run would warn.
    d = read_manifest(digits_run).to_dict()
    d["source"]["labels"] = ["Cardigan", "cardigan", "crane"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgeTransferWarning)
        Manifest.from_dict(d)
    d["labels"] = ["Cardigan", "cardigan", "crane", "x", "y"]
    with pytest.warns(EdgeTransferWarning, match="differ only in case"):
        Manifest.from_dict(d)


def test_verify_says_model_pt_was_skipped_when_it_is_all_there_is(digits_export, tmp_path):
    export_dir = tmp_path / "export"
    shutil.copytree(digits_export, export_dir)
    for f in export_dir.glob("model*.onnx"):
        f.unlink()
    (export_dir / "model.pt2").unlink(missing_ok=True)
    res = CliRunner().invoke(cli, ["verify", str(export_dir), "--data", str(DIGITS)])
    assert res.exit_code == 1
    last = res.output.strip().splitlines()[-1]
    assert "no exported model to verify" in last
    assert "model.pt skipped: pass --trust-torchscript" in last
