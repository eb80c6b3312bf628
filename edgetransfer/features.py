"""Run the frozen backbone once over the dataset and cache the feature vectors on disk.

The frozen backbone only runs inference, so it runs on the fastest engine that answers like
eager PyTorch: onnxruntime (the backbone exported once and cached), else PyTorch. Images are
decoded by threads while the backbone runs, JPEGs at a reduced DCT scale when the
preprocessing only needs a smaller image.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import tempfile
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetransfer import config, onnxio
from edgetransfer.backbones import module_sha256
from edgetransfer.data import (
    Sample,
    current_max_pixels,
    decode_workers,
    eval_transform,
    load_image,
    pillow_warnings_off,
    threaded_map,
)
from edgetransfer.errors import DataError, EdgeTransferError, EdgeTransferWarning, first_line
from edgetransfer.fileio import (
    TMP_PREFIX,
    atomic_write_bytes,
    cache_dir,
    sha256_file,
    user_os_error,
)
from edgetransfer.loaders import apply_seeded, train_transform
from edgetransfer.manifest import Preprocessing
from edgetransfer.onnxio import open_session
from edgetransfer.parity import ATOL, RTOL
from edgetransfer.train import intra_op_threads

BACKENDS = config.BACKENDS
# Below this many images, "auto" stays on PyTorch unless the exported backbone is cached already:
# exporting and checking it (~0.5 s for mobilenet_v3_small) would cost more than it saves.
AUTO_MIN_IMAGES = 64
# Largest difference draft decoding may make to a normalised input tensor (mean/std units, so
# 0.25 is ~14 grey levels at ImageNet's std), measured on textured 12 MP photos as 0.07 max,
# 0.007 mean: the DCT downscale is a box filter where the plain path is bilinear+antialias.
DRAFT_MAX_DIFF = 0.25
# So draft decoding may change the top-1 only where the plain path scores a near tie: its top
# two logits within DRAFT_TIE. Measured: the shipped digits model's 0-4 head on the 200 sample
# digits 5-9 enlarged to 1024 or 2048 px JPEGs changes one answer, a tie 0.001 apart.
DRAFT_TIE = 0.01
# Augmentation presets whose first step resizes the shorter side to Preprocessing.resize, so a
# JPEG can be decoded at any scale that keeps that side (see data.load_image's `draft`).
_DRAFT_SAFE = ("none", "light")


@dataclass
class Features:
    """Feature vectors of the samples that decoded, and the ones that did not.

    `backend` says what produced the vectors: "torch", "onnxruntime" or "cache".
    """

    samples: list[Sample]
    vectors: torch.Tensor  # [N, D] float32, row i belongs to samples[i]
    bad: list[tuple[Path, str]]
    backend: str = field(default="torch", compare=False)


@dataclass(frozen=True)
class Decoding:
    """How each image becomes the backbone's input; all of it is part of the feature cache key."""

    p: Preprocessing
    augment: str = "none"  # augmentation preset ("none": the eval pipeline)
    view: int = 0  # which augmented copy: with `seed`, it seeds each image's augmentation
    seed: int = 0
    limit: int | None = None  # decoding limit in pixels (None: data.current_max_pixels())

    @property
    def draft(self) -> tuple[int, int] | None:
        """Only as large as the first resize needs: the shorter side at least `resize`."""
        return (self.p.resize, self.p.resize) if self.augment in _DRAFT_SAFE else None


