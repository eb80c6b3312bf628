"""ExecuTorch export: torch.export -> XNNPACK-delegated edge program -> model.pte, with the
manifest and the accepted batch range inside the program as constant methods, checked against
eager PyTorch at batch 1, 2 and the largest batch before it is written; and model.int8.pte,
PT2E static int8 with the XNNPACK quantizer that keeps its accuracy like ONNX int8."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import time
import warnings
from pathlib import Path

import numpy as np

from edgetransfer.backbones import outputs as split_outputs
from edgetransfer.errors import ExportError, first_line
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import PTE_BATCH_METHOD, PTE_MANIFEST_METHOD, Manifest
from edgetransfer.parity import allowed_drop, require_close
from edgetransfer.quantize import fallback_report, keep_in_float
from edgetransfer.runtime import EXECUTORCH_EXTRA, PteProgram

# Graph nodes that are bookkeeping, not computation, when counting what the delegate runs.
_NOT_OPS = ("getitem", "sym_size", "executorch_call_delegate")


def require_executorch() -> None:
    """One line naming the extra when the ExecuTorch exporter is not installed."""
    if importlib.util.find_spec("executorch") is None:
        raise ExportError(f"--executorch needs ExecuTorch; {EXECUTORCH_EXTRA}")


def export_pte(model, manifest: Manifest, path: Path, max_batch: int, notes: list[str]) -> dict:
    """Lower `model` to model.pte and check it; returns what export.json records about it.

    The batch dimension is dynamic (1..max_batch) when torch.export and the check allow it,
    otherwise fixed at 1 (said in `notes` and the report).
    """
    require_executorch()
    manifest = _with_version(manifest)
    h, w = manifest.preprocessing.input_size
    errors = []
    for low, high in dict.fromkeys([(1, max_batch), (1, 1)]):
        start = time.perf_counter()
        try:
            program, counts = _lower(model, manifest, (h, w), low, high)
            _check(model, program, (h, w), sorted({low, min(2, high), high}))
        except ExportError as e:
            errors.append(f"batch {low}..{high}: {e}")
            continue
        if errors:
            notes.append("model.pte has a fixed batch of 1: " + "; ".join(errors))
        atomic_write_bytes(path, program)
        return {
            "batch": [low, high],
            "dynamic_batch": low != high,
            **counts,
            "seconds": round(time.perf_counter() - start, 1),
            "executorch": manifest.versions["executorch"],
        }
    raise ExportError(f"ExecuTorch export of {manifest.arch} failed: " + "; ".join(errors))


def _with_version(manifest: Manifest) -> Manifest:
    """The manifest a .pte carries: the ExecuTorch version it was lowered with added."""
    from importlib.metadata import version

    return dataclasses.replace(
        manifest, versions={**manifest.versions, "executorch": version("executorch")}
    )


CALIB_BATCH = 16  # calibration batches: HistogramObserver's cost is per call, not per image
QUANTIZER = (
    "XNNPACKQuantizer, symmetric per-channel int8 weights, int8 per-tensor activations "
    "(HistogramObserver)"
)


def export_pte_int8(
    model,
    manifest: Manifest,
    path: Path,
    calib: np.ndarray,
    val: np.ndarray,
    truth: np.ndarray,
    max_drop: float,
    max_batch: int,
    notes: list[str],
) -> dict:
    """model.int8.pte: PT2E static int8 calibrated on `calib` (normalised NCHW images), lowered
    to XNNPACK; returns what export.json records about it.

    Accuracy-aware like ONNX int8 (quantize.keep_in_float): when top-1 on `val` drops more
    than allowed, the Conv/Linear modules whose quantisation costs most (module_costs) are
    left unannotated, so they stay float, one at a time. Each try is judged on the converted
    PyTorch program; the program written is run on `val` under ExecuTorch and its own top-1
    is reported too. The batch is dynamic (1..max_batch) like model.pte's, checked by running
    `val` batched and one image at a time; when that fails, fixed at 1 (said in `notes`).
    """
    require_executorch()
    import torch

    start = time.perf_counter()
    manifest = _with_version(manifest)
    xc, xv = torch.from_numpy(calib), torch.from_numpy(val)
    fp32_top1 = _top1(model, xv, truth)

    stats: dict = {}

    def drop(excluded: list[str]):
        converted = _pt2e(model, xc, excluded, stats)
        return fp32_top1 - _top1(converted, xv, truth), converted

    allowed = allowed_drop(max_drop, len(truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            steps, excluded, converted = keep_in_float(
                drop, lambda: module_costs(model, xc, xv), allowed
            )
        except Exception as e:  # torch.export / the quantizer raise many types
            raise ExportError(f"int8 quantisation (PT2E) failed: {first_line(e)}") from None
    try:
        program, counts, (low, high), got = _lower_int8(
            converted, manifest, path, val, max_batch, notes
        )
    except ExportError as e:
        if not excluded:
            raise
        # XNNPACK refuses some float islands (a float conv fed by a quantised tensor:
        # "Weight and Input should both be quantized", seen on efficientnet_lite0)
        notes.append(
            f"{path.name}: keeping {', '.join(excluded)} in float does not lower to XNNPACK "
            f"({e}); written fully int8"
        )
        excluded = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = _pt2e(model, xc, excluded, stats)
        program, counts, (low, high), got = _lower_int8(
            converted, manifest, path, val, max_batch, notes
        )
    atomic_write_bytes(path, program)
    report = fallback_report(steps, excluded, fp32_top1, allowed, len(truth), start)
    program_top1 = float((got.argmax(1) == truth).mean())
    return {
        "quantizer": QUANTIZER,
        "calibration": f"{len(calib)} training images",
        "batch": [low, high],
        "dynamic_batch": low != high,
        **counts,
        **report,
        "program_top1": program_top1,
        "program_top1_drop": round(fp32_top1 - program_top1, 6),
        "executorch": manifest.versions["executorch"],
    }


def _lower_int8(converted, manifest: Manifest, path: Path, val, max_batch: int, notes: list):
    """(program, node counts, (low, high) batch, logits on `val`) for a converted int8 model:
    a dynamic batch 1..max_batch checked batched against one image at a time, else 1 (said in
    `notes`)."""
    h, w = manifest.preprocessing.input_size
    errors = []
    for low, high in dict.fromkeys([(1, max_batch), (1, 1)]):
        try:
            program, counts = _lower(converted, manifest, (h, w), low, high)
            got = _run_batched_and_single(program, path.name, val, high)
        except ExportError as e:
            errors.append(f"batch {low}..{high}: {e}")
            continue
        if errors:
            notes.append(f"{path.name} has a fixed batch of 1: " + "; ".join(errors))
        return program, counts, (low, high), got
    raise ExportError(f"int8 ExecuTorch export of {manifest.arch} failed: " + "; ".join(errors))


def _run_batched_and_single(program: bytes, name: str, x: np.ndarray, high: int) -> np.ndarray:
    """The program's logits on `x` in batches of `high`, which must match its answers one
    image at a time (the dynamic batch works); an ExportError otherwise."""
    try:
        runner = PteProgram(program, name)
        batched = runner.run(x)[0]
        single = np.concatenate([runner.run(x[i : i + 1])[0] for i in range(len(x))])
    except Exception as e:  # InputError/ManifestError from the runtime
        raise ExportError(f"{name} does not run: {first_line(e)}") from None
    require_close([batched], [single], name, high)
    return batched


def _top1(model, x, truth: np.ndarray) -> float:
    """Top-1 of a PyTorch model (eager or converted) on `x`, in batches of 64."""
    import torch

    with torch.no_grad():
        logits = [split_outputs(model(x[i : i + 64]))[0] for i in range(0, len(x), 64)]
    return float((torch.cat(logits).argmax(1).numpy() == truth).mean())


def _pt2e(model, calib, excluded: list[str], stats: dict | None = None):
    """`model` quantised by PT2E (prepare, calibrate on `calib`, convert) with the XNNPACK
    quantizer, the modules in `excluded` (and everything inside them) left in float.

    `stats` carries the observers' statistics between calls: filled by the first call, reused
    by later ones instead of calibrating again. A prepared model computes in float, so an
    observer on a tensor (named by the node that produces it) sees the same values whichever
    modules are annotated; calibrating mobilenet_v3_small's histograms takes about a minute.
    """
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=4096)
    graph = torch.export.export(model, (calib[:2],), dynamic_shapes=({0: batch},)).module()
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)
    )
    if excluded:

        def outside(node) -> bool:
            stack = node.meta.get("nn_module_stack") or {}
            return not any(
                path == name or path.startswith(name + ".")
                for path, _ in stack.values()
                for name in excluded
            )

        quantizer.set_filter_function(outside)
    prepared = prepare_pt2e(graph, quantizer)
    observers = {
        node.args[0].name: getattr(prepared, node.target)
        for node in prepared.graph.nodes
        if node.op == "call_module" and node.target.startswith("activation_post_process")
    }
    if stats is not None and observers.keys() <= stats.keys():
        for name, observer in observers.items():
            observer.load_state_dict(stats[name])
    else:
        with torch.no_grad():
            for i in range(0, len(calib), CALIB_BATCH):
                prepared(calib[i : i + CALIB_BATCH])
        if stats is not None:
            stats.update({name: o.state_dict() for name, o in observers.items()})
    return convert_pt2e(prepared)


def module_costs(model, calib, val) -> list[tuple[str, float]]:
    """(module, cost) for every Conv2d/Linear, costliest first.

    The cost is the mean squared logit error against fp32 on `val` when only that module is
    rounded as the XNNPACK quantizer rounds it: weights int8 symmetric per output channel,
    its output int8 per tensor over the range seen on `calib`. Simulated with torch's
    fake-quantise ops on a copy of the model, so one calibration pass serves every module
    (a PT2E prepare per module would cost seconds each).
    """
    import torch

    model = copy.deepcopy(model).eval()
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear) and n
    }
    ranges: dict[str, tuple[float, float]] = {}

    def record(name):
        def hook(_, __, out):
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(out.min())), max(hi, float(out.max())))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    with torch.no_grad():
        for i in range(0, len(calib), CALIB_BATCH):
            model(calib[i : i + CALIB_BATCH])
        for h in hooks:
            h.remove()
        ref = split_outputs(model(val))[0]
        costs = []
        for name, m in layers.items():
            w = m.weight.data
            scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / 127
            zero = torch.zeros(len(scale), dtype=torch.int32)
            m.weight.data = torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -127, 127)
            lo, hi = ranges[name]
            step = max(hi - lo, 1e-12) / 255
            zp = int(round(-128 - lo / step))

            def rounded(_, __, out, step=step, zp=zp):
                return torch.fake_quantize_per_tensor_affine(out, step, zp, -128, 127)

            h = m.register_forward_hook(rounded)
            out = split_outputs(model(val))[0]
            h.remove()
            m.weight.data = w
            costs.append((name, float(((out - ref) ** 2).mean())))
    return sorted(costs, key=lambda c: -c[1])


def _lower(model, manifest: Manifest, shape: tuple[int, int], low: int, high: int):
    """(.pte bytes, node counts) for batches low..high."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.randn(min(2, high), 3, *shape, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch", min=low, max=high)},) if high > low else None
    constants = {PTE_MANIFEST_METHOD: manifest.to_json(), PTE_BATCH_METHOD: [low, high]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        except Exception as e:  # torch.export raises many types for unsupported code
            raise ExportError(f"torch.export failed: {first_line(e)}") from None
        # Choosing a CPU convolution backend asks "batch >= 16?" of NNPACK and oneDNN; on the
        # symbolic batch that question becomes a guard (batch < 16, from the example's batch)
        # and memory would be planned for 15 whatever max_batch says. Lowering never runs a
        # convolution, so with both off nothing asks.
        try:
            with (
                torch.backends.nnpack.flags(enabled=False),
                torch.backends.mkldnn.flags(enabled=False),
            ):
                edge = to_edge_transform_and_lower(
                    ep, partitioner=[XnnpackPartitioner()], constant_methods=constants
                )
                counts = _node_counts(edge.exported_program())
                program = edge.to_executorch().buffer
        except Exception as e:  # exir raises its own and torch's error types
            raise ExportError(f"lowering to XNNPACK failed: {first_line(e)}") from None
    return program, counts


def _node_counts(ep) -> dict:
    """How many operator nodes XNNPACK runs and which ones stay outside the delegate."""
    inside = 0
    outside: list[str] = []
    gm = ep.graph_module
    for node in gm.graph.nodes:
        if node.op == "get_attr" and hasattr(getattr(gm, node.target, None), "original_module"):
            lowered = getattr(gm, node.target).original_module
            inside += sum(
                1
                for n in lowered.graph.nodes
                if n.op == "call_function" and not any(k in str(n.target) for k in _NOT_OPS)
            )
        elif node.op == "call_function" and not any(k in str(node.target) for k in _NOT_OPS):
            outside.append(str(getattr(node.target, "__name__", node.target)))
    total = inside + len(outside)
    return {
        "delegated_nodes": inside,
        "outside_nodes": len(outside),
        "outside_ops": sorted(set(outside)),
        "delegated_share": round(inside / total, 4) if total else 0.0,
    }


def _check(model, program: bytes, shape: tuple[int, int], batches: list[int]) -> None:
    """The program must answer like eager `model` at each batch (fp32 tolerance), every output."""
    import torch

    runner = PteProgram(program, "model.pte")
    gen = torch.Generator().manual_seed(2)
    for batch in batches:
        x = torch.randn(batch, 3, *shape, generator=gen)
        with torch.inference_mode():
            want = [t for t in split_outputs(model(x)) if t is not None]
        try:
            got = runner.run(x.numpy())
        except Exception as e:  # InputError from the runtime: batch not accepted
            raise ExportError(f"model.pte fails at batch {batch}: {first_line(e)}") from None
        require_close(got, [t.numpy() for t in want], "model.pte", batch)
