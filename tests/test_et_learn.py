"""cpp_demo/et_learn: the head learnt on the device in C++ is the numpy head (headfit), on the
same split, and its EXPORT_DIR passes verify and runs in et_onnx and predict.

Built by tools/build_cpp_demo.sh; without it these tests skip, unless ET_REQUIRE_CPP=1 (CI),
where a missing program is a failure.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from edgetransfer.bundle import extract, open_bundle
from edgetransfer.data import Sample, _split, list_images, scan, train_val
from edgetransfer.headfit import HEAD_L2, balanced_class_weights, fit_head
from edgetransfer.manifest import read_manifest

from .conftest import DIGITS, run
from .test_cpp_demo import run as run_cpp

PROVENANCE = "fitted on device by et_learn"


def learn(*args):
    return run_cpp("et_learn", *args)


@pytest.fixture(scope="module")
def learnt(digits_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "export"
    res = learn(digits_bundle, DIGITS, "--out", out, "--threads", 1)
    assert res.returncode == 0, res.stderr
    assert "best epoch" in res.stderr  # progress on stderr
    return out


def test_same_optimum_and_split_as_headfit(digits_bundle, learnt):
    bundle = open_bundle(digits_bundle)
    dataset = scan(DIGITS)
    feats = extract(bundle, dataset.samples, use_cache=False)
    train_s, val_s = train_val(dataset)
    row = {s.path: i for i, s in enumerate(feats.samples)}
    x_train = feats.vectors[[row[s.path] for s in train_s]]
    x_val = feats.vectors[[row[s.path] for s in val_s]]
    y_val = np.array([s.label for s in val_s])
    fit = fit_head(
        x_train,
        np.array([s.label for s in train_s]),
        x_val,
        y_val,
        classes=len(dataset.classes),
        l2=HEAD_L2,
    )
    head = load_file(str(learnt / "head.safetensors"))
    w, b = head["head.weight"], head["head.bias"]
    scale = np.abs(fit.weight).max()
    assert np.abs(w - fit.weight).max() <= 1e-4 * scale
    assert np.abs(b - fit.bias).max() <= 1e-4 * np.abs(fit.bias).max() + 1e-6
    pred = (x_val @ w.T + b).argmax(1)
    np.testing.assert_array_equal(pred, fit.logits(x_val).argmax(1))
    m = read_manifest(learnt)
    # the same split (the fingerprint holds every file's split), epochs and metrics
    assert m.data["fingerprint"] == dataset.fingerprint()
    assert (m.data["train"], m.data["val"]) == (len(train_s), len(val_s))
    assert m.adapt["best_epoch"] == fit.best_epoch
    assert m.metrics["val_top1"] == round(fit.val_top1, 6)
    assert m.adapt["provenance"] == PROVENANCE
    assert m.adapt["backbone"]["sha256"] == bundle.sha256
    assert m.labels == dataset.classes


def test_export_passes_verify_and_runs_everywhere(learnt, tmp_path):
    res = run("verify", learnt, "--data", DIGITS)
    assert res.exit_code == 0 and "parity: PASS" in res.output, res.output
    res = run("predict", learnt / "model.onnx", DIGITS / "six" / "001.png")
    assert res.exit_code == 0 and "six" in res.output, res.output
    res = run("evaluate", learnt, DIGITS, "--report", tmp_path / "report")
    assert res.exit_code == 0 and (tmp_path / "report" / "index.html").is_file(), res.output
    res = run_cpp("et_onnx", learnt / "model.onnx", DIGITS / "six" / "001.png", "--topk", 1)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["topk"][0]["label"] == "six"


def uneven(data):
    """Classes of 7, 3 and 12 images, some in a sub-folder."""
    for name, count in (("eight", 7), ("five", 3), ("nine", 12)):
        files = sorted((DIGITS / name).glob("*.png"))[:count]
        for i, f in enumerate(files):
            dest = data / name / ("deep" if i % 4 == 0 else "") / f"x{i:02d}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    return data


@pytest.mark.parametrize(("seed", "fraction"), [(7, 0.3), (2**33 + 5, 0.25)])
def test_split_is_pythons(digits_bundle, tmp_path, seed, fraction):
    """Uneven classes, a sub-folder and a seed past 32 bits: the C++ split is data.scan's (the
    fingerprint names every file's split)."""
    data = uneven(tmp_path / "data")
    out = tmp_path / "out"
    res = learn(digits_bundle, data, "--out", out, "--seed", seed, "--val-fraction", fraction)
    assert res.returncode == 0, res.stderr
    m = read_manifest(out)
    assert m.data["fingerprint"] == scan(data, fraction, seed).fingerprint()


