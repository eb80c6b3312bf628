"""HTML reports are checked for real: they parse, every picture exists and is a valid PNG, and
(when Chromium is installed) they render to a non-blank page."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgetransfer.cli import cli
from edgetransfer.report import write_run_report

from .conftest import DIGITS

LABELS = ["eight", "five", "nine", "seven", "six"]


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.headings: list[str] = []
        self.cells: list[str] = []
        self._tag = ""
        self._in_td = False

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        self._in_td = self._in_td or tag == "td"
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        if self._tag in ("h1", "h2"):
            self.headings.append(data.strip())
        elif self._in_td:
            self.cells.append(data.strip())

    def handle_endtag(self, tag):
        self._tag = ""
        self._in_td = self._in_td and tag != "td"


def check_page(path: Path) -> _Page:
    """Parse the page and verify every referenced picture is a real PNG beside it."""
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert page.images, "the report has no pictures"
    for src in page.images:
        assert "://" not in src and not src.startswith("/"), src  # relative: the folder moves
        img = path.parent / unquote(src)
        assert img.is_file(), src
        with Image.open(img) as im:
            assert im.format == "PNG"
            im.verify()
    return page


def test_evaluate_report(digits_export, tmp_path):
    out = tmp_path / "rep"
    res = CliRunner().invoke(
        cli, ["evaluate", str(digits_export), str(DIGITS), "--report", str(out), "--json"]
    )
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["report"] == str(out / "index.html")
    page = check_page(out / "index.html")
    assert "confusion.png" in page.images
    wrong = sum(d["confusion"]["matrix"][i][j] for i in range(5) for j in range(5) if i != j)
    assert len([s for s in page.images if s.startswith("mistakes/")]) == min(wrong, 24)
    assert f"Most confident mistakes ({min(wrong, 24)} of {wrong})" in page.headings
    assert all(label in page.cells for label in LABELS)  # the per-class table
    assert json.loads((out / "metrics.json").read_text())["top1"] == d["top1"]


def test_mistake_thumbnails_in_order_and_a_vanished_file_left_out(digits_export, tmp_path):
    """Thumbnails are made by threads: the grid keeps the most-confident-first order, and an
    image that is gone by the time its thumbnail is made is left out, not an error."""
    from edgetransfer.evaluate import evaluate
    from edgetransfer.report import write_eval_report

    data = tmp_path / "data"
    shutil.copytree(DIGITS, data)
    # the shipped model gets the validation digits right: four of the fives, given pictures of
    # nines (the split is by name, not content), make mistakes to show
    fives = [p for p in evaluate(digits_export, data).paths if Path(p).parent.name == "five"]
    for five, nine in zip(fives[:4], sorted((data / "nine").glob("*.png")), strict=False):
        shutil.copyfile(nine, five)
    result = evaluate(digits_export, data)
    wrong = result.mistakes(24)
    assert len(wrong) >= 3, "the nines in five/ should be mistakes"
    Path(wrong[1].path).unlink()
    filters = list(warnings.filters)
    index = write_eval_report(result, tmp_path / "rep")
    assert warnings.filters == filters  # silenced around the threads, then restored
    page = check_page(index)
    shown = [s for s in page.images if s.startswith("mistakes/")]
    assert len(shown) == len(wrong) - 1
    html_text = index.read_text(encoding="utf-8")

    def caption(m):  # class folder/file name: unique, where file names repeat across classes
        return f'<span class="file">{Path(m.path).parent.name}/{Path(m.path).name}</span>'

    positions = [html_text.index(caption(m)) for i, m in enumerate(wrong) if i != 1]
    assert positions == sorted(positions)
    assert caption(wrong[1]) not in html_text


def test_adapt_writes_run_report(digits_run):
    """The session's adapted RUN_DIR has report.html: curves, confusion matrix, mistakes."""
    page = check_page(digits_run / "report.html")
    assert {"report/curves.png", "report/confusion.png"} <= set(page.images)
    assert "Training curves" in page.headings and "Per class" in page.headings
    manifest = json.loads((digits_run / "edgetransfer.json").read_text())
    assert f"{manifest['metrics']['val_top1']:.1%}" in page.cells  # same val top-1 as adapt


