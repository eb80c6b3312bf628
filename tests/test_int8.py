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

from .conftest import DIGITS, made_once, run


def _int8_export(run_dir, out, **kw):
    return export(
        ExportConfig(
            run_dir=run_dir, out=out, torchscript=False, raw=False, int8=True, golden=0, **kw
        )
    )


@pytest.fixture(scope="session")
def strict_int8(digits_run, tmp_path_factory):
    """--max-drop 0: full int8 loses images on the digits model, so a layer must go float."""
    with made_once(tmp_path_factory, "strict_int8") as (folder, fill):
        out = folder / "export"
        if fill:
            args = ("--int8", "--max-drop", "0", "--golden", "0", "--out", out)
            res = run("export", digits_run, *args)
            assert res.exit_code == 0, res.output
            (folder / "output.txt").write_text(res.output)
        output = (folder / "output.txt").read_text()
        return out, json.loads((out / "export.json").read_text()), output


def test_allowed_drop_is_one_point_or_one_image():
    assert allowed_drop(0.01, 40) == pytest.approx(1 / 40)
    assert allowed_drop(0.01, 500) == pytest.approx(0.01)
    assert allowed_drop(0.0, 40) == 0.0


def test_a_bound_of_zero_keeps_the_costliest_layers_in_float(strict_int8):
    out, report, output = strict_int8
    rec = report["int8"]
    first, last = rec["steps"][0], rec["steps"][-1]
    assert first["float"] == [] and first["top1_drop"] > 0  # full int8 loses on this model
    assert rec["met_bound"] and rec["top1_drop"] <= 0
    kept = rec["kept_float"]
    assert kept and last["float"] == [k["layer"] for k in kept]
    # one layer more per step, costliest first, each named with its cost and the drop before it
    for step, nxt, k in zip(rec["steps"], rec["steps"][1:], kept, strict=False):
        assert step["next"]["layer"] == k["layer"] and k["cost"] > 0
        assert k["drop_before"] == step["top1_drop"] and nxt["float"][-1] == k["layer"]
    assert [k["cost"] for k in kept] == sorted((k["cost"] for k in kept), reverse=True)
    # in the written model the layers kept in float read float weights; every other layer
    # reads int8 weights; the logits are not rounded to 256 levels when the last layer is kept
    graph = onnx.load(str(out / "model.int8.onnx")).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_in = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    layers = {n.name: n for n in graph.node if n.op_type in quantize.RANK_OPS}
    for k in kept:
        layer = layers.pop(k["layer"])
        assert layer.input[1] not in dq_out
        if layer.output[0] in {o.name for o in graph.output}:
            assert layer.output[0] not in q_in
    assert layers and all(n.input[1] in dq_out for n in layers.values())
    # the guard judges the written model by the same bound; the CLI says what stayed float
    guard = report["guard"]["artifacts"]["int8"]
    assert guard["top1_drop"] == rec["top1_drop"] and guard["ok"]
    named = ", ".join(f"{k['layer']} (cost {k['cost']:g})" for k in kept)
    assert (
        f"model.int8.onnx: kept in float {named}; top-1 drop {first['top1_drop']:.1%} -> 0.0%"
    ) in output.splitlines()


