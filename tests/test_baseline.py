"""adapt --baseline: the same architecture from scratch beside the adapted run, in the manifest,
report.html and the CLI's summary; a source model that does not help is said to."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from edgetransfer import config
from edgetransfer.adapt import AdaptConfig, scratch_config
from edgetransfer.backbones import get_arch
from edgetransfer.report import baseline_verdict

from .conftest import DIGITS, SOURCE, digits_config, run
from .test_report import check_page

BASELINE = {
    "strategy": "full",
    "weights": "none",
    "lr": 0.003,
    "augment": "light",
    "epochs": 3,
    "best_epoch": 2,
    "batch_size": 16,
    "accumulate": 1,
    "seed": 0,
    "val_images": 40,
    "scratch_val_top1": 0.6,
    "pretrained_val_top1": 0.875,
    "gain_points": 27.5,
}


def test_verdict_says_how_much_the_source_helps_or_warns():
    helps, line = baseline_verdict(BASELINE)
    assert helps
    assert line == (
        "the source model helps by +27.5 points (87.5% adapted vs 60.0% from scratch, same "
        "architecture, split, epochs, batch size and seed; 40 validation images, one image = "
        "2.5 points)"
    )
    for scratch, gain in ((0.9, -2.5), (0.875, 0.0)):  # scratch wins, and a tie
        helps, line = baseline_verdict(
            {**BASELINE, "scratch_val_top1": scratch, "gain_points": gain}
        )
        assert not helps
        assert line.startswith(f"warning: the source model does not help here ({gain:+.1f} ")
        assert line.endswith("from scratch does as well: try another --strategy or source model")


def test_scratch_run_keeps_the_budget_and_drops_the_source():
    cfg = AdaptConfig(
        data_dir=DIGITS,
        out=DIGITS,
        weights=str(SOURCE),
        epochs=7,
        batch_size=4,
        seed=3,
        image_size=48,
        truncate="features.3",
        teacher=DIGITS,
        keep_source_head=True,
        source_data=DIGITS,
        lwf=1.0,
        l2sp=0.5,
        lr=0.5,
        baseline=True,
    )
    b = scratch_config(cfg)
    assert (b.epochs, b.batch_size, b.seed, b.image_size, b.truncate) == (7, 4, 3, 48, "features.3")
    assert (b.weights, b.strategy, b.lr) == ("none", config.SCRATCH_STRATEGY, config.SCRATCH_LR)
    assert (b.teacher, b.keep_source_head, b.source_data, b.lwf, b.l2sp) == (
        None,
        False,
        None,
        0.0,
        0.0,
    )
    assert not b.baseline


def test_adapt_baseline_end_to_end(tmp_path):
    """The shipped digits source adapted with --baseline: manifest section, CLI line, report."""
    out = tmp_path / "run"
    res = run(
        "adapt", DIGITS, "--arch", "simple_cnn", "--weights", SOURCE, "--epochs", "2",
        "--batch-size", "16", "--baseline", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = json.loads((out / "edgetransfer.json").read_text())
    b = m["baseline"]
    assert b["pretrained_val_top1"] == m["metrics"]["val_top1"]
    assert b["val_images"] == m["data"]["val"] == 40
    assert (b["strategy"], b["weights"], b["lr"]) == ("full", "none", config.SCRATCH_LR)
    assert (b["epochs"], b["batch_size"], b["seed"]) == (2, 16, 0)
    assert 1 <= b["best_epoch"] <= 2
    assert 0 <= b["scratch_val_top1"] <= 1
    assert b["gain_points"] == round(100 * (b["pretrained_val_top1"] - b["scratch_val_top1"]), 2)
    assert b["seconds"]["scratch"] > 0 and b["seconds"]["pretrained"] > 0
    helps, sentence = baseline_verdict(b)
    assert f"baseline: {sentence}\n" in res.output
    page = check_page(out / "report.html")
    assert "Against training from scratch" in page.headings
    html = (out / "report.html").read_text()
    assert "from scratch (random weights)" in html
    assert (sentence[:1].upper() + sentence[1:]).replace("'", "&#x27;") in html
    # the scratch model is not kept: one model, the adapted one
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_a_source_that_does_not_help_is_warned_about(tmp_path, colors):
    """A tiny_test source whose backbone is all zeros gives the head nothing to see: scratch
    wins, and the CLI and report.html say so."""
    model = get_arch("tiny_test").build(3)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "dead.safetensors")
    out = tmp_path / "run"
    res = run(
        "adapt", colors, "--arch", "tiny_test", "--weights", tmp_path / "dead.safetensors",
        "--epochs", "15", "--baseline", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    b = json.loads((out / "edgetransfer.json").read_text())["baseline"]
    assert b["scratch_val_top1"] > b["pretrained_val_top1"], b
    assert "baseline: warning: the source model does not help here" in res.output
    assert (
        '<p class="low">Warning: the source model does not help here'
        in (out / "report.html").read_text()
    )


def test_baseline_without_source_weights_is_refused(tmp_path, colors):
    res = run(
        "adapt", colors, "--arch", "tiny_test", "--weights", "none", "--baseline",
        "--out", tmp_path / "r",
    )  # fmt: skip
    assert res.exit_code == 1
    assert res.output == (
        "Error: --baseline compares the source weights with training from scratch; with "
        "--weights none this run is already from scratch\n"
    )
    assert not (tmp_path / "r").exists()


def test_no_baseline_no_section(tmp_path, colors):
    out = tmp_path / "r"
    res = run(
        "adapt", colors, "--arch", "tiny_test", "--weights", "none", "--epochs", "1",
        "--no-report", "--out", out,
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "baseline" not in json.loads((out / "edgetransfer.json").read_text())
    assert "baseline:" not in res.output


def test_interrupted_baseline_points_to_resume(tmp_path, monkeypatch):
    """Ctrl-C in the scratch run: the adapted run's checkpoint stays, and --resume finishes."""
    from edgetransfer import adapt as adapt_module
    from edgetransfer.runs import checkpoint_path
    from edgetransfer.train import Interrupted

    def interrupted(*args, **kw):
        raise Interrupted("SIGINT: stopped in epoch 1 after step 1; checkpoint None", 2)

    cfg = digits_config(tmp_path / "run", baseline=True)
    with monkeypatch.context() as m:
        m.setattr(adapt_module, "_train_backbone", interrupted)
        with pytest.raises(Interrupted) as e:
            adapt_module.adapt(cfg)
    assert str(e.value) == (
        "SIGINT: stopped while training the --baseline from scratch; the adapted model is in "
        f"{checkpoint_path(cfg.out)}: run the same command with --resume to finish (the "
        "baseline starts over)"
    )
    assert e.value.exit_code == 130 and checkpoint_path(cfg.out).is_file()
    res = adapt_module.adapt(dataclasses.replace(cfg, resume=True))
    assert res.manifest.baseline["scratch_val_top1"] > 0
    assert not checkpoint_path(cfg.out).exists()
