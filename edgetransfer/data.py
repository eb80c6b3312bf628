"""Images in: dataset scanning (folder per class, train/val), robust decoding, and the numpy
preprocessing (resize, crop, normalise) and softmax every runtime shares with torchvision's."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import stat
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgetransfer import config
from edgetransfer.errors import (
    DataError,
    EdgeTransferError,
    EdgeTransferWarning,
    first_line,
    printable,
)
from edgetransfer.manifest import RUN_INFO, Manifest, Preprocessing, check_labels

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX"})
DEFAULT_MAX_PIXELS = config.MAX_PIXELS
# Resizing the shorter side of a 1x60000 strip to 256 would need ~4 G pixels: past this ratio an
# image is refused, which bounds the memory of the resize to ~1000x the square crop.
MAX_ASPECT = 1000
# The only formats Pillow may decode. Content decides the format, never the extension, and
# formats outside this list are refused: EPS, for one, would run Ghostscript.
DECODE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")  # JPEG covers MPO

# Decoding threads when none are asked for (see decode_workers): from this many images on, one
# per core up to the maximum.
THREADED_MIN_IMAGES = 64
MAX_DECODE_THREADS = 4

_max_pixels: int | None = None  # set by pixel_limit(); None means DEFAULT_MAX_PIXELS


def current_max_pixels() -> int:
    """The decoding limit in force: the innermost :func:`pixel_limit`, else the default."""
    return _max_pixels or DEFAULT_MAX_PIXELS


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """Make `limit` the default of :func:`load_image` inside the block (None: keep the current).

    The CLI's global ``--max-pixels`` uses this, so every command that decodes images (adapt,
    export, verify, predict, evaluate, bench) honours it without threading it through.
    A plain module setting, not a context variable, so decoding threads see it too.
    """
    global _max_pixels
    before = _max_pixels
    if limit is not None:
        if limit < 1:
            raise DataError(f"--max-pixels must be at least 1, not {limit}")
        _max_pixels = limit
    try:
        yield
    finally:
        _max_pixels = before


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
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))
    for p in dirs:
        try:
            p.name.encode("utf-8")
        except UnicodeEncodeError:
            # Class names become the model's labels, stored as UTF-8 text in every artifact.
            raise DataError(
                f"class folder {printable(str(p))} has a name that is not valid UTF-8; "
                "rename it (class names become the model's labels)"
            ) from None
    # The rules every manifest's labels follow, checked before any work is done.
    check_labels([p.name for p in dirs], "class folder", DataError, "rename it")
    return dirs


def sniff(path: str | os.PathLike) -> bool:
    """Whether a file's first bytes are the signature of a format in DECODE_FORMATS."""
    try:
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError:
        return False
    return (
        head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a"))
        or head.startswith((b"II*\x00", b"MM\x00*"))
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
        # "BM" alone is too common in text; also require a known BMP info-header size.
        or (
            head[:2] == b"BM"
            and int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
        )
    )


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, folders before their sub-folders, sorted by name.

    A file counts by its image extension, or, without one, by its first bytes (phones and
    browsers lose or mangle extensions: ``IMG_0001``, ``photo.jpg_large``); whether it really
    decodes is found out later and a bad one is skipped and listed. Hidden entries are ignored.
    Symlinked files and folders are followed; a folder reached a second time (a symlink loop, or
    two links to one folder) is skipped with an EdgeTransferWarning.
    """
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [Path(folder)]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            warnings.warn(
                f"cannot read folder {printable(str(d))} ({e.strerror}); skipped",
                EdgeTransferWarning,
                stacklevel=2,
            )
            continue
        if (st.st_dev, st.st_ino) in seen:
            warnings.warn(
                f"{printable(str(d))} leads to a folder already read (a symlink loop or a "
                "second link to it); skipped",
                EdgeTransferWarning,
                stacklevel=2,
            )
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for e in entries:
            if _hidden(e.name):
                continue
            p = Path(e.path)
            if _is_dir(e):
                subdirs.append(p)
            elif Path(e.name).suffix.lower() in IMAGE_EXTS or (_is_file(e) and sniff(p)):
                out.append(p)  # a dangling link with an image name fails to decode: listed
        stack.extend(reversed(subdirs))
    return out


def _is_dir(e: os.DirEntry) -> bool:
    try:
        return e.is_dir()  # follows symlinks
    except OSError:
        return False


def _is_file(e: os.DirEntry) -> bool:
    try:
        return e.is_file()
    except OSError:
        return False


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
            samples = _split(samples, val_fraction, seed, classes)
    else:
        classes = [p.name for p in _class_dirs(root)]
        samples = _split(_collect(root, classes, "train", root), val_fraction, seed, classes)
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


def _split(
    samples: list[Sample], val_fraction: float, seed: int, classes: Sequence[str] = ()
) -> list[Sample]:
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out = []
    for label in sorted(by_class):
        items = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction))) if val_fraction else 0
        if val_fraction and len(items) == 1:
            name = printable(classes[label]) if label < len(classes) else str(label)
            warnings.warn(
                f"class {name} has a single image: it trains on it and gets no validation "
                "image (add images to measure it)",
                EdgeTransferWarning,
                stacklevel=3,
            )
        out += [
            Sample(s.path, s.label, "val" if i < n_val else "train") for i, s in enumerate(items)
        ]
    return out


def decode_workers(samples: Sequence[Sample], workers: int | None) -> int:
    """The decoding threads for `samples` when `workers` (None: automatic) asks: one per core,
    up to MAX_DECODE_THREADS, from THREADED_MIN_IMAGES images on.

    Measured on 2 cores (tools/perf.py), with threads: extraction of 640x480 photos 1.4x faster
    with 2 than with none (decoding overlaps the backbone), and 12 MP JPEGs 7.5x faster than a
    plain decode against 4.5x for draft alone. Worker processes did worse on both (1.15x and
    5.7x there; 0.8x on 640x480 before decoding handed over uint8): each image crossed the
    process boundary pickled.
    """
    if workers is not None:
        return workers
    if len(samples) < THREADED_MIN_IMAGES:
        return 0  # a few images decode faster than the workers start
    return min(MAX_DECODE_THREADS, os.cpu_count() or 1)


def threaded_map(fn, count: int, threads: int, ahead: int):
    """fn(0), fn(1), ... fn(count - 1) computed by `threads` threads, yielded in order, at most
    `ahead` in flight.

    Pillow releases the GIL while it decodes and resizes, so threads decode in parallel without
    the pickling of every array that worker processes need.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
    try:
        todo = iter(range(count))
        flight = deque(pool.submit(fn, i) for i in itertools.islice(todo, ahead))
        while flight:
            yield flight.popleft().result()
            for i in itertools.islice(todo, 1):
                flight.append(pool.submit(fn, i))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def train_val(dataset: Dataset) -> tuple[list[Sample], list[Sample]]:
    """The training and validation samples adapt uses; every class must have training images
    and there must be validation images."""
    train_s, val_s = dataset.split("train"), dataset.split("val")
    missing = [c for i, c in enumerate(dataset.classes) if not any(s.label == i for s in train_s)]
    if missing:
        raise DataError(f"no readable training images for class(es): {', '.join(missing)}")
    if not val_s:
        raise DataError("no validation images; put at least 2 images in each class folder")
    return train_s, val_s


