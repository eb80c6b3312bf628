"""Run the frozen backbone once over the dataset and cache the feature vectors on disk."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from edgetransfer.data import Sample, load_image
from edgetransfer.errors import DataError
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import Preprocessing


def cache_dir() -> Path:
    """``$EDGETRANSFER_CACHE`` or ``$XDG_CACHE_HOME/edgetransfer`` (``~/.cache/edgetransfer``)."""
    if os.environ.get("EDGETRANSFER_CACHE"):
        return Path(os.environ["EDGETRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetransfer"


@dataclass
class Features:
    """Feature vectors of the samples that decoded, and the ones that did not."""

    samples: list[Sample]
    vectors: torch.Tensor  # [N, D] float32, row i belongs to samples[i]
    bad: list[tuple[Path, str]]


def cache_key(backbone_id: str, p: Preprocessing, samples: list[Sample]) -> str:
    """Changes when the backbone weights, preprocessing or any image file changes."""
    h = hashlib.sha256()
    h.update(backbone_id.encode())
    h.update(json.dumps(p.to_dict(), sort_keys=True).encode())
    for s in samples:
        st = s.path.stat() if s.path.exists() else None
        stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "missing"
        h.update(f"{s.path.absolute()}\t{stamp}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:32]


@torch.inference_mode()
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
) -> Features:
    """Feature vectors for `samples` through `backbone` in eval mode, from cache when possible.

    Args:
        backbone_id: identifies the backbone weights (e.g. their sha256) for the cache key.
        max_pixels: decoding limit per image (a decompression-bomb guard).
        progress: show a progress bar on stderr.
        augment: augmentation preset for this view ("none": the eval pipeline).
        view, seed: which augmented copy; together they seed each image's augmentation.
    """
    from safetensors.torch import load, save

    from edgetransfer.data import current_max_pixels, eval_transform

    # The pixel limit decides which images are bad: a cache entry is only good for its limit.
    limit = max_pixels or current_max_pixels()
    key = cache_key(
        f"{backbone_id}|{limit}|{augment}|{view}|{seed if augment != 'none' else 0}", p, samples
    )
    path = cache_dir() / "features" / f"{key}.safetensors"
    if use_cache and path.is_file():
        try:
            cached = load(path.read_bytes())
            keep = cached["keep"].bool().tolist()
            bad = json.loads(bytes(cached["bad"].tolist()).decode()) if "bad" in cached else []
            if len(keep) == len(samples):
                return Features(
                    [s for s, k in zip(samples, keep, strict=True) if k],
                    cached["vectors"],
                    [(Path(b), r) for b, r in bad],
                )
        except Exception:  # a damaged cache entry is recomputed, never trusted
            pass

    from tqdm import tqdm

    backbone.eval()
    if augment == "none":
        tf = eval_transform(p)
    else:
        from edgetransfer.loaders import train_transform

        tf = _seeded(train_transform(p, augment), seed, view)
    good, bad, rows, batch = [], [], [], []
    for s in tqdm(samples, desc="features", unit="img", disable=not progress, leave=False):
        try:
            img = load_image(s.path, max_pixels)
        except DataError as e:
            bad.append((s.path, str(e)))
            continue
        good.append(s)
        batch.append(tf(img) if augment == "none" else tf(img, len(good) - 1 + len(bad)))
        if len(batch) == batch_size:
            rows.append(backbone(torch.stack(batch)).float())
            batch = []
    if batch:
        rows.append(backbone(torch.stack(batch)).float())
    vectors = torch.cat(rows) if rows else torch.zeros(0, 0)
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
    return Features(good, vectors, bad)


def _seeded(transform, seed: int, view: int):
    """Apply `transform` with the same seeding as loaders.ImageBatches (view = epoch)."""

    def run(img, index: int):
        state = torch.get_rng_state()
        torch.manual_seed((seed * 1_000_003 + view) * 1_000_003 + index)
        try:
            return transform(img)
        finally:
            torch.set_rng_state(state)

    return run