def test_verify_passes_the_fallback_and_exits_0(strict_int8):
    out, _, _ = strict_int8
    res = run("verify", out, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    assert "parity: PASS" in res.output


def test_an_int8_miss_leaves_fp32_passing_and_exits_3(digits_run, tmp_path, monkeypatch):
    monkeypatch.setattr(quantize, "MAX_FLOAT_TRIES", 0)  # no fallback: full int8 only
    out = tmp_path / "export"
    res = _int8_export(digits_run, out, max_drop=0.0)
    assert not res.report["int8"]["met_bound"] and res.report["int8"]["kept_float"] == []
    notes = [n for n in res.notes if n.startswith("not within")]
    assert notes == [
        f"not within the 0.0% top-1 bound: model.int8.onnx loses "
        f"{res.report['int8']['top1_drop']:.1%}; not recommended, model.onnx is"
    ]
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


def test_keep_in_float_is_bounded_and_keeps_the_best(monkeypatch):
    """Layers go float costliest first, one per try, until the drop is within the bound or
    MAX_FLOAT_TRIES; the variant kept is the one that lost least."""
    monkeypatch.setattr(quantize, "MAX_FLOAT_TRIES", 2)
    drops = {(): 0.1, ("a",): 0.05, ("a", "b"): 0.08}

    def drop(excluded):
        return drops[tuple(excluded)], ",".join(excluded)

    def rank():
        return [("a", 3.0), ("b", 2.0), ("c", 1.0)]

    steps, kept, best = keep_in_float(drop, rank, 0.0)
    assert [s["float"] for s in steps] == [[], ["a"], ["a", "b"]]
    assert kept == ["a"] and best == "a"
    steps, kept, best = keep_in_float(lambda e: (-0.1, "full"), lambda: 1 / 0, 0.0)
    assert kept == [] and len(steps) == 1 and best == "full"  # within the bound: nothing ranked


# --- model.int8.pte: PT2E with the XNNPACK quantizer ------------------------------------------


@pytest.fixture(scope="session")
def pte_int8(digits_run, digits_export, tmp_path_factory):
    """A copy of the digits export with model.int8.pte written at --max-drop 0 (PT2E int8
    loses an image on this model, so the fallback must act)."""
    import shutil

    import numpy as np

    from edgetransfer.data import run_split
    from edgetransfer.export import _spread
    from edgetransfer.pte import export_pte_int8
    from edgetransfer.runs import load_run

    model, manifest = load_run(digits_run)
    with made_once(tmp_path_factory, "pte_int8") as (folder, fill):  # once per run
        out = folder / "export"
        if fill:
            shutil.copytree(digits_export, out)
            ds = run_split(DIGITS, manifest)
            calib = _spread([s for s in ds.samples if s.split == "train"], 64)
            xc, _ = quantize.load_inputs(calib, manifest)
            xv, kept = quantize.load_inputs(ds.split("val"), manifest)
            truth = np.array([manifest.labels.index(ds.classes[s.label]) for s in kept])
            notes: list[str] = []
            pte = out / "model.int8.pte"
            report = export_pte_int8(model, manifest, pte, xc, xv, truth, 0.0, 4, notes)
            assert notes == []
            (folder / "report.json").write_text(json.dumps(report))
        return out, json.loads((folder / "report.json").read_text()), manifest


def test_pte_int8_keeps_the_costliest_module_in_float(pte_int8):
    out, rec, _ = pte_int8
    assert rec["batch"] == [1, 4] and rec["dynamic_batch"]
    assert rec["outside_ops"] == ["aten.view_copy.default"]  # the flatten, as in model.pte
    first = rec["steps"][0]
    assert first["float"] == [] and first["top1_drop"] > 0
    assert [k["layer"] for k in rec["kept_float"]] == ["head"] and rec["met_bound"]
    # the program written answers as the converted PyTorch model did, within an image
    assert abs(rec["program_top1_drop"] - rec["top1_drop"]) <= 1 / rec["images"] + 1e-9


def test_module_costs_rank_the_head_first(digits_run):
    """The proxy ranking (each module alone fake-quantised) puts the logits layer first, the
    layer whose rounding flips answers on the digits model."""
    import torch

    from edgetransfer.pte import module_costs
    from edgetransfer.runs import load_run

    model, _ = load_run(digits_run)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    costs = module_costs(model, x[:16], x[16:])
    assert costs[0][0] == "head" and costs[0][1] > costs[-1][1] >= 0
    assert {name for name, _ in costs} == {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)
    }
    # the model itself is untouched
    assert torch.equal(load_run(digits_run)[0](x), model(x))


def test_every_command_knows_the_int8_pte(pte_int8):
    out, rec, manifest = pte_int8
    res = run("verify", out, "--data", DIGITS)
    assert res.exit_code == 0, res.output
    row = next(ln for ln in res.output.splitlines() if ln.startswith("executorch-int8"))
    assert row.endswith("ok")
    parity = json.loads((out / "parity.json").read_text())
    assert parity["runtimes"]["executorch-int8"]["kind"] == "reduced"
    res = run("predict", out / "model.int8.pte", DIGITS / "five", "--json", "-q")
    assert res.exit_code == 0 and res.output.count("\n") == 40, res.output
    res = run("evaluate", out / "model.int8.pte", DIGITS, "--split", "val", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{") :])["top1"] == rec["program_top1"]
    res = run("info", out / "model.int8.pte", "--json")
    info = json.loads(res.output)["files"][0]
    assert info["batch"] == [1, 4] and info["inputs"][0]["shape"] == ["N", 3, 32, 32]
    from edgetransfer.bench import find_runtimes

    assert find_runtimes(out / "model.int8.pte") == {
        "executorch-int8": (out / "model.int8.pte", "executorch")
    }
    assert "executorch-int8" in find_runtimes(out, trust_torchscript=True)


def test_the_guard_weighs_pte_programs_beside_onnx(pte_int8):
    out, rec, manifest = pte_int8
    from edgetransfer.data import run_split

    val = run_split(DIGITS, manifest).split("val")
    guard = quantize.guard(out, manifest, val, 0.0, threads=1, fallback={"pte-int8": rec})
    rows = guard["artifacts"]
    assert set(rows) == {"fp32", "pte-int8"}
    assert rows["pte-int8"]["top1"] == rec["program_top1"] and rows["pte-int8"]["ok"]
    assert all(r["latency_ms_p50"] > 0 for r in rows.values())
    assert guard["notes"][0].endswith("on 40 validation images, batch 1, 1 threads)")
