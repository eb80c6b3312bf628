"""Run the frozen backbone once over the dataset and cache the feature vectors on disk.

The frozen backbone only runs inference, so it runs on the fastest engine that answers like
eager PyTorch: onnxruntime (the backbone exported once and cached), else PyTorch. Images are
decoded by threads while the backbone runs, JPEGs at a reduced DCT scale when the
preprocessing only needs a smaller image.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetransfer.data import Sample, load_image, pillow_warnings_off
from edgetransfer.errors import DataError, EdgeTransferError, EdgeTransferWarning
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import Preprocessing

BACKENDS = ("auto", "torch", "onnxruntime")
# Below this many images, "auto" stays on PyTorch unless the exported backbone is cached already:
# exporting and checking it (~0.5 s for mobilenet_v3_small) would cost more than it saves.
AUTO_MIN_IMAGES = 64
# Decoding workers when none are asked for (see decode_workers).
AUTO_MAX_WORKERS = 4
# Largest difference draft decoding may make to a normalised input tensor (mean/std units, so
# 0.25 is ~14 grey levels at ImageNet's std), measured on textured 12 MP photos as 0.07 max,
# 0.007 mean: the DCT downscale is a box filter where the plain path is bilinear+antialias.
DRAFT_MAX_DIFF = 0.25
# Augmentation presets whose first step resizes the shorter side to Preprocessing.resize, so a
# JPEG can be decoded at any scale that keeps that side (see data.load_image's `draft`).
_DRAFT_SAFE = ("none", "light")


def cache_dir() -> Path:
    """``$EDGETRANSFER_CACHE`` or ``$XDG_CACHE_HOME/edgetransfer`` (``~/.cache/edgetransfer``)."""
    if os.environ.get("EDGETRANSFER_CACHE"):
        return Path(os.environ["EDGETRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetransfer"


@dataclass
class Features:
    """Feature vectors of the samples that decoded, and the ones that did not.

    `backend` says what produced the vectors: "torch", "onnxruntime" or "cache".
    """

    samples: list[Sample]
    vectors: torch.Tensor  # [N, D] float32, row i belongs to samples[i]
    bad: list[tuple[Path, str]]
    backend: str = field(default="torch", compare=False)


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


def cache_key(backbone_id: str, p: Preprocessing, samples: list[Sample]) -> str:
    """Changes when the backbone weights, preprocessing or any image file changes."""
    return _key(_prefix(backbone_id, p), _stamps(samples))


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


def _from_recent(prefix: str, samples: list[Sample], stamps: list[str]) -> Features | None:
    rows = _recent.get(prefix)
    if rows is None or not all(s in rows for s in stamps):
        return None
    good, vecs, bad = [], [], []
    for sample, stamp in zip(samples, stamps, strict=True):
        row = rows[stamp]
        if isinstance(row, str):
            bad.append((sample.path, row))
        else:
            good.append(sample)
            vecs.append(row)
    vectors = torch.stack(vecs) if vecs else torch.zeros(0, 0)
    return Features(good, vectors, bad, "cache")


def _remember(prefix: str, samples: list[Sample], stamps: list[str], f: Features) -> None:
    reasons = {b: r for b, r in f.bad}
    rows: dict[str, torch.Tensor | str] = {}
    it = iter(f.vectors)
    for sample, stamp in zip(samples, stamps, strict=True):
        rows[stamp] = reasons[sample.path] if sample.path in reasons else next(it)
    _recent.clear()
    _recent[prefix] = rows


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
    from safetensors.torch import load, save

    from edgetransfer.data import current_max_pixels

    if backend not in BACKENDS:
        raise EdgeTransferError(
            f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
        )
    # The pixel limit decides which images are bad: a cache entry is only good for its limit.
    limit = max_pixels or current_max_pixels()
    prefix = _prefix(
        f"{backbone_id}|{limit}|{augment}|{view}|{seed if augment != 'none' else 0}", p
    )
    stamps = _stamps(samples)
    path = cache_dir() / "features" / f"{_key(prefix, stamps)}.safetensors"
    if use_cache:
        if augment == "none" and (hit := _from_recent(prefix, samples, stamps)) is not None:
            return hit
        if path.is_file():
            try:
                cached = load(path.read_bytes())
                keep = cached["keep"].bool().tolist()
                bad = json.loads(bytes(cached["bad"].tolist()).decode()) if "bad" in cached else []
                if len(keep) == len(samples):
                    out = Features(
                        [s for s, k in zip(samples, keep, strict=True) if k],
                        cached["vectors"],
                        [(Path(b), r) for b, r in bad],
                        "cache",
                    )
                    if augment == "none":
                        _remember(prefix, samples, stamps, out)
                    return out
            except Exception:  # a damaged cache entry is recomputed, never trusted
                pass

    backbone.eval()
    run = _runner(backbone, p, backend, backbone_id, len(samples))
    good, bad = [], []
    # One [N, D] buffer filled in place. Keeping each batch's output instead pinned ~15 MiB per
    # batch of 32 (onnxruntime's output arrays, and heap fragmentation around them): peak RSS
    # then grew with the dataset (1.9 GiB at 2,000 images against 1.1 GiB this way).
    vectors = None
    batches = _decoded(samples, p, augment, view, seed, limit, batch_size, workers, progress)
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
    out = Features(good, vectors, bad, run.name)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        good_set = set(good)
        keep = torch.tensor([s in good_set for s in samples], dtype=torch.uint8)
        bad_json = json.dumps([(str(b), r) for b, r in bad]).encode()
        blob = save(
            {
                "vectors": vectors.contiguous(),
                "keep": keep,
                "bad": torch.tensor(list(bad_json), dtype=torch.uint8),
            }
        )
        atomic_write_bytes(path, blob)
        if augment == "none":
            _remember(prefix, samples, stamps, out)
    return out


# ---------------------------------------------------------------------------------------------
# Decoding: (index, tensor or None, reason) per sample, so unreadable files travel as data


class _Decode:
    """Decodes sample i. Pillow's warnings are silenced by the caller around the whole pass
    (data.pillow_warnings_off): threads cannot each change the process-wide filters."""

    def __init__(self, samples, transform, augment, max_pixels, draft) -> None:
        self.samples, self.transform, self.augment = samples, transform, augment
        self.max_pixels, self.draft = max_pixels, draft

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            img = load_image(self.samples[i].path, self.max_pixels, draft=self.draft, quiet=False)
        except DataError as e:
            return i, None, str(e)
        return i, self.transform(img) if self.augment == "none" else self.transform(img, i), None


def decode_workers(samples: list[Sample], workers: int | None) -> int:
    """The decoding threads extract uses for `samples` (see its `workers`): one per core, up
    to AUTO_MAX_WORKERS, from AUTO_MIN_IMAGES images on.

    Measured on 2 cores (tools/perf.py), with threads: extraction of 640x480 photos 1.4x faster
    with 2 than with none (decoding overlaps the backbone), and 12 MP JPEGs 7.5x faster than a
    plain decode against 4.5x for draft alone. Worker processes did worse on both (1.15x and
    5.7x there; 0.8x on 640x480 before decoding handed over uint8): each image crossed the
    process boundary pickled.
    """
    if workers is not None:
        return workers
    if len(samples) < AUTO_MIN_IMAGES:
        return 0  # a few images decode faster than the workers start
    return min(AUTO_MAX_WORKERS, os.cpu_count() or 1)


def _split_transform(p: Preprocessing, augment: str, seed: int, view: int):
    """(per image, per batch) parts of the pipeline.

    For the eval pipeline, decoding threads only resize and crop (Pillow, which releases the
    GIL) and hand over HWC uint8 arrays; the batch is then laid out as NCHW by numpy and
    converted and normalised by the pipeline's own steps, once per batch. The same element-wise
    ops, so the same numbers, but a quarter of the bytes per image, and no per-image torch
    copies: torch's uint8 HWC->CHW copy took 8 ms per 224 px image here, numpy's 0.3 ms.
    """
    from torchvision.transforms import v2

    from edgetransfer.data import eval_transform
    from edgetransfer.train import intra_op_threads

    if augment != "none":
        from edgetransfer.loaders import train_transform

        return _seeded(train_transform(p, augment), seed, view), None
    steps = eval_transform(p).transforms
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


def _decoded(samples, p, augment, view, seed, limit, batch_size, workers, progress):
    """Batches in sample order: (indices of the decoded samples, their [B, C, H, W] inputs or
    None, [(index, reason)] of the unreadable ones)."""
    from tqdm import tqdm

    per_image, per_batch = _split_transform(p, augment, seed, view)
    # Only as large as the first resize needs: the shorter side at least `resize`.
    draft = (p.resize, p.resize) if augment in _DRAFT_SAFE else None
    n = decode_workers(samples, workers)
    data = _Decode(samples, per_image, augment, limit, draft)
    # Two batches in flight: the next one decodes while the backbone runs on this one.
    items = _threaded(data, n, 2 * batch_size) if n else map(data.__getitem__, range(len(data)))
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


def _threaded(data: _Decode, n: int, ahead: int):
    """data[0], data[1], ... decoded by `n` threads, in order, at most `ahead` in flight.

    Pillow releases the GIL while it decodes and resizes, so threads decode in parallel without
    the pickling of every tensor that worker processes need.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(n, thread_name_prefix="decode")
    try:
        todo = iter(range(len(data)))
        flight = deque(pool.submit(data.__getitem__, i) for i in itertools.islice(todo, ahead))
        while flight:
            yield flight.popleft().result()
            for i in itertools.islice(todo, 1):
                flight.append(pool.submit(data.__getitem__, i))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_RNG = threading.Lock()  # torch's global generator, which the random transforms draw from


