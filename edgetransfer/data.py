"""Dataset scanning (folder per class, train/val), robust image decoding, transform presets."""

from __future__ import annotations

import hashlib
import os
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from edgetransfer.errors import DataError
from edgetransfer.manifest import Preprocessing

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
DEFAULT_MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Sample:
    """One image: its path, class index and split ("train" or "val")."""

    path: Path
    label: int
    split: str


@dataclass(frozen=True)
class Dataset:
    """A scanned DATA_DIR: class names (sorted) and samples with their split."""

    root: Path
    classes: list[str]
    samples: list[Sample]

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def fingerprint(self) -> str:
        """sha256 of the sorted (relative path, class, split, size) list."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: str(s.path)):
            rel = os.path.relpath(s.path, self.root)
            h.update(
                f"{rel}\t{self.classes[s.label]}\t{s.split}\t{_size(s.path)}\n".encode(
                    "utf-8", "surrogateescape"
                )
            )
        return h.hexdigest()

    def without(self, bad: Sequence[Path]) -> Dataset:
        drop = set(bad)
        return Dataset(self.root, self.classes, [s for s in self.samples if s.path not in drop])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _hidden(name: str) -> bool:
    return name.startswith((".", "_")) or name in IGNORED_NAMES or name.endswith("_checkpoints")


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))


def list_images(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for f in sorted(filenames):
            if not _hidden(f) and Path(f).suffix.lower() in IMAGE_EXTS:
                out.append(Path(dirpath) / f)
    return out


def scan(root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Scan a folder with one sub-folder of images per class.

    With ``train/`` and ``val/`` sub-folders those splits are used as given; otherwise each
    class is split by a seeded shuffle, `val_fraction` of it going to validation.
    """
    root = Path(root)
    hint = "pass a folder with one sub-folder of images per class"
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; {hint}")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; {hint}")
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir():
        classes = [p.name for p in _class_dirs(train_dir)]
        samples = _collect(train_dir, classes, "train", root)
        if val_dir.is_dir():
            extra = [p.name for p in _class_dirs(val_dir) if p.name not in classes]
            if extra:
                raise DataError(
                    f"val/ has classes that train/ lacks: {', '.join(extra)}; "
                    "add them to train/ or remove them from val/"
                )
            samples += [
                s
                for c in classes
                if (val_dir / c).is_dir()
                for s in _collect_class(val_dir / c, classes.index(c), "val")
            ]
        else:
            samples = _split(samples, val_fraction, seed)
    else:
        classes = [p.name for p in _class_dirs(root)]
        samples = _split(_collect(root, classes, "train", root), val_fraction, seed)
    return Dataset(root, classes, samples)


def _collect(folder: Path, classes: list[str], split: str, root: Path) -> list[Sample]:
    if not classes:
        if list_images(folder):
            raise DataError(
                f"{root} has images but no class folders; {folder}/CLASS/*.jpg expected"
            )
        raise DataError(
            f"data folder {root} is empty; put one sub-folder of images per class in it"
        )
    if len(classes) < 2:
        raise DataError(
            f"{root} has only one class ({classes[0]}); at least 2 class folders needed"
        )
    samples, empty = [], []
    for i, c in enumerate(classes):
        found = _collect_class(folder / c, i, split)
        if not found:
            empty.append(c)
        samples += found
    if empty:
        raise DataError(
            f"class folder(s) with no images: {', '.join(empty)}; add images "
            f"({', '.join(sorted(IMAGE_EXTS))}) or remove the folder"
        )
    return samples


def _collect_class(folder: Path, label: int, split: str) -> list[Sample]:
    return [Sample(p, label, split) for p in list_images(folder)]


def _split(samples: list[Sample], val_fraction: float, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if val_fraction else 0
        out += [
            Sample(s.path, s.label, "val" if i < n_val else "train") for i, s in enumerate(items)
        ]
    return out


def load_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode any image file to 8-bit RGB with EXIF orientation applied.

    Raises DataError for anything that is not a decodable image within `max_pixels`.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise DataError(
                        f"{path.name}: {im.width}x{im.height} exceeds --max-pixels {max_pixels}"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
                return to_rgb(im)
    except DataError:
        raise
    except (
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
        EOFError,
    ) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path.name}: not a readable image ({reason})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = Image.fromarray(((a - lo) * scale).round().astype("uint8"), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def eval_transform(p: Preprocessing):
    """Resize shorter side, centre crop, to float, normalise: torchvision.transforms.v2."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(p.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(list(p.input_size)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(p.mean), list(p.std)),
        ]
    )