def extract(
    backbone: nn.Module,
    samples: list[Sample],
    p: Preprocessing,
    *,
    backbone_id: str,
    batch_size: int = 32,
    use_cache: bool = True,
    max_pixels: int | None = None,
    progress: bool = False,
    augment: str = "none",
    view: int = 0,
    seed: int = 0,
    backend: str = "torch",
    workers: int | None = None,
) -> Features:
    """Feature vectors for `samples` through `backbone` in eval mode, from cache when possible.

    A cache entry is used only when it passes its content checks and CHECK_IMAGES of its rows,
    recomputed with `backbone`, match (see :class:`FeatureCache`); otherwise it is recomputed
    with one EdgeTransferWarning. A cache folder that cannot be written is warned about once
    and the run goes on without it.

    Args:
        backbone_id: identifies the backbone weights (e.g. their sha256) for the cache key.
        max_pixels: decoding limit per image (a decompression-bomb guard).
        progress: show a progress bar on stderr.
        augment: augmentation preset for this view ("none": the eval pipeline).
        view, seed: which augmented copy; together they seed each image's augmentation.
        backend: "torch"; "onnxruntime" (the backbone exported to ONNX once, cached, checked
            against eager; an EdgeTransferError when it cannot be); or "auto": onnxruntime
            when it is installed, the export passes its check and there are enough images to
            pay for the export, else torch (with an EdgeTransferWarning when the export failed).
        workers: threads decoding images (None: chosen by :func:`decode_workers` from the
            image count and the cores; 0: decode in the calling thread).
    """
    if backend not in BACKENDS:
        raise EdgeTransferError(
            f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
        )
    # The pixel limit decides which images are bad: a cache entry is only good for its limit.
    limit = max_pixels or current_max_pixels()
    pipeline = _Pipeline(samples, Decoding(p, augment, view, seed, limit))
    cache = FeatureCache(backbone, backbone_id, pipeline)
    backbone.eval()
    if use_cache and (hit := cache.read()) is not None:
        return hit
    options = ComputeOptions(backend, batch_size, workers, progress)
    out, engine = _compute(
        backbone, pipeline, backbone_id=backbone_id, options=options, probe_seed=cache.key
    )
    if use_cache:
        cache.write(out, engine)
    return out


@dataclass(frozen=True)
class ComputeOptions:
    """How the backbone runs over the images. None of it changes the vectors beyond the
    backends' agreement with eager PyTorch (see extract for each)."""

    backend: str = "torch"
    batch_size: int = 32
    workers: int | None = None
    progress: bool = False


def _compute(
    backbone: nn.Module,
    pipeline: _Pipeline,
    *,
    backbone_id: str,
    options: ComputeOptions,
    probe_seed: str,
) -> tuple[Features, dict[str, str]]:
    """(features of the pipeline's samples, what computed them for the cache entry's record).

    Images decode on threads while the backbone runs on the batch before.
    """
    samples = pipeline.samples

    def probe() -> torch.Tensor | None:
        # Images from anywhere in the dataset, not the first batch (often a single class);
        # seeded (by the cache key), so the same run makes the same engine choice every time.
        order = random.Random(probe_seed).sample(range(len(samples)), len(samples))
        return pipeline.decode(order)[1]

    run = _runner(
        backbone,
        pipeline.decoding.p,
        options.backend,
        backbone_id=backbone_id,
        n=len(samples),
        probe=probe,
    )
    good, bad = [], []
    # One [N, D] buffer filled in place. Keeping each batch's output instead pinned ~15 MiB per
    # batch of 32 (onnxruntime's output arrays, and heap fragmentation around them): peak RSS
    # then grew with the dataset (1.9 GiB at 2,000 images against 1.1 GiB this way).
    vectors = None
    batches = _decoded(
        pipeline, batch_size=options.batch_size, workers=options.workers, progress=options.progress
    )
    # closing(): on an error the decoding threads stop before the warning filters come back.
    with pillow_warnings_off(), contextlib.closing(batches):
        for indices, x, unreadable in batches:
            bad += [(samples[i].path, reason) for i, reason in unreadable]
            if x is not None:
                y = run(x)
                if vectors is None:
                    vectors = torch.empty(len(samples), y.shape[1])
                vectors[len(good) : len(good) + len(y)] = y
                good += [samples[i] for i in indices]
    if vectors is None:
        vectors = torch.zeros(0, 0)
    elif len(good) < len(vectors):
        vectors = vectors[: len(good)].clone()
    engine = {"engine": run.name}
    if run.session is not None:
        engine["onnx_sha256"] = run.onnx_sha256
    return Features(good, vectors, bad, run.name), engine


# ---------------------------------------------------------------------------------------------
# The feature cache: entries that carry their own checks

# Rows of a cache entry recomputed with the backbone before the entry is used, and images the
# exported ONNX backbone must match eager PyTorch on before it runs. Eight images cost one
# small eager batch (~0.1 s for mobilenet_v3_small at 224 px on 2 cores, plus decoding them).
CHECK_IMAGES = 8
_FORMAT = "edgetransfer-features-2"
# Longest reason for an unreadable image an entry may carry (they are printed to the terminal).
_MAX_REASON = 1000


