"""ExecuTorch export: torch.export -> XNNPACK-delegated edge program -> model.pte, with the
manifest and the accepted batch range inside the program as constant methods, checked against
eager PyTorch at batch 1, 2 and the largest batch before it is written."""

from __future__ import annotations

import dataclasses
import importlib.util
import time
import warnings
from pathlib import Path

from edgetransfer.backbones import outputs as split_outputs
from edgetransfer.errors import ExportError, first_line
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import PTE_BATCH_METHOD, PTE_MANIFEST_METHOD, Manifest
from edgetransfer.parity import require_close
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
    from importlib.metadata import version

    manifest = dataclasses.replace(
        manifest, versions={**manifest.versions, "executorch": version("executorch")}
    )
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
