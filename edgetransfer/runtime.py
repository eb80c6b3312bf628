"""onnxruntime sessions and numpy preprocessing for predict: no torch import on this path."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgetransfer.errors import EdgeTransferError, ManifestError
from edgetransfer.manifest import METADATA_KEY, Manifest, Preprocessing


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `shorter`, as torchvision does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_crop(img: Image.Image, p: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``p.resize`` (bilinear) and centre-crop ``p.input_size``."""
    w, h = resized_size(img.width, img.height, p.resize)
    if (w, h) != img.size:
        img = img.resize((w, h), Image.BILINEAR)
    ch, cw = p.input_size
    if w < cw or h < ch:  # torchvision pads before cropping; resize >= input_size prevents this
        raise EdgeTransferError(f"image of {w}x{h} after resize is smaller than the crop {cw}x{ch}")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def normalize(pixels: np.ndarray, p: Preprocessing) -> np.ndarray:
    """uint8 HWC RGB pixels -> float32 CHW, scaled to [0, 1] and normalised."""
    a = pixels.astype(np.float32) / np.float32(255.0)
    a = (a - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def preprocess(img: Image.Image, p: Preprocessing) -> np.ndarray:
    """An RGB PIL image -> float32 CHW array, exactly like data.eval_transform."""
    return normalize(np.asarray(resize_crop(img, p)), p)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def resolve_onnx(path: str | os.PathLike) -> Path:
    """A .onnx file, or the model.onnx inside an EXPORT_DIR."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.onnx"
        if not path.is_file():
            raise ManifestError(f"{path.parent} has no model.onnx; run `edgetransfer export` first")
    elif not path.is_file():
        raise ManifestError(f"model {path} does not exist")
    elif path.suffix.lower() != ".onnx":
        raise ManifestError(f"{path.name} is not an .onnx file; predict runs ONNX models")
    return path


@dataclass(frozen=True)
class Prediction:
    path: str
    topk: list[tuple[str, float]]  # (label, probability), best first
    logits: list[float]


class OnnxClassifier:
    """An exported model under onnxruntime, with labels and preprocessing from its metadata."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = resolve_onnx(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:  # ORT raises its own exception types
            raise ManifestError(
                f"{self.path.name} is not a loadable ONNX model: {str(e).splitlines()[0][:200]}"
            ) from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ManifestError(
                f"{self.path.name} carries no edgetransfer metadata; export it with edgetransfer"
            )
        self.manifest = Manifest.from_json(meta[METADATA_KEY])
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.astype(np.float32, copy=False)})[0]

    def predict(self, paths: list[Path], topk: int = 5, batch_size: int = 16) -> list[Prediction]:
        """Top-k predictions per image; unreadable images raise DataError."""
        from edgetransfer.data import load_image

        labels = self.manifest.labels
        k = max(1, min(topk, len(labels)))
        out: list[Prediction] = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            x = np.stack([preprocess(load_image(p), self.manifest.preprocessing) for p in chunk])
            logits = self.logits(x)
            probs = softmax(logits.astype(np.float64))
            for p, lg, pr in zip(chunk, logits, probs, strict=True):
                order = np.argsort(-pr, kind="stable")[:k]
                out.append(
                    Prediction(
                        os.fsdecode(p),
                        [(labels[j], float(pr[j])) for j in order],
                        [float(v) for v in lg],
                    )
                )
        return out


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into image paths."""
    import glob

    from edgetransfer.data import list_images
    from edgetransfer.errors import DataError

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching pattern")
            out += [Path(m) for m in matches if Path(m).is_file()]
    if not out:
        raise DataError("no images found in the given paths")
    return out
