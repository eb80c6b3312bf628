"""adapt --strategy auto: the comparison in the manifest and report, ties to the cheaper
strategy, the budget skipping candidates, and an auto run exporting like its winner."""

from __future__ import annotations

import dataclasses

import pytest

from edgetransfer import auto
from edgetransfer.auto import AutoConfig, _OverBudget, _Steps, _verdict, _Watch, adapt_auto
from edgetransfer.errors import EdgeTransferError
from edgetransfer.manifest import read_manifest

from .conftest import DIGITS, SOURCE, digits_config, make_images, run


def test_auto_end_to_end_manifest_report_and_export(tmp_path):
    data = make_images(tmp_path / "colors", per_class=10)
    out = tmp_path / "run"
    res = run(
        "adapt", data, "--arch", "tiny_test", "--weights", "none", "--strategy", "auto",
        "--epochs", "6", "--out", out, "--no-cache",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = read_manifest(out)
    a = m.adapt["auto"]
    rows = a["candidates"]
    assert [r["strategy"] for r in rows] == list(auto.CANDIDATES)
    for r in rows:
        assert set(r) >= {"val_top1", "val_correct", "val_images", "seconds", "schedule"}, r
        assert r["val_images"] == m.data["val"]
        assert r["val_correct"] == round(r["val_top1"] * r["val_images"])
    assert [r["schedule"] for r in rows] == ["full", "short", "short", "short"]
    assert [r["epochs"] for r in rows] == [6, 5, 5, 5]
    # the winner is the first (cheapest) of those with the most right, and it trained fully
    best = max(r["val_correct"] for r in rows)
    assert a["winner"] == next(r["strategy"] for r in rows if r["val_correct"] == best)
    assert m.adapt["strategy"] == a["winner"] and m.adapt["epochs"] == 6
    assert a["budget_s"] is None and a["short_epochs"] == 5
    # CLI: one line per candidate and the pick with its uncertainty
    assert res.output.count("  auto: ") == 4
    assert f"auto picked {a['pick']}\n" in res.output
    assert "binomial standard error" in a["pick"] or "ties with" in a["pick"]
    page = (out / "report.html").read_text()
    assert "Strategy chosen by --strategy auto" in page
    assert a["pick"].split(":")[0] in page and "no time budget" in page
    # an auto run exports and verifies as a run of its winner's strategy
    exp = run("export", out, "--onnx", "--out", tmp_path / "exp")
    assert exp.exit_code == 0, exp.output
    assert read_manifest(tmp_path / "exp").adapt["auto"]["winner"] == m.adapt["strategy"]
    ver = run("verify", tmp_path / "exp", "--data", data)
    assert ver.exit_code == 0, ver.output


def test_the_budget_skips_candidates_and_says_so(tmp_path):
    """A budget smaller than the head's own time: every candidate after it is not tried."""
    out = tmp_path / "run"
    res = run(
        "adapt", DIGITS, "--arch", "simple_cnn", "--weights", SOURCE, "--strategy", "auto",
        "--budget", "0.000001", "--epochs", "3", "--out", out, "--no-report", "--no-cache",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    a = read_manifest(out).adapt["auto"]
    assert a["winner"] == "head" and a["budget_s"] == 1e-6
    skipped = [r for r in a["candidates"] if "skipped" in r]
    assert [r["strategy"] for r in skipped] == ["bias", "last-n", "full"]
    assert all(r["skipped"].startswith("not tried: about ") for r in skipped)
    assert "from the head's feature extraction" in skipped[0]["skipped"]
    assert "auto: bias    not tried: about" in res.output
    assert "the only candidate tried" in a["pick"]


def _row(name, correct, n=20):
    return {"strategy": name, "val_correct": correct, "val_images": n, "val_top1": correct / n}


def test_ties_go_to_the_cheaper_and_the_pick_says_how_sure_it_is():
    cfg = AutoConfig()
    tie = _verdict(
        [_row("head", 15), _row("bias", 18), _row("last-n", 18), _row("full", 18)], cfg, 1
    )
    assert tie["winner"] == "bias" and tie["margin_images"] == 0
    assert (
        tie["pick"] == "bias: ties with last-n at 18 of 20 validation images; the cheaper is kept"
    )
    close = _verdict([_row("head", 16), _row("full", 17)], cfg, 1)
    assert close["winner"] == "full" and close["margin_images"] == 1
    assert close["se_images"] == pytest.approx((20 * 0.825 * 0.175) ** 0.5, abs=0.01)
    assert "uncertain" in close["pick"]
    clear = _verdict([_row("head", 8, 100), _row("last-n", 90, 100)], cfg, 1)
    assert clear["winner"] == "last-n" and "beyond 2 binomial standard errors" in clear["pick"]


def test_a_candidate_that_would_overrun_stops_after_two_steps():
    now = [0.0]
    steps = _Steps.of(digits_config("x", batch_size=8), train=80, val=16)
    assert steps.per_epoch == 10

    def clock():
        return now[0]

    for left, stops in ((20.0, True), (200.0, False)):
        now[0] = 0.0
        watch = _Watch(clock, left, steps, epochs=5)
        now[0] = 3.0
        watch.on_phase("fit")
        for step in (1, 2, 3):
            now[0] += 1.0  # one second a step: 5 epochs of 10 steps and validation, ~53 s
            if stops and step == 2:
                with pytest.raises(_OverBudget, match=r"stopped after 2 steps: about 5\d s"):
                    watch.on_step(1, step)
                break
            watch.on_step(1, step)
        assert watch.step_seconds == 1.0


def test_auto_refuses_bad_settings_in_one_line(tmp_path):
    with pytest.raises(EdgeTransferError, match="compares some of: head, bias, last-n, full"):
        adapt_auto(digits_config(tmp_path / "r"), AutoConfig(candidates=("head", "lora")))
    res = run("adapt", DIGITS, "--budget", "5", "--out", tmp_path / "r")
    assert res.exit_code == 2 and "--budget is for --strategy auto" in res.output
    assert not (tmp_path / "r").exists()


def test_a_candidate_the_backbone_cannot_take_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """e.g. bias on efficientnet_lite0, whose convolutions have no biases: one line, not a
    failed comparison. The first candidate's error stays the run's error."""
    real = auto.adapt

    def adapt(cfg):
        if cfg.strategy == "bias" and cfg.out.parent != tmp_path:  # a candidate, not the final
            raise EdgeTransferError("--strategy bias leaves nothing to train in this backbone")
        return real(cfg)

    monkeypatch.setattr(auto, "adapt", adapt)
    cfg = digits_config(tmp_path / "run", epochs=2)
    res = adapt_auto(cfg, AutoConfig(candidates=("head", "bias")))
    a = res.manifest.adapt["auto"]
    assert a["winner"] == "head"
    assert a["candidates"][1]["skipped"] == (
        "not usable: --strategy bias leaves nothing to train in this backbone"
    )
    with pytest.raises(EdgeTransferError, match="nothing to train"):
        adapt_auto(
            dataclasses.replace(cfg, out=tmp_path / "run2"), AutoConfig(candidates=("bias", "head"))
        )
    assert not (tmp_path / "run2").exists()


def test_with_few_steps_an_epoch_the_first_epoch_is_timed():
    """10 images at batch 8 are a step of 8 and a step of 2: the short one would make the
    run look five times cheaper, so the whole first epoch (and its validation) is timed."""
    now = [0.0]
    steps = _Steps.of(digits_config("x", batch_size=8), train=10, val=16)
    assert steps.per_epoch == 2
    watch = _Watch(lambda: now[0], 20.0, steps, epochs=5)
    watch.on_phase("fit")
    for t, (epoch, step) in ((4.0, (1, 1)), (4.5, (1, 2))):
        now[0] = t
        watch.on_step(epoch, step)  # no verdict inside the first epoch
    now[0] = 8.0  # + validation: the first epoch took 8 s; 5 epochs would take about 40 s
    with pytest.raises(_OverBudget, match=r"stopped after its first epoch: about 4\d s"):
        watch.on_step(2, 3)
