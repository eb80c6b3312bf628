"""Metrics (numpy only) against hand-computed values, and the evaluate command."""

import json
import sys

import numpy as np
import pytest

from edgetransfer.evaluate import compute_metrics, confusion_matrix

from .conftest import DIGITS, make_images, run


def test_metrics_by_hand():
    labels = ["a", "b", "c"]
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 1, 1])  # c is never predicted
    scores = np.eye(3)[pred]
    m = compute_metrics(scores, truth, labels)
    np.testing.assert_array_equal(m.confusion, [[2, 1, 0], [0, 2, 0], [0, 1, 0]])
    assert m.top1 == pytest.approx(4 / 6)
    assert m.top5_k == 3 and m.top5 == 1.0
    a, b, c = (m.per_class[x] for x in labels)
    assert (a.precision, a.recall, a.support) == (1.0, pytest.approx(2 / 3), 3)
    assert a.f1 == pytest.approx(0.8)
    assert (b.precision, b.recall) == (0.5, 1.0) and b.f1 == pytest.approx(2 / 3)
    assert (c.precision, c.recall, c.f1, c.support) == (0.0, 0.0, 0.0, 1)
    assert m.macro_f1 == pytest.approx((0.8 + 2 / 3) / 3)
    d = m.to_dict()
    assert d["confusion"]["matrix"][0] == [2, 1, 0] and d["images"] == 6


def test_top5_with_many_classes():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 12))
    truth = rng.integers(0, 12, 50)
    m = compute_metrics(scores, truth, [str(i) for i in range(12)])
    rank = (scores > scores[np.arange(50), truth][:, None]).sum(1)  # better-scored classes
    assert m.top5_k == 5
    assert m.top5 == pytest.approx((rank < 5).mean())
    assert m.top1 == pytest.approx((rank == 0).mean()) and m.top1 <= m.top5
    assert confusion_matrix(truth, scores.argmax(1), 12).sum() == 50


def test_evaluate_export_on_all_images(digits_export):
    res = run("evaluate", digits_export, DIGITS, "--json", "--mistakes", "3")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)  # stdout is pure JSON (no progress bar there)
    assert d["images"] == 200 and d["split"] == "all" and d["report"] is None
    assert sum(map(sum, d["confusion"]["matrix"])) == 200
    assert d["top1"] >= 0.9 and d["top5"] == 1.0
    assert set(d["per_class"]) == {"five", "six", "seven", "eight", "nine"}
    assert all(v["support"] == 40 for v in d["per_class"].values())
    assert len(d["mistakes"]) <= 3
    probs = [m["prob"] for m in d["mistakes"]]
    assert probs == sorted(probs, reverse=True)


def test_val_split_matches_adapt(digits_run):
    """On the RUN_DIR's own validation split, eager evaluation reproduces adapt's val top-1."""
    res = run("evaluate", digits_run, DIGITS, "--split", "val", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    manifest = json.loads((digits_run / "edgetransfer.json").read_text())
    assert d["images"] == manifest["data"]["val"]
    assert d["top1"] == pytest.approx(manifest["metrics"]["val_top1"], abs=1e-6)


def test_evaluate_table(digits_export):
    res = run("evaluate", digits_export / "model.onnx", DIGITS, "--split", "train")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"160 images of {DIGITS} (split train)"
    assert lines[1].startswith("top-1 ") and "top-5 " in lines[1]
    assert lines[2].split() == ["class", "images", "precision", "recall", "F1"]
    assert "confusion matrix (rows: true, columns: predicted)" in lines
    matrix = lines[lines.index("confusion matrix (rows: true, columns: predicted)") + 2 :]
    assert sum(int(v) for row in matrix for v in row.split()[1:]) == 160


def test_folder_classes_are_matched_by_name(digits_export, tmp_path):
    """A folder with a subset of the classes, in another order, still scores by name."""
    data = tmp_path / "data"
    for name in ("six", "nine"):
        (data / name).mkdir(parents=True)
        for p in sorted((DIGITS / name).glob("*.png"))[:5]:
            (data / name / p.name).write_bytes(p.read_bytes())
    res = run("evaluate", digits_export, data, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["per_class"]["six"]["support"] == 5 and d["per_class"]["five"]["support"] == 0


def test_unknown_class_folder_is_named(digits_export, tmp_path):
    data = make_images(
        tmp_path / "data", per_class=2, classes={"six": (0, 0, 0), "zebra": (9, 9, 9)}
    )
    res = run("evaluate", digits_export, data)
    assert res.exit_code == 1
    assert res.output == (
        "Error: class folder(s) the model does not know: zebra; the model's labels are: "
        "eight, five, nine, seven, six\n"
    )


def test_unreadable_images_are_skipped_and_listed(digits_export, tmp_path):
    data = make_images(
        tmp_path / "data", per_class=3, classes={"six": (0, 0, 0), "five": (9, 9, 9)}
    )
    (data / "six" / "broken.png").write_bytes(b"not a png")
    res = run("evaluate", digits_export, data, "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["images"] == 6 and d["skipped"][0]["path"].endswith("broken.png")


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "{data}"], "Error: model {tmp}/missing does not exist\n"),
        (
            ["{export}", "{tmp}/nodata"],
            "Error: data folder {tmp}/nodata does not exist; pass a folder with one sub-folder "
            "of images per class\n",
        ),
        (["{export}", "{data}", "--split", "test"], None),  # Click's own usage error, exit 2
    ],
)
def test_evaluate_errors(digits_export, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, data=DIGITS, export=digits_export) for a in args]
    res = run("evaluate", *args)
    if message is None:
        assert res.exit_code == 2 and "Invalid value for '--split'" in res.output
        return
    assert res.exit_code == 1
    assert res.output == message.format(tmp=tmp_path)


def test_report_needs_force_and_leaves_existing_folder(digits_export, tmp_path):
    out = tmp_path / "rep"
    out.mkdir()
    (out / ".edgetransfer").write_text("")  # an earlier report: --force may replace it
    (out / "mine.txt").write_text("keep")
    res = run("evaluate", digits_export, DIGITS, "--report", out)
    assert res.exit_code == 1
    assert res.output == f"Error: {out} already exists; pass --force to replace it\n"
    assert (out / "mine.txt").read_text() == "keep"
    res = run("evaluate", digits_export, DIGITS, "--report", out, "--force", "--split", "val")
    assert res.exit_code == 0, res.output
    assert res.output.endswith(f"wrote {out / 'index.html'}\n")
    assert not (out / "mine.txt").exists()


def test_report_without_matplotlib_names_the_extra(digits_export, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    res = run("evaluate", digits_export, DIGITS, "--report", tmp_path / "rep")
    assert res.exit_code == 1
    assert res.output == (
        "Error: the HTML report needs matplotlib: pip install 'edgetransfer[report]'\n"
    )
    assert not (tmp_path / "rep").exists()
