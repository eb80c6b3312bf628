"""Golden vectors: a few real inputs and their expected logits, for any runtime's self-test.

EXPORT_DIR/golden/ holds, per case NN:
  NN.png         the image at exactly input_size (already resized and cropped), RGB 8-bit
  NN.input.npy   the normalised float32 tensor [1, 3, H, W] made from NN.png
  NN.input.bin   the same, raw little-endian float32, C order
  NN.logits.npy  the reference logits [1, C] for that tensor (eager PyTorch, or a backbone
                 bundle's features through the numpy head)
  NN.logits.bin  the same, raw little-endian float32
and golden.json describing the cases, shapes, labels and tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from edgetransfer.data import Sample, load_image, normalize, resize_crop
from edgetransfer.errors import DataError
from edgetransfer.fileio import atomic_write_bytes, atomic_write_text
from edgetransfer.manifest import Manifest
from edgetransfer.parity import ATOL, RTOL

GOLDEN_DIR = "golden"
GOLDEN_INDEX = "golden.json"


class Logits(Protocol):
    """Any runtime's classifier (runtime.Predictor): a float32 NCHW batch in, logits out."""

    def logits(self, batch: np.ndarray) -> np.ndarray: ...


def pick_cases(samples: list[Sample], n: int) -> list[Sample]:
    """Up to `n` validation samples, one per class first, in a stable order."""
    val = sorted((s for s in samples if s.split == "val"), key=lambda s: str(s.path)) or sorted(
        samples, key=lambda s: str(s.path)
    )
    chosen, seen = [], set()
    for s in val:
        if s.label not in seen:
            chosen.append(s)
            seen.add(s.label)
    chosen += [s for s in val if s not in chosen]
    return chosen[:n]


def write_golden(
    reference: Callable[[np.ndarray], np.ndarray],
    manifest: Manifest,
    samples: list[Sample],
    folder: Path,
    n: int = 5,
) -> int:
    """Write golden cases into `folder`; returns how many were written.

    Args:
        reference: float32 [1, 3, H, W] -> the expected logits [1, C] (eager PyTorch, or a
            bundle's features through the numpy head: this module needs no torch).
    """
    folder.mkdir(parents=True, exist_ok=True)
    p = manifest.preprocessing
    cases = []
    for s in pick_cases(samples, n * 2):
        if len(cases) == n:
            break
        try:
            img = resize_crop(load_image(s.path), p)
        except DataError:
            continue
        name = f"{len(cases):02d}"
        pixels = np.asarray(img, dtype=np.uint8)
        x = normalize(pixels, p)[None]
        logits = np.asarray(reference(x)).astype("<f4")
        png = folder / f"{name}.png"
        img.save(png, "PNG")
        for kind, arr in (("input", x.astype("<f4")), ("logits", logits)):
            atomic_write_bytes(folder / f"{name}.{kind}.bin", arr.tobytes(order="C"))
            np.save(folder / f"{name}.{kind}.npy", arr)
        cases.append(
            {
                "name": name,
                "png": png.name,
                "input": f"{name}.input.bin",
                "logits": f"{name}.logits.bin",
                "source": s.path.name,
                "label": manifest.labels[s.label] if s.label < len(manifest.labels) else None,
                "top1": int(logits[0].argmax()),
                "top1_label": manifest.labels[int(logits[0].argmax())],
            }
        )
    h, w = p.input_size
    index = {
        "schema": 1,
        "input_shape": [1, 3, h, w],
        "logits_shape": [1, len(manifest.labels)],
        "dtype": "float32",
        "byte_order": "little",
        "layout": "NCHW",
        "png": "RGB 8-bit at input_size; normalise only (no resize/crop) to get the input",
        "tolerance": {"atol": ATOL, "rtol": RTOL},
        "labels": manifest.labels,
        "cases": cases,
    }
    atomic_write_text(folder / GOLDEN_INDEX, json.dumps(index, indent=2) + "\n")
    return len(cases)


def load_golden(folder: Path) -> tuple[dict, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(index, [(pixels uint8 HWC, input [1,3,H,W], logits [1,C])]) for a golden folder."""
    index = json.loads((folder / GOLDEN_INDEX).read_text())
    out = []
    for c in index["cases"]:
        pixels = np.asarray(Image.open(folder / c["png"]).convert("RGB"))
        x = np.fromfile(folder / c["input"], dtype="<f4").reshape(index["input_shape"])
        y = np.fromfile(folder / c["logits"], dtype="<f4").reshape(index["logits_shape"])
        out.append((pixels, x, y))
    return index, out


def check_golden(model: Logits, folder: Path) -> list[str]:
    """Run every golden case of `folder` through `model` (any runtime with
    `.logits(batch) -> [N, C]`: ONNX, ExecuTorch, TorchScript) and return one line per case
    that misses golden.json's tolerance or the top-1; an empty list means the runtime passes."""
    index, cases = load_golden(folder)
    atol, rtol = index["tolerance"]["atol"], index["tolerance"]["rtol"]
    misses = []
    for case, (_, x, expected) in zip(index["cases"], cases, strict=True):
        got = np.asarray(model.logits(x), dtype=np.float64)
        if got.shape != expected.shape:
            misses.append(f"case {case['name']}: logits {got.shape}, expected {expected.shape}")
            continue
        # the C++ --selftest's rule; written as "not <=" so a NaN counts as a miss
        diff = np.abs(got - expected)
        if not np.all(diff <= atol + rtol * np.abs(expected)):
            misses.append(f"case {case['name']}: max |diff| {diff.max():.3g} over the tolerance")
        elif int(got[0].argmax()) != int(expected[0].argmax()):
            misses.append(
                f"case {case['name']}: top-1 {int(got[0].argmax())}, expected "
                f"{int(expected[0].argmax())}"
            )
    return misses
