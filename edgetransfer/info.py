"""Describe artifacts: manifest, ONNX inputs/outputs, size, sha256, parity and recommendation."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from edgetransfer.errors import ManifestError
from edgetransfer.fileio import sha256_file
from edgetransfer.manifest import read_manifest
from edgetransfer.onnxio import check_external_data

ARTIFACT_SUFFIXES = (".onnx", ".pt", ".pt2", ".safetensors")


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


def _file(path: Path) -> dict[str, Any]:
    d: dict[str, Any] = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }
    if path.suffix == ".onnx":
        d.update(_onnx_io(path))
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
    report = folder / "export.json"
    if report.is_file():
        try:
            guard = json.loads(report.read_text()).get("guard")
        except ValueError:
            guard = None
        if guard and guard.get("recommended") in guard.get("artifacts", {}):
            out["recommended"] = guard["artifacts"][guard["recommended"]]["file"]
    return out
