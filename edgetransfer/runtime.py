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


OPT_LEVELS = ("disable", "basic", "extended", "all")


def session_options(threads: int | None = None, opt_level: str = "all"):
    """onnxruntime settings shared by predict, evaluate, bench, verify and export.

    Args:
        threads: intra-op threads (None: onnxruntime's default, one per core).
        opt_level: graph optimisation level; "extended" is the highest portable one.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[opt_level]
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # No busy-waiting between runs: on a shared laptop/Jetson spinning burns a core for nothing.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


def open_session(path: str | os.PathLike, threads: int | None = None, opt_level: str = "all"):
    """An onnxruntime CPU session; a file ORT cannot load becomes a one-line ManifestError."""
    import onnxruntime as ort

    path = Path(path)
    check_external_data(path)
    try:
        return ort.InferenceSession(
            str(path), session_options(threads, opt_level), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ORT raises its own exception types
        first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ManifestError(f"{path.name} is not a loadable ONNX model: {first}") from None


def check_external_data(path: Path) -> None:
    """Refuse an ONNX file whose external tensor data lies outside its own folder.

    Checked on the protobuf alone, before any external file is opened.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends
        raise ManifestError(f"{path.name} is not a readable ONNX model: {e}") from None
    folder = path.parent.resolve()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or folder not in target.parents:
            raise ManifestError(
                f"{path.name} refers to external data outside its folder ({location!r}); "
                "refusing to load it"
            )


class OnnxClassifier:
    """An exported model under onnxruntime, with labels and preprocessing from its metadata."""

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, opt_level: str = "all"
    ) -> None:
        self.path = resolve_onnx(path)
        self.session = open_session(self.path, threads, opt_level)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ManifestError(
                f"{self.path.name} carries no edgetransfer metadata; export it with edgetransfer"
            )
        self.manifest = Manifest.from_json(meta[METADATA_KEY])
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.raw = inp.type == "tensor(uint8)"  # model.raw.onnx: uint8 NHWC pixels in

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch: normalised float32 NCHW, or uint8 NHWC pixels for a raw model."""
        names = [o.name for o in self.session.get_outputs()]
        want = self.manifest.io.get("output", "logits")
        idx = names.index(want) if want in names else 0
        dtype = np.uint8 if self.raw else np.float32
        return self.session.run(None, {self.input_name: batch.astype(dtype, copy=False)})[idx]

    def prepare(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB image -> this model's input (without the batch dimension)."""
        p = self.manifest.preprocessing
        if self.raw:
            return np.asarray(resize_crop(img, p), dtype=np.uint8)
        return preprocess(img, p)

    def predict(self, paths: list[Path], topk: int = 5, batch_size: int = 16) -> list[Prediction]:
        """Top-k predictions per image; unreadable images raise DataError."""
        from edgetransfer.data import load_image

        labels = self.manifest.labels
        k = max(1, min(topk, len(labels)))
        out: list[Prediction] = []
        for i in range(0, len(paths), batch_size):
            chunk = paths[i : i + batch_size]
            x = np.stack([self.prepare(load_image(p)) for p in chunk])
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