class _Untrusted(Exception):
    """A cache entry or cached export failed a check; the message says which (one line)."""


def _vectors_sha256(vectors: torch.Tensor) -> str:
    return hashlib.sha256(np.ascontiguousarray(vectors.numpy())).hexdigest()


def _stamps_sha256(stamps: list[str]) -> str:
    return hashlib.sha256("".join(stamps).encode("utf-8", "surrogateescape")).hexdigest()


def _stamps(samples: list[Sample]) -> list[str]:
    """One line per sample that changes when its file changes (path, size, mtime)."""
    out = []
    for s in samples:
        try:
            st = s.path.stat()
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        out.append(f"{s.path.absolute()}\t{stamp}\n")
    return out


def _prefix(backbone_id: str, p: Preprocessing) -> str:
    return backbone_id + "\n" + json.dumps(p.to_dict(), sort_keys=True)


def _key(prefix: str, stamps: list[str]) -> str:
    h = hashlib.sha256(prefix.encode())
    for line in stamps:
        h.update(line.encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


# The clean (un-augmented) rows of the last extraction, by sample stamp: adapt extracts the whole
# dataset to find unreadable images, then asks again for the train and val splits; those are
# served from here instead of running the backbone twice. Only with use_cache (same contract as
# the disk cache: one backbone_id, one set of weights).
_recent: dict[str, dict[str, torch.Tensor | str]] = {}


class FeatureCache:
    """One extraction's entry in the feature cache: its key, and its features read back only
    when they pass their checks, written atomically.

    The key changes with the backbone id, the decoding (pixel limit, augmentation view and
    seed, preprocessing) and any image file (path, size, mtime). The clean rows of the last
    extraction are also kept in memory, so a subset of it is served without the disk.
    """

    def __init__(self, backbone: nn.Module, backbone_id: str, pipeline: _Pipeline) -> None:
        d = pipeline.decoding
        self.backbone, self.pipeline = backbone, pipeline
        seed = d.seed if d.augment != "none" else 0
        self.prefix = _prefix(f"{backbone_id}|{d.limit}|{d.augment}|{d.view}|{seed}", d.p)
        self.stamps = _stamps(pipeline.samples)
        self.key = _key(self.prefix, self.stamps)
        self.path = cache_dir() / "features" / f"{self.key}.safetensors"
        self.in_memory = d.augment == "none"  # an augmented view is asked for once per run

    @functools.cached_property
    def weights(self) -> str:
        """The backbone's sha256 (see module_sha256): an entry is bound to the weights that
        made it. Computed once per extraction, and only when the disk is used."""
        return module_sha256(self.backbone)

    def read(self) -> Features | None:
        """The cached features when they pass every check; None on a miss or (with one
        EdgeTransferWarning) when they do not."""
        if self.in_memory and (hit := self._recall()) is not None:
            return hit
        try:
            blob = self.path.read_bytes()
        except OSError:  # no entry (or an unreadable cache folder): a miss
            return None
        try:
            hit = self._checked(blob)
        except _Untrusted as e:
            warnings.warn(
                f"feature cache entry {self.path} not used ({e}); recomputing it",
                EdgeTransferWarning,
                stacklevel=3,  # extract's caller
            )
            return None
        if self.in_memory:
            self._remember(hit)
        return hit

    def write(self, f: Features, engine: dict[str, str]) -> None:
        """Save `f` with the metadata :meth:`read` checks; `engine` records what computed it."""
        from safetensors.torch import save

        good_set = set(f.samples)
        keep = torch.tensor([s in good_set for s in self.pipeline.samples], dtype=torch.uint8)
        bad_json = json.dumps([(str(b), r) for b, r in f.bad]).encode()
        vectors = f.vectors.contiguous()
        meta = {
            "format": _FORMAT,
            "key": self.key,
            "stamps_sha256": _stamps_sha256(self.stamps),
            "backbone_sha256": self.weights,
            "shape": json.dumps(list(vectors.shape)),
            "dtype": "float32",
            "vectors_sha256": _vectors_sha256(vectors),
            **engine,
        }
        blob = save(
            {
                "vectors": vectors,
                "keep": keep,
                "bad": torch.tensor(list(bad_json), dtype=torch.uint8),
            },
            metadata=meta,
        )
        _cache_write(self.path, blob)
        if self.in_memory:
            self._remember(f)

    def _checked(self, blob: bytes) -> Features:
        """The entry's features, or _Untrusted naming the first check that failed.

        The metadata binds the entry to its key, samples and backbone weights, and the vectors to
        their shape, dtype and sha256: that catches damage (truncation, a half-written or edited
        file, an entry copied from elsewhere). It cannot catch a deliberate edit, since whoever can
        rewrite the vectors can rewrite their hash in the same folder, and so can rewrite a
        sidecar. What it cannot fake is the backbone: CHECK_IMAGES rows, chosen afresh at random
        on every read, are recomputed with the eager backbone and must match. Zeroed, shuffled or
        foreign vectors (such as ones a lying ONNX backbone produced) fail it for any row they
        touch; a few tampered rows out of many can slip through one read, which is why verify
        also checks the trained model's top-1 against the images themselves.
        """
        from safetensors.torch import load

        samples = self.pipeline.samples
        meta = _metadata(blob)
        if meta.get("format") != _FORMAT:
            raise _Untrusted("no content checks: written by an older version or another tool")
        if meta.get("key") != self.key or meta.get("stamps_sha256") != _stamps_sha256(self.stamps):
            raise _Untrusted("written for other images")
        if meta.get("backbone_sha256") != self.weights:
            raise _Untrusted("made by other backbone weights")
        try:
            tensors = load(blob)
            keep, vectors, bad_bytes = tensors["keep"], tensors["vectors"], tensors["bad"]
        except Exception as e:  # safetensors raises its own types for a damaged file
            raise _Untrusted(f"unreadable: {first_line(e)}") from None
        if keep.dtype != torch.uint8 or keep.shape != (len(samples),) or bool((keep > 1).any()):
            raise _Untrusted(f"its sample mask is not {len(samples)} zeros and ones")
        rows = int(keep.sum())
        if vectors.dtype != torch.float32:
            raise _Untrusted(
                f"vectors are {str(vectors.dtype).removeprefix('torch.')}, not float32"
            )
        if vectors.dim() != 2 or len(vectors) != rows or (rows and vectors.shape[1] == 0):
            raise _Untrusted(f"vectors have shape {tuple(vectors.shape)} for {rows} images")
        if meta.get("shape") != json.dumps(list(vectors.shape)) or meta.get("dtype") != "float32":
            raise _Untrusted("vectors differ from the recorded shape")
        if not bool(torch.isfinite(vectors).all()):
            raise _Untrusted("vectors are not all finite")
        if _vectors_sha256(vectors) != meta.get("vectors_sha256"):
            raise _Untrusted("vectors differ from their recorded sha256")
        kept = [i for i, k in enumerate(keep.tolist()) if k]
        bad = _bad_list(bad_bytes, [samples[i].path for i, k in enumerate(keep.tolist()) if not k])
        if kept:
            chosen = random.SystemRandom().sample(range(rows), min(CHECK_IMAGES, rows))
            indices, x, failed = self.pipeline.decode([kept[j] for j in chosen], stop=len(chosen))
            if failed:
                raise _Untrusted(f"{samples[failed[0]].path.name} no longer decodes")
            # One thread: for a check batch this small, two waiting on each other for a busy
            # machine's cores took 90 ms where one took 4 (simple_cnn, 8 images).
            want = _eager(self.backbone, x, threads=1)
            problem = _difference(vectors[chosen], want, "cached vectors")
            if problem:
                raise _Untrusted(f"{problem} on {len(chosen)} rows recomputed now")
        return Features([samples[i] for i in kept], vectors, bad, "cache")

    def _recall(self) -> Features | None:
        rows = _recent.get(self.prefix)
        if rows is None or not all(s in rows for s in self.stamps):
            return None
        good, vecs, bad = [], [], []
        for sample, stamp in zip(self.pipeline.samples, self.stamps, strict=True):
            row = rows[stamp]
            if isinstance(row, str):
                bad.append((sample.path, row))
            else:
                good.append(sample)
                vecs.append(row)
        vectors = torch.stack(vecs) if vecs else torch.zeros(0, 0)
        return Features(good, vectors, bad, "cache")

    def _remember(self, f: Features) -> None:
        reasons = {b: r for b, r in f.bad}
        rows: dict[str, torch.Tensor | str] = {}
        it = iter(f.vectors)
        for sample, stamp in zip(self.pipeline.samples, self.stamps, strict=True):
            rows[stamp] = reasons[sample.path] if sample.path in reasons else next(it)
        _recent.clear()
        _recent[self.prefix] = rows


def _metadata(blob: bytes) -> dict:
    """The string metadata of a safetensors file (its JSON header's __metadata__)."""
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else -1
    if n < 2 or n > len(blob) - 8:
        raise _Untrusted("truncated or not a safetensors file")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError:
        raise _Untrusted("not a safetensors file") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _bad_list(raw: torch.Tensor, want: list[Path]) -> list[tuple[Path, str]]:
    """The entry's unreadable images: exactly the samples it has no vector for, with reasons
    that are one printable line each."""
    try:
        bad = json.loads(bytes(raw.tolist()).decode())
        pairs = [(Path(b), r) for b, r in bad]
    except (ValueError, TypeError):
        raise _Untrusted("its list of unreadable images is damaged") from None
    ok = [b for b, _ in pairs] == want and all(
        isinstance(r, str) and r.isprintable() and len(r) <= _MAX_REASON for _, r in pairs
    )
    if not ok:
        raise _Untrusted("its list of unreadable images does not match the images")
    return pairs


_warned_unwritable: set[str] = set()


def _cache_write(path: Path, blob: bytes) -> bool:
    """Write a cache file atomically; a folder that cannot be written (full disk, read-only,
    not a folder) is warned about once per process and the run goes on without the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, blob)
        return True
    except OSError as e:
        root = str(cache_dir())
        if root not in _warned_unwritable:
            _warned_unwritable.add(root)
            reason = e.strerror or type(e).__name__
            warnings.warn(
                f"cache folder {root} cannot be written ({reason}); going on without the cache",
                EdgeTransferWarning,
                stacklevel=3,
            )
        return False


# ---------------------------------------------------------------------------------------------
# Decoding: (index, tensor or None, reason) per sample, so unreadable files travel as data


class _Decode:
    """Decodes sample i. Pillow's warnings are silenced by the caller around the whole pass
    (data.pillow_warnings_off): threads cannot each change the process-wide filters."""

    def __init__(self, samples: list[Sample], transform, d: Decoding) -> None:
        self.samples, self.transform, self.augment = samples, transform, d.augment
        self.max_pixels, self.draft = d.limit, d.draft

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.samples[i].path, self.max_pixels, draft=self.draft, quiet=False)
        except DataError as e:
            return i, None, str(e)
        return i, self.transform(img) if self.augment == "none" else self.transform(img, i), None


def _split_transform(d: Decoding):
    """(per image, per batch) parts of the pipeline.

    For the eval pipeline, decoding threads only resize and crop (Pillow, which releases the
    GIL) and hand over HWC uint8 arrays; the batch is then laid out as NCHW by numpy and
    converted and normalised by the pipeline's own steps, once per batch. The same element-wise
    ops, so the same numbers, but a quarter of the bytes per image, and no per-image torch
    copies: torch's uint8 HWC->CHW copy took 8 ms per 224 px image here, numpy's 0.3 ms.
    """
    from torchvision.transforms import v2

    if d.augment != "none":
        return _seeded(train_transform(d.p, d.augment), d.seed, d.view), None
    steps = eval_transform(d.p).transforms
    k = next(i for i, t in enumerate(steps) if isinstance(t, v2.ToImage))
    pil_steps, tensor_steps = v2.Compose(steps[:k]), v2.Compose(steps[k + 1 :])

    def per_image(img):
        return np.asarray(pil_steps(img))

    def per_batch(arrays: list) -> torch.Tensor:
        hwc = np.stack(arrays)
        # One thread: 4 element-wise passes; with two, torch's threads waiting for a core
        # (onnxruntime and the decoding threads hold them) made a batch 74 ms instead of 26.
        with intra_op_threads(1):
            return tensor_steps(torch.from_numpy(np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))))

    return per_image, per_batch


@dataclass
class _Pipeline:
    """The samples and how they decode: extraction's batches (:func:`_decoded`) and the few
    images of the checks against eager PyTorch (:meth:`decode`) come out of the same transform,
    draft decoding and per-image augmentation seeds."""

    samples: list[Sample]
    decoding: Decoding

    def decode(
        self, order: list[int], stop: int = CHECK_IMAGES
    ) -> tuple[list[int], torch.Tensor | None, list[int]]:
        """(decoded indices, their batch or None, indices that failed), in `order` until
        `stop` images decoded."""
        per_image, per_batch = _split_transform(self.decoding)
        data = _Decode(self.samples, per_image, self.decoding)
        good, xs, failed = [], [], []
        with pillow_warnings_off():
            for i in order:
                _, x, _ = data[i]
                if x is None:
                    failed.append(i)
                    continue
                good.append(i)
                xs.append(x)
                if len(xs) == stop:
                    break
        if not xs:
            return good, None, failed
        return good, per_batch(xs) if per_batch else torch.stack(xs), failed


def _decoded(pipeline: _Pipeline, *, batch_size: int, workers: int | None, progress: bool):
    """The pipeline's samples in batches, in sample order: (indices of the decoded samples, their
    [B, C, H, W] inputs or None, [(index, reason)] of the unreadable ones).

    Args:
        workers: decoding threads (see :func:`decode_workers`).
        progress: show a progress bar on stderr.
    """
    from tqdm import tqdm

    samples = pipeline.samples
    per_image, per_batch = _split_transform(pipeline.decoding)
    n = decode_workers(samples, workers)
    data = _Decode(samples, per_image, pipeline.decoding)
    # Two batches in flight: the next one decodes while the backbone runs on this one.
    items = (
        threaded_map(data.__getitem__, len(data), n, 2 * batch_size)
        if n
        else map(data.__getitem__, range(len(data)))
    )
    bar = tqdm(total=len(samples), desc="features", unit="img", disable=not progress, leave=False)
    pending: list = []

    def batch(items):
        good = [i for i, x, _ in items if x is not None]
        bad = [(i, reason) for i, x, reason in items if x is None]
        xs = [x for _, x, _ in items if x is not None]
        x = None if not xs else per_batch(xs) if per_batch else torch.stack(xs)
        return good, x, bad

    with bar:
        for item in items:
            pending.append(item)
            bar.update(1)
            if len(pending) == batch_size:
                yield batch(pending)
                pending = []
        if pending:
            yield batch(pending)


_RNG = threading.Lock()  # torch's global generator, which the random transforms draw from


def _seeded(transform, seed: int, view: int):
    """Apply `transform` with the same seeding as loaders.ImageBatches (view = epoch).

    One transform at a time: they all seed and draw from torch's global generator, so two
    decoding threads interleaving would swap each other's random numbers.
    """

    def run(img, index: int):
        with _RNG:
            return apply_seeded(transform, img, seed, view, index)

    return run


# ---------------------------------------------------------------------------------------------
# Backends


def _eager(backbone: nn.Module, x: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    with torch.inference_mode(), intra_op_threads(threads):
        return backbone(x).float()


class _Runner:
    """Batch -> [B, D] float32 features, on the engine named by `name`.

    An onnxruntime session is trusted only after :meth:`check`: it must match eager PyTorch on
    CHECK_IMAGES real images (extract passes images drawn from the whole dataset; without them
    the first batch's are used). Real images, not random tensors: random inputs drive some
    backbones far outside the range their BatchNorm statistics describe, where float rounding
    alone exceeds any sane tolerance.
    """

    def __init__(
        self,
        backbone: nn.Module,
        session=None,
        *,
        p: Preprocessing | None = None,
        path: Path | None = None,
        cached: bool = False,
        onnx_sha256: str = "",
        strict: bool = False,
    ) -> None:
        self.backbone, self.session, self.p, self.path = backbone, session, p, path
        self.cached, self.onnx_sha256, self.strict = cached, onnx_sha256, strict
        self.name = "onnxruntime" if session is not None else "torch"
        self.checked = session is None

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        return _eager(self.backbone, x)

    def ort(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        return torch.from_numpy(self.session.run(None, {name: x.numpy()})[0]).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.checked:
            self.check(x[:CHECK_IMAGES])
        return self.eager(x) if self.session is None else self.ort(x)

    def check(self, x: torch.Tensor | None) -> None:
        """Keep the session only if it matches eager on `x`. A cached export that does not (a
        stale or tampered file) is exported again once; one that still differs is remembered
        as failed and extraction runs on PyTorch."""
        if self.session is None:
            self.checked = True
            return
        if x is None:  # no image decodes: checked on the first batch, should one come
            return
        self.checked = True
        # One thread, and before onnxruntime runs: torch's threads waiting on onnxruntime's
        # for a core made this check take 0.02-2 s on a busy 2-core machine.
        want = _eager(self.backbone, x, threads=1)
        problem = _difference(self.ort(x), want, "the ONNX backbone")
        if problem and self.cached:
            _forget(self.path)
            try:
                self.session, self.onnx_sha256 = _export_session(self.backbone, self.p, self.path)
                self.cached = False
                again = _difference(self.ort(x), want, "the ONNX backbone")
            except EdgeTransferError as e:
                again = str(e)
            if again is None:
                warnings.warn(
                    f"the cached ONNX backbone {self.path} answered differently from eager "
                    f"PyTorch ({problem}); replaced it with a fresh export",
                    EdgeTransferWarning,
                    stacklevel=5,
                )
                return
            problem = again
        if problem:
            _cache_write(self.path.with_suffix(".failed"), (problem + "\n").encode())
            _forget(self.path)
            self._fall_back(problem)

    def _fall_back(self, problem: str) -> None:
        if self.strict:
            raise EdgeTransferError(f"backend onnxruntime: {problem}")
        warnings.warn(
            f"feature extraction runs on PyTorch: {problem}", EdgeTransferWarning, stacklevel=5
        )
        self.session, self.name = None, "torch"


def _difference(got: torch.Tensor, want: torch.Tensor, what: str) -> str | None:
    """None when `got` matches `want` within verify.py's fp32 tolerance, else what differs."""
    if got.shape != want.shape:
        return f"{what} gives shape {tuple(got.shape)}, eager {tuple(want.shape)}"
    err = (got - want).abs()
    if bool((err <= ATOL + RTOL * want.abs()).all()):
        return None
    return f"{what} differs from eager PyTorch (max |diff| {float(err.max()):.3g})"


def _runner(
    backbone: nn.Module,
    p: Preprocessing,
    backend: str,
    backbone_id: str,
    n: int,
    probe: Callable[[], torch.Tensor | None] | None = None,
) -> _Runner:
    """The engine for `backend`; an onnxruntime one checked on `probe()` images (when given;
    else on its first batch)."""
    if backend == "torch":
        return _Runner(backbone)
    strict = backend == "onnxruntime"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if strict:
            raise EdgeTransferError("backend onnxruntime: onnxruntime is not installed") from None
        return _Runner(backbone)
    path = onnx_backbone_path(backbone, p, backbone_id)
    failed = path.with_suffix(".failed")
    if backend == "auto" and n < AUTO_MIN_IMAGES and not _is_file(path):
        return _Runner(backbone)
    try:
        if (reason := _remembered_failure(failed)) is not None:
            raise EdgeTransferError(f"{reason} (remembered from an earlier run)")
        session, cached, sha = _onnx_session(backbone, p, path, failed)
    except EdgeTransferError as e:
        runner = _Runner(backbone, strict=strict)
        runner._fall_back(str(e))
        return runner
    runner = _Runner(
        backbone, session, p=p, path=path, cached=cached, onnx_sha256=sha, strict=strict
    )
    if probe is not None:
        runner.check(probe())
    return runner


# ---------------------------------------------------------------------------------------------
# The exported backbone's cache: one ONNX file per backbone (id, structure, weights, input
# size), reopened only when its sha256 is the one recorded at export; a backbone that does not
# export is remembered (`.failed`) so later runs do not try again


def onnx_backbone_path(backbone: nn.Module, p: Preprocessing, backbone_id: str) -> Path:
    """Where the exported backbone is cached: keyed by its id, structure, weights and input size.

    The weights are hashed too: an id such as "arch:none|seed" does not pin them on its own.
    """
    h = hashlib.sha256(f"{backbone_id}\n{tuple(p.input_size)}\n{torch.__version__}\n".encode())
    h.update(module_sha256(backbone).encode())
    return cache_dir() / "backbones" / f"{h.hexdigest()[:32]}.onnx"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a cache folder we may not enter
        return False


def _remembered_failure(failed: Path) -> str | None:
    """Why an earlier run could not export or trust the backbone (first line of `failed`), or
    None when nothing is remembered (or the record cannot be read: then it is tried again)."""
    if not _is_file(failed):
        return None
    try:
        lines = failed.read_text(errors="replace").strip().splitlines()
    except OSError:
        return None
    return (lines or ["the ONNX export failed"])[0][:300]


def _forget(path: Path) -> None:
    """Remove a cached export and its recorded sha256 (best effort)."""
    for p in (path, path.with_suffix(".sha256")):
        with contextlib.suppress(OSError):
            p.unlink(missing_ok=True)


def _onnx_session(backbone: nn.Module, p: Preprocessing, path: Path, failed: Path):
    """(session, from the cache?, sha256 of the ONNX file) for the backbone: the cached export
    when its sha256 is the one recorded at export, else a new export.

    A backbone that does not export is remembered (`failed`) so later runs do not try again.
    """
    if _is_file(path):
        try:
            sha = sha256_file(path)
            recorded = path.with_suffix(".sha256").read_text().strip()
        except OSError:  # no record (an older cache): exported again, silently
            recorded = sha = ""
        if sha and sha == recorded:
            try:
                return open_session(path), True, sha
            except EdgeTransferError:
                pass  # a damaged cache entry is exported again
        elif recorded:
            warnings.warn(
                f"the cached ONNX backbone {path} changed after it was exported (its sha256 is "
                "not the recorded one); exporting it again",
                EdgeTransferWarning,
                stacklevel=5,
            )
        _forget(path)
    try:
        session, sha = _export_session(backbone, p, path)
    except EdgeTransferError as e:
        if not isinstance(e.__cause__, OSError):  # a full temp folder is not the backbone's fault
            _cache_write(failed, (str(e) + "\n").encode())
        raise
    return session, False, sha


def _export_session(backbone: nn.Module, p: Preprocessing, path: Path):
    """Export the backbone into a temp folder, open it, and cache it at `path` with its sha256
    beside it: (session, sha256). The session does not depend on the cache being writable."""
    with _scratch(path.parent) as tmp:
        out = Path(tmp) / "backbone.onnx"
        _export_backbone(backbone, p, out)
        session = open_session(out)
        blob = out.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    # the record second: a reader that finds the record finds the file it describes
    if _cache_write(path, blob):
        _cache_write(path.with_suffix(".sha256"), (sha + "\n").encode())
    return session, sha


def _scratch(folder: Path) -> tempfile.TemporaryDirectory:
    """A temp folder in the cache folder (left there by a killed run, it is removed by the next
    cache write), else in the system's temp folder when the cache cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=folder)
    except OSError:
        return tempfile.TemporaryDirectory(prefix="edgetransfer-backbone-")


def _export_backbone(backbone: nn.Module, p: Preprocessing, path: Path) -> None:
    """ONNX with a dynamic batch: the TorchScript exporter first (10x quicker to export than
    dynamo here, and its graph ran faster under onnxruntime), dynamo when that fails."""
    example = torch.randn(2, 3, *p.input_size, generator=torch.Generator().manual_seed(0))
    errors = []
    cause = None
    for exporter in ("torchscript", "dynamo"):
        try:
            onnxio.torch_onnx_export(
                backbone,
                example,
                path,
                exporter=exporter,
                opset=None,
                input_name="input",
                output_names=["features"],
            )
            return
        except Exception as e:  # exporter failures come in many types
            errors.append(f"{exporter}: {first_line(e)}")
            # exporters wrap a full disk in their own types: keep it as the cause, so the
            # failure is not remembered as the backbone's
            cause = user_os_error(e) or cause
    raise EdgeTransferError(
        "the backbone does not export to ONNX (" + "; ".join(errors) + ")"
    ) from cause
