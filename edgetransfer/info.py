"""Describe artifacts: manifest, ONNX and .pte inputs/outputs, size, sha256, parity and
recommendation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgetransfer.errors import ManifestError
from edgetransfer.fileio import sha256_file
from edgetransfer.manifest import EXPORT_REPORT, PTE_BATCH_METHOD, read_manifest
from edgetransfer.onnxio import check_external_data
from edgetransfer.ptefile import read_pte

ARTIFACT_SUFFIXES = (".onnx", ".pte", ".pt", ".pt2", ".safetensors")


def _onnx_io(path: Path) -> dict[str, list[dict[str, Any]]]:
    import onnx

    check_external_data(path)
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}

    def describe(v) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": dims,
        }

    return {
        "inputs": [describe(v) for v in graph.input if v.name not in init],
        "outputs": [describe(v) for v in graph.output],
    }


def _pte_io(path: Path) -> dict[str, Any]:
    """What info shows about a .pte beyond the manifest: io (named as in the manifest; the
    batch dimension is "N" when it is dynamic), the batch range, the delegated share."""
    info = read_pte(path)
    io = read_manifest(path).io
    names = [[io.get("input", "input")], [io.get("output", "logits")]]
    if "source_output" in io:
        names[1].append(io["source_output"])
    batch = info.methods.get(PTE_BATCH_METHOD)
    batch = batch if batch and len(batch) == 2 else None
    dynamic = batch is not None and batch[0] != batch[1]

    def describe(tensors, kind_names) -> list[dict[str, Any]]:
        return [
            {
                "name": kind_names[i] if i < len(kind_names) else f"output{i}",
                "dtype": t.dtype,
                "shape": (["N"] if dynamic else []) + t.shape[1 if dynamic else 0 :],
            }
            for i, t in enumerate(tensors)
        ]

    calls = info.delegate_calls + info.kernel_calls
    return {
        "inputs": describe(info.inputs, names[0]),
        "outputs": describe(info.outputs, names[1]),
        "batch": batch,
        "delegate_calls": info.delegate_calls,
        "kernel_calls": info.kernel_calls,
        "kernel_ops": info.operators,
        "delegated_share": round(info.delegate_calls / calls, 4) if calls else 0.0,
    }


def _file(path: Path) -> dict[str, Any]:
    d: dict[str, Any] = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    if path.suffix == ".onnx":
        d.update(_onnx_io(path))
    elif path.suffix == ".pte":
        d.update(_pte_io(path))
    return d


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything `edgetransfer info` prints, as a dict."""
    path = Path(path)
    manifest = read_manifest(path)  # raises a one-line ManifestError for anything unknown
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in ARTIFACT_SUFFIXES)
    else:
        files = [path]
    out: dict[str, Any] = {
        "path": str(path),
        "manifest": manifest.to_dict(),
        "files": [_file(f) for f in files],
    }
    folder = path if path.is_dir() else path.parent
    parity = folder / "parity.json"
    if parity.is_file():
        try:
            p = json.loads(parity.read_text())
            out["parity"] = {
                "passed": bool(p["passed"]),
                "images": p["images"],
                "runtimes": sorted(p["runtimes"]),
            }
        except (ValueError, KeyError, TypeError):
            raise ManifestError(
                f"{parity} is not a valid parity report; run verify again"
            ) from None
    report = folder / EXPORT_REPORT
    if report.is_file():
        try:
            guard = json.loads(report.read_text()).get("guard")
        except ValueError:
            guard = None
        if guard and guard.get("recommended") in guard.get("artifacts", {}):
            out["recommended"] = guard["artifacts"][guard["recommended"]]["file"]
    return out
