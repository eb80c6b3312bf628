"""int8 (static QDQ, calibrated on the user's images) and fp16 ONNX variants, and the guard that
measures accuracy and latency on this machine and recommends one artifact."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgetransfer.data import Sample, load_image, preprocess
from edgetransfer.errors import DataError, ExportError
from edgetransfer.manifest import ARTIFACTS, Manifest
from edgetransfer.onnxio import finish_onnx, onnx_step, open_session, session_options
from edgetransfer.parity import allowed_drop
from edgetransfer.runtime import PteClassifier

LATENCY_WARMUP = 5
LATENCY_RUNS = 50
# accuracy-aware int8: the layers ranked by the cost of quantising them (the ones with weights),
# and how many of the costliest may be kept in float, one at a time, before int8 is given up
RANK_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_FLOAT_TRIES = 8
MIN_SPEEDUP = 0.9  # a variant must take under 90% of the current pick's latency to replace it
GUARDED = {
    "fp32": ARTIFACTS["onnx"],
    "optimized": ARTIFACTS["optimized"],
    "pte": ARTIFACTS["pte"],
    "int8": ARTIFACTS["int8"],
    "pte-int8": ARTIFACTS["pte_int8"],
    "fp16": ARTIFACTS["fp16"],
}
REDUCED = ("int8", "pte-int8", "fp16")  # judged by their top-1 drop, named when they miss


def _set_manifest(src: Path, dst: Path, manifest: Manifest) -> None:
    """Copy `src` to `dst` with the manifest in metadata_props, checked and written atomically."""
    # QDQ and fp16 graphs pass the structural check; full shape inference is export's job
    finish_onnx(src, dst, manifest, full_check=False)


def load_inputs(samples: list[Sample], manifest: Manifest) -> tuple[np.ndarray, list[Sample]]:
    """The readable `samples` preprocessed for the model (NCHW float32), and which they are."""
    xs, kept = [], []
    for s in samples:
        try:
            xs.append(preprocess(load_image(s.path), manifest.preprocessing))
            kept.append(s)
        except DataError:
            continue
    if not xs:
        raise ExportError("no readable images for calibration / the accuracy check")
    return np.stack(xs), kept


def quantize_int8(
    src: Path,
    dst: Path,
    manifest: Manifest,
    calib: list[Sample],
    val: list[Sample],
    max_drop: float,
) -> dict:
    """Static QDQ int8 that keeps its accuracy; returns what export.json records about it.

    Quantisation pre-processing, per-channel int8 weights and uint8 activations calibrated
    (MinMax) on `calib` images once. When top-1 on `val` drops by more than `max_drop`
    (parity.allowed_drop), the layers are ranked by what quantising each one alone costs
    (logit error against fp32 on `val`) and the costliest are kept in float
    (`nodes_to_exclude`), one at a time, until the drop is within the bound or
    MAX_FLOAT_TRIES layers are float. The variant written is the first within the bound, or
    else the one that lost least.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    xc, _ = load_inputs(calib, manifest)
    xv, kept = load_inputs(val, manifest)
    truth = np.array([s.label for s in kept])
    name = manifest.io["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(xc[i : i + 1] for i in range(len(xc)))

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {name: batch}

    pre = dst.with_name(dst.stem + ".pre.onnx")
    cache = dst.with_name(dst.stem + ".calib.json")
    tries = dst.with_name(dst.stem + ".try.onnx")
    with onnx_step("int8 quantisation", pre, cache, tries):
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference does not know every op; plain is fine
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        # calibrated once: every later variant reuses the ranges (onnxruntime's own cache)
        cached = "calibration_cache_path" in inspect.signature(quantize_static).parameters

        def quantize(out: Path, exclude=(), only=None) -> None:
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(exclude),
                nodes_to_quantize=only,
                **({"calibration_cache_path": str(cache)} if cached else {}),
            )

        ref = _logits(src, xv)
        fp32_top1 = float((ref.argmax(1) == truth).mean())

        def drop(excluded: list[str]) -> tuple[float, bytes]:
            quantize(tries, excluded)
            top1 = float((_logits(tries, xv).argmax(1) == truth).mean())
            return fp32_top1 - top1, tries.read_bytes()

        def rank() -> list[tuple[str, float]]:
            layers = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in RANK_OPS]
            costs = []
            for layer in layers:
                quantize(tries, only=[layer])
                costs.append((layer, float(((_logits(tries, xv) - ref) ** 2).mean())))
            return sorted(costs, key=lambda c: -c[1])

        allowed = allowed_drop(max_drop, len(kept))
        steps, excluded, best = keep_in_float(drop, rank, allowed)
        tries.write_bytes(best)
        _set_manifest(tries, dst, manifest)
    return {
        "calibration": f"MinMax on {len(xc)} training images, calibrated once",
        "weights": "int8 per channel",
        "activations": "uint8 per tensor",
        **fallback_report(steps, excluded, fp32_top1, allowed, len(kept), start),
    }