def test_bad_input_is_one_line(digits_bundle, learnt, tmp_path):
    cases = [
        ((tmp_path / "nope.onnx", DIGITS, "--out", tmp_path / "o"), "no such file"),
        ((digits_bundle, tmp_path / "nodata", "--out", tmp_path / "o"), "does not exist"),
        ((learnt / "model.onnx", DIGITS, "--out", tmp_path / "o"), "not a backbone bundle"),
        ((digits_bundle, DIGITS, "--out", learnt), "already exists; pass --force"),
        ((digits_bundle, DIGITS, "--out", DIGITS), "is (or holds) the input"),
        ((digits_bundle, DIGITS, "--out", tmp_path / "o", "--threads", "x"), "--threads wants"),
    ]
    for args, message in cases:
        res = learn(*args)
        assert res.returncode == 2, (args, res.stderr)
        first = res.stderr.splitlines()[0]
        assert message in first and first.startswith("et_learn: "), res.stderr
        assert "usage" in res.stderr or len(res.stderr.splitlines()) == 1


def test_force_replaces_only_what_edgetransfer_wrote(digits_bundle, learnt, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(learnt, out)
    res = learn(digits_bundle, DIGITS, "--out", out, "--force", "--epochs", "1")
    assert res.returncode == 0, res.stderr
    assert read_manifest(out).adapt["epochs_run"] == 1
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    res = learn(digits_bundle, DIGITS, "--out", mine, "--force")
    assert res.returncode == 2 and "not written by edgetransfer" in res.stderr
    assert (mine / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob("*.et_learn-*"))  # no temp folder left behind
    # what a run killed between its two renames leaves: the old folder aside, its temp folder
    out.rename(tmp_path / "again.old-999999999")
    (tmp_path / "again.et_learn-999999999").mkdir()
    res = learn(digits_bundle, DIGITS, "--out", out)
    assert res.returncode == 2 and "already exists" in res.stderr  # the old one put back
    assert read_manifest(out).adapt["epochs_run"] == 1
    assert not list(tmp_path.glob("again.*"))


def test_add_a_class_without_the_old_photos(digits_bundle, tmp_path):
    """--add fits the kept features plus the new class's (split alone, as data._split splits a
    class): the same head as headfit on those rows, and the old photos are not needed."""
    old = tmp_path / "old"
    for name in ("eight", "five", "nine", "seven"):
        shutil.copytree(DIGITS / name, old / name)
    bundle = open_bundle(digits_bundle)
    old_ds = scan(old)
    old_feats = extract(bundle, old_ds.samples, use_cache=False)
    out = tmp_path / "export"
    assert learn(digits_bundle, old, "--out", out).returncode == 0
    shutil.rmtree(old)  # the device keeps only EXPORT_DIR
    res = learn("--add", DIGITS / "six", "--to", out)
    assert res.returncode == 0, res.stderr

    six = _split([Sample(p, 4, "train") for p in list_images(DIGITS / "six")], 0.2, 0)
    six_feats = extract(bundle, six, use_cache=False)
    rows = {"train": ([], []), "val": ([], [])}
    for feats, samples in ((old_feats, train_val(old_ds)), (six_feats, (None, None))):
        row = {s.path: i for i, s in enumerate(feats.samples)}
        for split, part in zip(("train", "val"), samples, strict=True):
            chosen = part if part is not None else [s for s in six if s.split == split]
            rows[split][0].append(feats.vectors[[row[s.path] for s in chosen]])
            rows[split][1].append(np.array([s.label for s in chosen]))
    (xt, yt), (xv, yv) = ((np.concatenate(a), np.concatenate(b)) for a, b in rows.values())
    fit = fit_head(xt, yt, xv, yv, classes=5, l2=HEAD_L2)
    head = load_file(str(out / "head.safetensors"))
    assert np.abs(head["head.weight"] - fit.weight).max() <= 1e-4 * np.abs(fit.weight).max()
    pred = (xv @ head["head.weight"].T + head["head.bias"]).argmax(1)
    np.testing.assert_array_equal(pred, fit.logits(xv).argmax(1))
    m = read_manifest(out)
    assert m.labels == ["eight", "five", "nine", "seven", "six"]
    assert m.data["added"] == ["six"] and m.adapt["best_epoch"] == fit.best_epoch
    res = run("verify", out, "--data", DIGITS)
    assert res.exit_code == 0 and "parity: PASS" in res.output, res.output
    res = learn("--add", DIGITS / "six", "--to", out)
    assert res.returncode == 2 and "already knows class six" in res.stderr


def test_add_refuses_what_it_cannot_use(learnt, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(learnt, out)
    data = (out / "learnt.safetensors").read_bytes()
    (out / "learnt.safetensors").write_bytes(data[: len(data) // 2])
    ten = tmp_path / "ten"
    shutil.copytree(DIGITS / "six", ten)
    cases = [
        (out, "is not the features et_learn keeps"),
        (tmp_path, "has no edgetransfer.json"),
    ]
    for to, message in cases:
        res = learn("--add", ten, "--to", to)
        assert res.returncode == 2, res.stderr  # the error is one line, the last
        assert message in res.stderr.splitlines()[-1]
    res = learn("--add", ten, "--to", out, "--out", tmp_path / "x")
    assert res.returncode == 2 and "--add CLASS_DIR goes with --to" in res.stderr
    assert (out / "learnt.safetensors").read_bytes() == data[: len(data) // 2]  # untouched


def test_balance_is_headfits(digits_bundle, tmp_path):
    data = uneven(tmp_path / "data")
    out = tmp_path / "out"
    assert learn(digits_bundle, data, "--out", out, "--balance").returncode == 0
    dataset = scan(data)
    feats = extract(open_bundle(digits_bundle), dataset.samples, use_cache=False)
    row = {s.path: i for i, s in enumerate(feats.samples)}
    (x_train, y_train), (x_val, y_val) = (
        (feats.vectors[[row[s.path] for s in part]], np.array([s.label for s in part]))
        for part in train_val(dataset)
    )
    weights = balanced_class_weights(y_train, 3)
    assert len(set(weights.tolist())) == 3  # the weights do differ
    fit = fit_head(x_train, y_train, x_val, y_val, classes=3, class_weights=weights)
    head = load_file(str(out / "head.safetensors"))
    assert np.abs(head["head.weight"] - fit.weight).max() <= 1e-4 * np.abs(fit.weight).max()
    assert read_manifest(out).adapt["balance"] == "class-weighted loss"


def test_unreadable_images_are_skipped_as_adapt_skips_them(digits_bundle, tmp_path):
    data = uneven(tmp_path / "data")
    (data / "nine" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    out = tmp_path / "out"
    res = learn(digits_bundle, data, "--out", out)
    assert res.returncode == 0 and "skipped" in res.stderr and "broken.png" in res.stderr
    m = read_manifest(out)
    broken = [s.path for s in scan(data).samples if s.path.name == "broken.png"]
    assert m.data["bad"] == 1
    assert m.data["fingerprint"] == scan(data).without(broken).fingerprint()
    res = learn(digits_bundle, data, "--out", tmp_path / "o2", "--max-bad", "0.01")
    assert res.returncode == 2 and "could not be read (more than --max-bad)" in res.stderr


def test_class_names_follow_the_label_rules(digits_bundle, tmp_path):
    data = uneven(tmp_path / "data")
    (data / "nine").rename(data / "ni\x1bne")
    res = learn(digits_bundle, data, "--out", tmp_path / "out")
    assert res.returncode == 2 and "contains the control character U+001B" in res.stderr
    assert len(res.stderr.splitlines()) == 1
