"""int8 (static QDQ, calibrated on the user's images) and fp16 ONNX variants, and the guard that
measures accuracy and latency on this machine and recommends one artifact."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgetransfer.data import Sample, load_image, preprocess
from edgetransfer.errors import DataError, ExportError
from edgetransfer.manifest import ARTIFACTS, Manifest
from edgetransfer.onnxio import finish_onnx, onnx_step, open_session, session_options

LATENCY_WARMUP = 5
LATENCY_RUNS = 50
MIN_SPEEDUP = 0.9  # a variant must take under 90% of the current pick's latency to replace it
GUARDED = {
    "fp32": ARTIFACTS["onnx"],
    "optimized": ARTIFACTS["optimized"],
    "int8": ARTIFACTS["int8"],
    "fp16": ARTIFACTS["fp16"],
}


def _set_manifest(src: Path, dst: Path, manifest: Manifest) -> None:
    """Copy `src` to `dst` with the manifest in metadata_props, checked and written atomically."""
    # QDQ and fp16 graphs pass the structural check; full shape inference is export's job
    finish_onnx(src, dst, manifest, full_check=False)


def _inputs(samples: list[Sample], manifest: Manifest) -> tuple[np.ndarray, list[Sample]]:
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


def quantize_int8(src: Path, dst: Path, manifest: Manifest, calib: list[Sample]) -> None:
    """Static QDQ int8: quantisation pre-processing, then per-channel int8 weights and uint8
    activations calibrated (MinMax) on `calib` images."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    x, _ = _inputs(calib, manifest)
    name = manifest.io["input"]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(x[i : i + 1] for i in range(len(x)))

        def get_next(self):
            batch = next(self.it, None)
            return None if batch is None else {name: batch}

    pre = dst.with_name(dst.stem + ".pre.onnx")
    tmp = dst.with_name(dst.stem + ".tmp.onnx")
    with onnx_step("int8 quantisation", pre, tmp):
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception:  # symbolic shape inference does not know every op; plain is fine
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        _set_manifest(tmp, dst, manifest)


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
    sessions: dict[str, object], x: np.ndarray, runs: int = LATENCY_RUNS
) -> dict[str, tuple[float, float]]:
    """(p50, p90) batch latency in milliseconds of each session, after a warm-up.

    Round-robin, one run of each session per round: load that comes and goes on a shared
    machine then slows every variant alike. Measured one after the other, a quiet moment
    made model.opt.onnx look 10% faster than model.onnx and the guard recommend it, though
    the two take the same time.
    """
    feeds = {k: {s.get_inputs()[0].name: x} for k, s in sessions.items()}
    for _ in range(LATENCY_WARMUP):
        for k, s in sessions.items():
            s.run(None, feeds[k])
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(runs):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            times[k].append((time.perf_counter() - t) * 1000)
    return {k: (float(np.percentile(v, 50)), float(np.percentile(v, 90))) for k, v in times.items()}


def guard(
    folder: Path, manifest: Manifest, val: list[Sample], max_drop: float, threads: int | None = None
) -> dict:
    """Top-1 on `val` and batch-1 latency for every ONNX variant in `folder`; recommend the
    fastest whose top-1 is at most `max_drop` below fp32."""
    x, kept = _inputs(val, manifest)
    truth = np.array([s.label for s in kept])
    rows: dict[str, dict] = {}
    sessions = {}
    ref = None
    for kind, name in GUARDED.items():
        if not (folder / name).is_file():
            continue
        session = sessions[kind] = open_session(folder / name, threads)
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        pred = logits.argmax(1)
        ref = pred if ref is None else ref
        rows[kind] = {
            "file": name,
            "top1": float((pred == truth).mean()),
            "agreement_with_fp32": float((pred == ref).mean()),
        }
    for kind, (p50, p90) in latency_ms(sessions, x[:1]).items():
        rows[kind]["latency_ms_p50"] = round(p50, 4)
        rows[kind]["latency_ms_p90"] = round(p90, 4)
    base = rows["fp32"]["top1"]
    for row in rows.values():
        row["top1_drop"] = round(base - row["top1"], 6)
        row["ok"] = row["top1_drop"] <= max_drop + 1e-9
    # GUARDED is ordered simplest first; a less plain artifact must be clearly faster to win,
    # so timing noise on a tiny model does not flip the recommendation.
    best = "fp32"
    for kind, r in rows.items():
        if r["ok"] and r["latency_ms_p50"] < MIN_SPEEDUP * rows[best]["latency_ms_p50"]:
            best = kind
    notes = [
        f"recommended: {rows[best]['file']} (fastest with top-1 drop <= "
        f"{max_drop:.1%} on {len(kept)} validation images)"
    ]
    for kind in ("int8", "fp16"):
        if kind in rows:
            r = rows[kind]
            if not r["ok"]:
                notes.append(
                    f"{kind} loses {r['top1_drop']:.1%} top-1 (over --max-drop); not recommended"
                )
            ratio = r["latency_ms_p50"] / max(rows["fp32"]["latency_ms_p50"], 1e-9)
            if ratio > 1:
                notes.append(
                    f"{kind} is {ratio:.1f}x slower than fp32 on this machine: "
                    "quantisation pays off only where fast low-precision kernels exist"
                )
    return {
        "images": len(kept),
        "max_drop": max_drop,
        "artifacts": rows,
        "recommended": best,
        "notes": notes,
    }