def keep_in_float(drop, rank, allowed: float):
    """The accuracy-aware loop shared by ONNX and ExecuTorch int8.

    `drop(excluded)` quantises with the layers in `excluded` kept in float and returns (its
    top-1 drop, the variant); `rank()` lists (layer, cost), costliest first, and is called
    only when full int8 misses `allowed`. Returns (steps, the layers kept in float in the
    best variant, the best variant): the first within `allowed`, else the one that lost least.
    """
    excluded: list[str] = []
    steps = []
    ranked = None
    best_drop = None
    while True:
        d, variant = drop(excluded)
        steps.append({"float": list(excluded), "top1_drop": round(d, 6)})
        if best_drop is None or d < best_drop - 1e-9:
            best_drop, best_excluded, best = d, list(excluded), variant
        if d <= allowed + 1e-9 or len(excluded) >= MAX_FLOAT_TRIES:
            break
        if ranked is None:
            ranked = rank()
        left = [(layer, cost) for layer, cost in ranked if layer not in excluded]
        if not left:
            break
        excluded.append(left[0][0])
        steps[-1]["next"] = {"layer": left[0][0], "cost": float(f"{left[0][1]:.4g}")}
    return steps, best_excluded, best


def fallback_report(steps, excluded, fp32_top1, allowed, images, start) -> dict:
    """What export.json says about an accuracy-aware int8 variant: every step tried (which
    layers were float, the drop, the costliest layer kept in float next and its cost), what
    stayed in float, and whether the bound was met."""
    final = next(s for s in steps if s["float"] == excluded)
    why = {s["next"]["layer"]: s for s in steps if "next" in s}
    return {
        "fp32_top1": fp32_top1,
        "images": images,
        "allowed_drop": round(allowed, 6),
        "top1_drop": final["top1_drop"],
        "met_bound": final["top1_drop"] <= allowed + 1e-9,
        "kept_float": [
            {
                "layer": layer,
                "cost": why[layer]["next"]["cost"],
                "drop_before": why[layer]["top1_drop"],
            }
            for layer in excluded
        ],
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _float_note(report: dict | None) -> str:
    """The words "(even with N layers kept in float)" for an int8 variant that missed."""
    if not report or not report.get("kept_float"):
        return ""
    n = len(report["kept_float"])
    return f" (even with {n} layer{'s' if n > 1 else ''} kept in float)"


def _logits(path: Path, x: np.ndarray, batch: int = 16) -> np.ndarray:
    session = open_session(path, None)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    )


def convert_fp16(src: Path, dst: Path, manifest: Manifest) -> None:
    """fp16 weights and compute, float32 inputs and outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    tmp = dst.with_name(dst.stem + ".tmp.onnx")
    with onnx_step("fp16 conversion", tmp):
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        _toposort(model.graph)  # the converter appends its input casts at the end
        onnx.save(model, str(tmp))
        _set_manifest(tmp, dst, manifest)


def save_optimized(src: Path, dst: Path, manifest: Manifest) -> None:
    """onnxruntime's graph optimisations saved at the EXTENDED level (portable across CPUs)."""
    import onnxruntime as ort

    tmp = dst.with_name(dst.stem + ".tmp.onnx")
    opts = session_options(opt_level="extended")
    opts.optimized_model_filepath = str(tmp)
    try:
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
        _set_manifest(tmp, dst, manifest)
    finally:
        tmp.unlink(missing_ok=True)


