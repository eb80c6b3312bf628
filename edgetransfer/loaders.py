"""Augmentation presets and the image mini-batches for strategies that train the backbone."""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from edgetransfer import config
from edgetransfer.data import Sample, eval_transform, interpolation_mode, load_image
from edgetransfer.manifest import Preprocessing
from edgetransfer.train import epoch_generator

AUGMENT = config.AUGMENTS  # each one is a preset of train_transform() (tested)


def train_transform(p: Preprocessing, preset: str):
    """torchvision.transforms.v2 pipeline for training.

    none: the eval pipeline. light: small random crops and colour changes, no flips (safe for
    digits, text and other orientation-dependent images). standard: stronger crops, colour
    jitter and horizontal flips, for natural photos.
    """
    from torchvision.transforms import v2

    if preset == "none":
        return eval_transform(p)
    tail = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(p.mean), list(p.std)),
    ]
    size = list(p.input_size)
    mode = interpolation_mode(p)  # the weights' own filter, as at evaluation
    if preset == "light":
        head = [
            v2.Resize(p.resize, interpolation=mode, antialias=True),
            v2.RandomResizedCrop(
                size, scale=(0.8, 1.0), ratio=(0.9, 1.1), interpolation=mode, antialias=True
            ),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ]
    elif preset == "standard":
        head = [
            v2.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=mode, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        ]
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {AUGMENT}")
    return v2.Compose(head + tail)


def apply_seeded(transform, img, seed: int, epoch: int, index: int):
    """`transform(img)` with torch's global generator seeded from (seed, epoch, index) and
    restored afterwards: a random augmentation is the same for the same image, epoch (or
    cached view) and seed, whichever process or thread runs it."""
    state = torch.get_rng_state()
    torch.manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + index)
    try:
        return transform(img)
    finally:
        torch.set_rng_state(state)


class _Images(TorchDataset):
    """Decodes and transforms one sample; augmentation is seeded by (seed, epoch, index) so it
    is the same whatever the batching, the worker count or an interruption."""

    def __init__(self, samples: list[Sample], transform, seed: int, max_pixels: int | None):
        self.samples, self.transform, self.seed = samples, transform, seed
        self.max_pixels = max_pixels
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = load_image(s.path, self.max_pixels)
        return apply_seeded(self.transform, img, self.seed, self.epoch, i), s.label, i


class ImageBatches:
    """Mini-batches decoded from image files each epoch (for strategies whose backbone trains).

    Images are never all in memory; `workers` processes decode in parallel.
    """

    def __init__(
        self,
        samples: list[Sample],
        transform,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        workers: int = 0,
        max_pixels: int | None = None,
    ) -> None:
        self.data = _Images(samples, transform, seed, max_pixels)
        self.bs, self.seed, self.shuffle, self.workers = batch_size, seed, shuffle, workers

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.bs)

    def epoch(self, epoch: int):
        self.data.epoch = epoch
        n = len(self.data)
        order = (
            torch.randperm(n, generator=epoch_generator(self.seed, epoch)).tolist()
            if self.shuffle
            else list(range(n))
        )
        loader = DataLoader(
            self.data,
            batch_size=self.bs,
            sampler=order,
            num_workers=self.workers,
            generator=torch.Generator().manual_seed(0),
        )
        yield from loader