def test_run_report_without_data_has_curves_only(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    (run / "run.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    index = write_run_report(run)
    page = check_page(index)
    assert page.images == ["report/curves.png"]
    assert "The data folder of this run is gone" in index.read_text()


def _evaluate_must_not_run(*a, **k):
    raise AssertionError("the report ran the model although it was given the logits")


def test_run_report_from_logits_has_the_same_content_without_running_the_model(
    digits_run, tmp_path, monkeypatch
):
    from edgetransfer.evaluate import evaluate

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    ran = evaluate(run, DIGITS, split="val")
    want = write_run_report(run, data_dir=DIGITS).read_text()  # runs the model
    monkeypatch.setattr("edgetransfer.evaluate.evaluate", _evaluate_must_not_run)
    got = write_run_report(run, data_dir=DIGITS, val_logits=np.log(ran.probs)).read_text()
    assert got == want
    check_page(run / "report.html")


def test_run_report_shows_the_logits_it_is_given_and_lists_bad_files(
    digits_run, tmp_path, monkeypatch
):
    from edgetransfer.data import scan

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    val = scan(DIGITS).split("val")
    bad = [(val[0].path, "truncated")]
    logits = np.zeros((len(val) - 1, len(LABELS)))
    logits[:, 0] = 1.0  # everything is an "eight"
    monkeypatch.setattr("edgetransfer.evaluate.evaluate", _evaluate_must_not_run)
    index = write_run_report(run, data_dir=DIGITS, val_logits=logits, bad=bad)
    page = check_page(index)
    eights = sum(s.label == 0 for s in val[1:])
    assert f"{eights / (len(val) - 1):.1%}" in page.cells  # validation top-1
    assert "Unreadable images (1)" in page.headings
    assert f"{val[0].path}: truncated" in index.read_text()


def test_run_report_runs_the_model_when_the_logits_do_not_fit_the_split(digits_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    index = write_run_report(run, data_dir=DIGITS, val_logits=np.zeros((3, len(LABELS))))
    manifest = json.loads((run / "edgetransfer.json").read_text())
    assert f"{manifest['metrics']['val_top1']:.1%}" in check_page(index).cells


def test_adapt_without_matplotlib_skips_report_with_note(colors, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        [
            "adapt",
            str(colors),
            "--arch",
            "tiny_test",
            "--weights",
            "none",
            "--epochs",
            "2",
            "--out",
            str(out),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (
        "no report.html: the HTML report needs matplotlib: pip install 'edgetransfer[report]'"
        in res.output
    )
    assert (out / "model.safetensors").is_file() and not (out / "report.html").exists()


def test_adapt_no_report_writes_the_run_without_it(colors, tmp_path):
    out = tmp_path / "run"
    args = ["adapt", str(colors), "--arch", "tiny_test", "--weights", "none", "--epochs", "2"]
    res = CliRunner().invoke(cli, [*args, "--no-report", "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "history.json").is_file()
    assert not (out / "report.html").exists() and not (out / "report").exists()
    assert "report.html" not in res.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


# CI installs Chromium and sets ET_REQUIRE_BROWSER=1: there a missing browser is a failure.
@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("ET_REQUIRE_BROWSER"),
    reason="Chromium is not installed",
)
def test_report_renders_in_chromium(digits_export, tmp_path):
    assert CHROMIUM is not None, "ET_REQUIRE_BROWSER=1 but no chromium on PATH"
    from edgetransfer.evaluate import evaluate
    from edgetransfer.report import write_eval_report

    index = write_eval_report(evaluate(digits_export, DIGITS), tmp_path / "rep")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            index.absolute().as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    with Image.open(shot) as im:
        a = np.asarray(im.convert("L"))
    assert a.shape == (1600, 1200)
    dark = (a < 128).mean()  # text, plot lines and the confusion matrix's dark cells
    assert 0.01 < dark < 0.5, dark
    assert len(np.unique(a)) > 50  # plots and thumbnails, not a flat page
