"""int8 that keeps its accuracy: the costliest layers stay in float until top-1 is within the
bound, export.json says which and why, and verify tells an int8 miss from broken fp32 parity."""

from __future__ import annotations

import json

import onnx
import pytest

from edgetransfer import quantize
from edgetransfer.export import ExportConfig, export
from edgetransfer.parity import allowed_drop
from edgetransfer.quantize import keep_in_float

from .conftest import DIGITS, run


def _int8_export(run_dir, out, **kw):
    return export(
        ExportConfig(
            run_dir=run_dir, out=out, torchscript=False, raw=False, int8=True, golden=0, **kw
        )
    )


@pytest.fixture(scope="module")
def strict_int8(digits_run, tmp_path_factory):
    """--max-drop 0: full int8 loses images on the digits model, so a layer must go float."""
    out = tmp_path_factory.mktemp("int8") / "export"
    return out, _int8_export(digits_run, out, max_drop=0.0)


def test_allowed_drop_is_one_point_or_one_image():
    assert allowed_drop(0.01, 40) == pytest.approx(1 / 40)
    assert allowed_drop(0.01, 500) == pytest.approx(0.01)
    assert allowed_drop(0.0, 40) == 0.0


def test_a_bound_of_zero_keeps_the_costliest_layer_in_float(strict_int8):
    out, res = strict_int8
    rec = res.report["int8"]
    first, last = rec["steps"][0], rec["steps"][-1]
    assert first["float"] == [] and first["top1_drop"] > 0  # full int8 loses on this model
    assert rec["met_bound"] and rec["top1_drop"] <= 0
    assert last["float"] == [k["layer"] for k in rec["kept_float"]]
    # the head (the logits layer) costs most on the digits model; it is named with its cost
    kept = rec["kept_float"][0]
    assert kept["layer"] == "node_linear_1" and kept["cost"] > 0
    assert kept["drop_before"] == first["top1_drop"] and first["next"]["layer"] == kept["layer"]
    # in the written model that layer has float weights and a float output (the logits, not
    # rounded to 256 levels); every other layer reads int8 weights
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_in = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    layers = {n.name: n for n in graph.node if n.op_type in quantize.RANK_OPS}
    head = layers.pop(kept["layer"])
    assert head.input[1] not in dq_out and head.output[0] not in q_in
    assert layers and all(n.input[1] in dq_out for n in layers.values())
    # the guard judges the written model by the same bound and recommends it
    guard = res.report["guard"]["artifacts"]["int8"]
    assert guard["top1_drop"] == rec["top1_drop"] and guard["ok"]
    saved = json.loads((out / "export.json").read_text())
    assert saved["int8"]["kept_float"] == rec["kept_float"]


def test_verify_passes_the_fallback_and_exits_0(strict_int8):
    out, _ = strict_int8
    res = run("verify", out, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    assert "parity: PASS" in res.output


def test_an_int8_miss_leaves_fp32_passing_and_exits_3(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MAX_FLOAT_TRIES", 0)  # no fallback: full int8 only
    out = tmp_path / "export"
    res = _int8_export(digits_run, out, max_drop=0.0)
    assert not res.report["int8"]["met_bound"] and res.report["int8"]["kept_float"] == []
    notes = [n for n in res.notes if n.startswith("model.int8.onnx loses")]
    assert len(notes) == 1 and "not recommended, model.onnx is" in notes[0]
    assert res.report["guard"]["recommended"] == "fp32"
    cli = run("verify", out, "--data", DIGITS)
    assert cli.exit_code == 3, cli.output
    lines = cli.output.splitlines()
    assert any(ln.startswith("onnxruntime") and ln.endswith("ok") for ln in lines)
    assert any(ln.startswith("int8") and ln.endswith("MISS") for ln in lines)
    assert lines[-1].startswith("Error: fp32 parity passed; accuracy bound missed by int8:")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["fp32_passed"] and not parity["passed"]
    assert parity["accuracy_misses"] == ["int8"]


def test_keep_in_float_is_bounded_and_keeps_the_best(tmp_path, monkeypatch):
    """Layers go float costliest first, one per try, until the drop is within the bound or
    MAX_FLOAT_TRIES; the variant kept is the one that lost least."""
    monkeypatch.setattr(quantize, "MAX_FLOAT_TRIES", 2)
    candidate, best = tmp_path / "c", tmp_path / "b"
    drops = {(): 0.1, ("a",): 0.05, ("a", "b"): 0.08}

    def drop(excluded):
        candidate.write_text(",".join(excluded))
        return drops[tuple(excluded)]

    def rank():
        return [("a", 3.0), ("b", 2.0), ("c", 1.0)]

    steps, kept = keep_in_float(drop, rank, 0.0, candidate, best)
    assert [s["float"] for s in steps] == [[], ["a"], ["a", "b"]]
    assert kept == ["a"] and best.read_text() == "a"
    steps, kept = keep_in_float(lambda e: drop(e) - 0.2, lambda: 1 / 0, 0.0, candidate, best)
    assert kept == [] and len(steps) == 1  # within the bound at once: nothing ranked