def check_bad(bad: Sequence[tuple[Path, str]], total: int, max_bad: float) -> None:
    """Refuse a run where more than `max_bad` of `total` images could not be read."""
    if bad and len(bad) > max_bad * total:
        first = "; ".join(r for _, r in bad[:3])
        raise DataError(
            f"{len(bad)} of {total} images could not be read (more than --max-bad "
            f"{max_bad:.0%}): {first}"
        )


def relabel(ds: Dataset, labels: Sequence[str]) -> Dataset:
    """The dataset with labels as indices into a model's `labels` (matched by class name), so
    golden vectors, calibration and the guard agree with the model whatever folder is given."""
    unknown = [c for c in ds.classes if c not in labels]
    if unknown:
        raise DataError(
            f"--data has classes the model does not know: {', '.join(unknown)} "
            f"(it knows {', '.join(labels)})"
        )
    index = [list(labels).index(c) for c in ds.classes]
    samples = [Sample(s.path, index[s.label], s.split) for s in ds.samples]
    return Dataset(ds.root, list(labels), samples)


def run_data_dir(run_dir: str | os.PathLike) -> Path | None:
    """The DATA_DIR a RUN_DIR was adapted on, if recorded and still there."""
    try:
        info = json.loads((Path(run_dir) / RUN_INFO).read_text())
        path = Path(info["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def run_split(data_dir: str | os.PathLike, manifest: Manifest) -> Dataset:
    """`data_dir` scanned and split as adapt split it: the manifest's val_fraction and seed."""
    return scan(
        data_dir,
        float(manifest.adapt.get("val_fraction", config.VAL_FRACTION)),
        int(manifest.adapt.get("seed", config.SEED)),
    )


@contextlib.contextmanager
def pillow_warnings_off() -> Iterator[None]:
    """Ignore warnings raised by Pillow's modules inside the block.

    The pixel limit is the policy, not Pillow's bomb warning; and its warnings about damaged
    metadata (EXIF, TIFF tags) say nothing a user can act on. Not thread-safe (no
    warnings.catch_warnings is): threads that decode call :func:`load_image` with
    ``quiet=False`` while the thread that started them holds this block.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        yield


def load_image(
    path: str | os.PathLike,
    max_pixels: int | None = None,
    draft: tuple[int, int] | None = None,
    quiet: bool = True,
) -> Image.Image:
    """Decode an image file to 8-bit RGB with EXIF orientation applied.

    The format is identified from the content, so a PNG named .jpg decodes. The size is checked
    from the header before any pixel is decoded, so a decompression bomb costs no memory.

    Args:
        max_pixels: refuse images with more pixels (default: :func:`current_max_pixels`). The
            limit applies to the full size, with or without `draft`.
        draft: (width, height) the caller needs at least. A JPEG is then decoded at the
            smallest DCT scale (1/2, 1/4 or 1/8) that keeps both sides at least this large:
            a 12-megapixel photo needed at 256 pixels decodes ~10x faster. The image comes out
            larger than `draft`, not equal to it; other formats ignore it. Pass a square
            (s, s) so the EXIF rotation applied afterwards cannot matter.
        quiet: silence Pillow's warnings here (see :func:`pillow_warnings_off`).

    Raises:
        DataError: for anything that is not a decodable image within the limits, including a
            truncated file (no partial images: Pillow's LOAD_TRUNCATED_IMAGES is not used).
    """
    path = Path(path)
    limit = max_pixels or current_max_pixels()
    name = printable(path.name)
    try:
        with (
            pillow_warnings_off() if quiet else contextlib.nullcontext(),
            _open_regular(path, name) as f,
        ):
            with Image.open(f, formats=DECODE_FORMATS) as im:
                w, h = im.size
                if w * h > limit:
                    raise DataError(
                        f"{name}: {w}x{h} exceeds --max-pixels {limit}; "
                        "pass a larger --max-pixels if the image is genuine"
                    )
                if min(w, h) < 1 or max(w, h) > MAX_ASPECT * min(w, h):
                    raise DataError(f"{name}: {w}x{h} is too elongated (over {MAX_ASPECT}:1)")
                if draft is not None and im.format == "JPEG":
                    # the DCT scaling averages blocks: a fair downsample, not a decimation
                    im.draft("RGB", draft)
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except DataError:
        raise
    except UnidentifiedImageError:  # Pillow's message would name the open file object
        raise DataError(
            f"{name}: not a readable image (cannot identify image file "
            f"{printable(os.fsdecode(path))!r})"
        ) from None
    except Image.DecompressionBombError as e:  # over twice Pillow's own MAX_IMAGE_PIXELS
        raise DataError(f"{name}: refused as a decompression bomb ({first_line(e)})") from None
    except Exception as e:
        # Pillow's decoders answer hostile bytes with many exception types (OSError,
        # SyntaxError, struct.error, IndexError, ...); all of them mean "not a usable image".
        raise DataError(f"{name}: not a readable image ({first_line(e)})") from None


def _open_regular(path: Path, name: str):
    """`path` opened for reading if it is a regular file, else DataError.

    Opened non-blocking and checked on the open descriptor: a FIFO named like an image would
    block the open (and the run) forever, and /dev/zero would be read without end. Checking
    the descriptor, not the name, leaves no gap for the file to be swapped in between.
    """
    try:
        # O_BINARY: Windows would otherwise translate line ends in the image bytes
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except OSError as e:
        raise DataError(f"{name}: not a readable image ({first_line(e)})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kinds = {stat.S_ISFIFO(mode): "a FIFO", stat.S_ISDIR(mode): "a folder"}
            kind = kinds.get(True, "a device or socket")
            raise DataError(f"{name}: not a regular file ({kind}); skipped")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited onto white.

    16/32-bit integer and float grayscale is stretched from its own min..max to 0..255 (not
    clipped, which would turn most 16-bit images white); NaN becomes the minimum.
    """
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        im = Image.fromarray(((a - lo) * scale).round().clip(0, 255).astype("uint8"), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def eval_transform(p: Preprocessing):
    """Resize shorter side, centre crop, to float, normalise: torchvision.transforms.v2."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Resize(p.resize, interpolation=interpolation_mode(p), antialias=True),
            v2.CenterCrop(list(p.input_size)),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(p.mean), list(p.std)),
        ]
    )


def interpolation_mode(p: Preprocessing):
    """torchvision's mode for `p.interpolation` (on PIL images, Pillow's own filter)."""
    from torchvision.transforms import v2

    return v2.InterpolationMode(p.interpolation)


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `shorter`, as torchvision does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def resize_crop(img: Image.Image, p: Preprocessing) -> Image.Image:
    """Resize the shorter side to ``p.resize`` (``p.interpolation``) and centre-crop
    ``p.input_size``."""
    w, h = resized_size(img.width, img.height, p.resize)
    if (w, h) != img.size:
        img = img.resize((w, h), _PIL_FILTERS[p.interpolation])
    ch, cw = p.input_size
    if w < cw or h < ch:  # torchvision pads before cropping; resize >= input_size prevents this
        raise EdgeTransferError(f"image of {w}x{h} after resize is smaller than the crop {cw}x{ch}")
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def normalize(pixels: np.ndarray, p: Preprocessing) -> np.ndarray:
    """uint8 HWC RGB pixels (or a NHWC batch) -> float32 CHW (NCHW), scaled to [0, 1] and
    normalised."""
    a = pixels.astype(np.float32) / np.float32(255.0)
    a = (a - np.asarray(p.mean, np.float32)) / np.asarray(p.std, np.float32)
    return np.ascontiguousarray(np.moveaxis(a, -1, -3))


def preprocess(img: Image.Image, p: Preprocessing) -> np.ndarray:
    """An RGB PIL image -> float32 CHW array, exactly like data.eval_transform."""
    return normalize(np.asarray(resize_crop(img, p)), p)


def softmax(x: np.ndarray) -> np.ndarray:
    """Probabilities along the last axis, shifted by the maximum so large logits do not overflow."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)