def _toposort(graph) -> None:
    """Reorder graph.node so every node comes after the producers of its inputs."""
    produced_by = {out: i for i, n in enumerate(graph.node) for out in n.output}
    order, state = [], {}

    def visit(i: int) -> None:
        stack = [(i, False)]
        while stack:
            j, done = stack.pop()
            if done:
                if state.get(j) != 2:
                    state[j] = 2
                    order.append(j)
                continue
            if state.get(j):
                continue
            state[j] = 1
            stack.append((j, True))
            for name in graph.node[j].input:
                k = produced_by.get(name)
                if k is not None and not state.get(k):
                    stack.append((k, False))

    for i in range(len(graph.node)):
        visit(i)
    nodes = [graph.node[i] for i in order]
    copies = [type(n)() for n in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def latency_ms(
    runners: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, runs: int = LATENCY_RUNS
) -> dict[str, tuple[float, float]]:
    """(p50, p90) latency in milliseconds of each runner on batch `x`, after a warm-up.

    Round-robin, one run of each per round: load that comes and goes on a shared machine then
    slows every variant alike. Measured one after the other, a quiet moment made
    model.opt.onnx look 10% faster than model.onnx and the guard recommend it, though the two
    take the same time.
    """
    for _ in range(LATENCY_WARMUP):
        for run in runners.values():
            run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(runs):
        for k, run in runners.items():
            t = time.perf_counter()
            run(x)
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 90))) for k, v in times.items()}


def _runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """batch -> logits for an ONNX model (onnxruntime) or a .pte program (ExecuTorch)."""
    if path.suffix == ".pte":
        return PteClassifier(path, threads).logits
    session = open_session(path, threads)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def guard(
    folder: Path,
    manifest: Manifest,
    val: list[Sample],
    max_drop: float,
    threads: int | None = None,
    fallback: dict | None = None,
) -> dict:
    """Top-1 on `val` and batch-1 latency for every ONNX variant and .pte program in `folder`;
    recommend the fastest whose top-1 is at most `max_drop` (allowed_drop) below fp32.

    onnxruntime and ExecuTorch get the same number of threads (`threads`, or every core), so
    their latencies compare. `fallback`: the accuracy-aware int8 reports by kind, named in the
    note when a variant misses anyway.
    """
    fallback = fallback or {}
    threads = threads or os.cpu_count() or 1
    x, kept = load_inputs(val, manifest)
    truth = np.array([s.label for s in kept])
    rows: dict[str, dict] = {}
    runners = {}
    ref = None
    for kind, name in GUARDED.items():
        if not (folder / name).is_file():
            continue
        run = runners[kind] = _runner(folder / name, threads)
        pred = np.concatenate([run(x[i : i + 16]) for i in range(0, len(x), 16)]).argmax(1)
        ref = pred if ref is None else ref
        rows[kind] = {
            "file": name,
            "top1": float((pred == truth).mean()),
            "agreement_with_fp32": float((pred == ref).mean()),
        }
    for kind, (p50, p90) in latency_ms(runners, x[:1]).items():
        rows[kind]["latency_ms_p50"] = round(p50, 4)
        rows[kind]["latency_ms_p90"] = round(p90, 4)
    base = rows["fp32"]["top1"]
    allowed = allowed_drop(max_drop, len(kept))
    for row in rows.values():
        row["top1_drop"] = round(base - row["top1"], 6)
        row["ok"] = row["top1_drop"] <= allowed + 1e-9
    # GUARDED is ordered simplest first; a less plain artifact must be clearly faster to win,
    # so timing noise on a tiny model does not flip the recommendation.
    best = "fp32"
    for kind, r in rows.items():
        if r["ok"] and r["latency_ms_p50"] < MIN_SPEEDUP * rows[best]["latency_ms_p50"]:
            best = kind
    notes = [
        f"recommended: {rows[best]['file']} (fastest with top-1 drop <= "
        f"{allowed:.1%} on {len(kept)} validation images, batch 1, {threads} threads)"
    ]
    reduced = [k for k in REDUCED if k in rows]
    misses = [
        f"{rows[k]['file']} loses {rows[k]['top1_drop']:.1%}{_float_note(fallback.get(k))}"
        for k in reduced
        if not rows[k]["ok"]
    ]
    if misses:
        notes.append(
            f"not within the {allowed:.1%} top-1 bound: {', '.join(misses)}; not recommended, "
            f"{rows[best]['file']} is"
        )
    for kind in reduced:
        plain = "pte" if kind == "pte-int8" and "pte" in rows else "fp32"
        ratio = rows[kind]["latency_ms_p50"] / max(rows[plain]["latency_ms_p50"], 1e-9)
        if ratio > 1:
            notes.append(
                f"{rows[kind]['file']} is {ratio:.1f}x slower than {rows[plain]['file']} on "
                "this machine: quantisation pays off only where fast low-precision kernels exist"
            )
    return {
        "images": len(kept),
        "max_drop": max_drop,
        "artifacts": rows,
        "recommended": best,
        "notes": notes,
    }