def _seeded(transform, seed: int, view: int):
    """Apply `transform` with the same seeding as loaders.ImageBatches (view = epoch).

    One transform at a time: they all seed and draw from torch's global generator, so two
    decoding threads interleaving would swap each other's random numbers.
    """

    from edgetransfer.loaders import apply_seeded

    def run(img, index: int):
        with _RNG:
            return apply_seeded(transform, img, seed, view, index)

    return run


# ---------------------------------------------------------------------------------------------
# Backends

CHECK_IMAGES = 2  # images of the first batch run through both engines to compare them


class _Runner:
    """Batch -> [B, D] float32 features, on the engine named by `name`.

    On onnxruntime, the first batch is also run eagerly (its first CHECK_IMAGES images) and the
    two must agree within the fp32 tolerance, or extraction goes on in PyTorch. Real images,
    not random tensors: random inputs drive some backbones far outside the range their
    BatchNorm statistics describe, where float rounding alone exceeds any sane tolerance.
    """

    def __init__(
        self, backbone: nn.Module, session=None, failed: Path | None = None, strict: bool = False
    ) -> None:
        self.backbone, self.session, self.failed, self.strict = backbone, session, failed, strict
        self.name = "onnxruntime" if session is not None else "torch"
        self.checked = session is None

    def eager(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.backbone(x).float()

    def ort(self, x: torch.Tensor) -> torch.Tensor:
        name = self.session.get_inputs()[0].name
        return torch.from_numpy(self.session.run(None, {name: x.numpy()})[0]).float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            return self.eager(x)
        got = self.ort(x)
        if not self.checked:
            from edgetransfer.train import intra_op_threads

            self.checked = True
            # One thread: two images gain nothing from two, and torch's threads waiting on
            # onnxruntime's for a core made this check take 0.02-2 s on a busy 2-core machine.
            with intra_op_threads(1):
                want = self.eager(x[:CHECK_IMAGES])
            problem = _difference(got[:CHECK_IMAGES], want)
            if problem:
                self.failed.parent.mkdir(parents=True, exist_ok=True)
                self.failed.write_text(problem + "\n")
                self.failed.with_suffix(".onnx").unlink(missing_ok=True)
                self._fall_back(problem)
                return self.eager(x)
        return got

    def _fall_back(self, problem: str) -> None:
        if self.strict:
            raise EdgeTransferError(f"backend onnxruntime: {problem}")
        warnings.warn(
            f"feature extraction runs on PyTorch: {problem}", EdgeTransferWarning, stacklevel=4
        )
        self.session, self.name = None, "torch"


def _difference(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """None when `got` matches `want` within verify.py's fp32 tolerance, else what differs."""
    from edgetransfer.verify import ATOL, RTOL

    if got.shape != want.shape:
        return f"the ONNX backbone gives shape {tuple(got.shape)}, eager {tuple(want.shape)}"
    err = (got - want).abs()
    if bool((err <= ATOL + RTOL * want.abs()).all()):
        return None
    return f"the ONNX backbone differs from eager PyTorch (max |diff| {float(err.max()):.3g})"


def _runner(
    backbone: nn.Module, p: Preprocessing, backend: str, backbone_id: str, n: int
) -> _Runner:
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
    if backend == "auto" and n < AUTO_MIN_IMAGES and not path.is_file():
        return _Runner(backbone)
    try:
        if failed.is_file():
            raise EdgeTransferError(
                failed.read_text().strip() + " (remembered from an earlier run)"
            )
        session = _onnx_session(backbone, p, path, failed)
    except EdgeTransferError as e:
        runner = _Runner(backbone, strict=strict)
        runner._fall_back(str(e))
        return runner
    return _Runner(backbone, session, failed, strict)


def onnx_backbone_path(backbone: nn.Module, p: Preprocessing, backbone_id: str) -> Path:
    """Where the exported backbone is cached: keyed by its id, structure, weights and input size.

    The weights are hashed too: an id such as "arch:none|seed" does not pin them on its own.
    """
    h = hashlib.sha256(f"{backbone_id}\n{tuple(p.input_size)}\n{torch.__version__}\n".encode())
    h.update(repr(backbone).encode())
    for k, v in backbone.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return cache_dir() / "backbones" / f"{h.hexdigest()[:32]}.onnx"


def _onnx_session(backbone: nn.Module, p: Preprocessing, path: Path, failed: Path):
    """An onnxruntime session of the backbone: the cached export, or a new one.

    A backbone that does not export is remembered (`failed`) so later runs do not try again.
    """
    from edgetransfer.runtime import open_session

    if path.is_file():
        try:
            return open_session(path)
        except EdgeTransferError:
            path.unlink(missing_ok=True)  # a damaged cache entry is exported again
    try:
        _export_backbone(backbone, p, path)
        return open_session(path)
    except EdgeTransferError as e:
        path.unlink(missing_ok=True)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(str(e) + "\n")
        raise


def _export_backbone(backbone: nn.Module, p: Preprocessing, path: Path) -> None:
    """ONNX with a dynamic batch: the TorchScript exporter first (10x quicker to export than
    dynamo here, and its graph ran faster under onnxruntime), dynamo when that fails."""
    from edgetransfer.export import _first_line, _torch_onnx_export

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    example = torch.randn(2, 3, *p.input_size, generator=torch.Generator().manual_seed(0))
    errors = []
    try:
        for exporter in ("torchscript", "dynamo"):
            try:
                _torch_onnx_export(backbone, example, tmp, exporter, None, "input", ["features"])
                os.replace(tmp, path)  # atomic: a concurrent run never sees half a file
                return
            except Exception as e:  # exporter failures come in many types
                errors.append(f"{exporter}: {_first_line(e)}")
    finally:
        tmp.unlink(missing_ok=True)
    raise EdgeTransferError("the backbone does not export to ONNX (" + "; ".join(errors) + ")")
