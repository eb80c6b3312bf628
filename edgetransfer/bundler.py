"""Write a backbone bundle: an architecture's frozen feature extractor (and its source head) as
ONNX with the manifest inside, checked against eager PyTorch before it is written.

This is the one step of the device path that needs torch (see bundle.py for the rest).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgetransfer import bundlecache, onnxio
from edgetransfer.backbones import feature_dim, get_arch, source_backbone
from edgetransfer.bundle import FEATURES, SOURCE_OUTPUT, bundle_manifest, is_bundle
from edgetransfer.data import load_image, preprocess, scan
from edgetransfer.errors import DataError, EdgeTransferError, ExportError, OutputExistsError
from edgetransfer.fileio import TMP_PREFIX, sha256_file
from edgetransfer.manifest import Manifest, read_manifest, versions
from edgetransfer.parity import CHECK_BATCHES, require_close
from edgetransfer.runs import load_run

CHECK_IMAGES = 16  # real images the bundle must match eager on, spread over the classes


@dataclass(frozen=True)
class BundleResult:
    path: Path
    manifest: Manifest
    sha256: str
    exporter: str
    checked_images: int
    weights_file: Path | None  # the file the weights came from (None: random init)


def check_bundle_out(out: Path, force: bool, inputs: list) -> None:
    """The --force rule for a bundle file: an existing file is replaced only with --force, and
    only when it is a bundle (never a user's other file, never an input)."""
    out = Path(out)
    for given in inputs:
        if given is not None and os.path.realpath(given) == os.path.realpath(out):
            raise OutputExistsError(f"refusing to write {out}: it is the input {given}")
    if not os.path.lexists(out):
        return
    if not force:
        raise OutputExistsError(f"{out} already exists; pass --force to replace it")
    try:
        ours = out.is_file() and is_bundle(read_manifest(out))
    except EdgeTransferError:
        ours = False
    if not ours:
        raise OutputExistsError(
            f"refusing to replace {out} with --force: it is not a backbone bundle; choose "
            "another --out"
        )


def write_bundle(
    arch: str,
    weights: str,
    out: str | os.PathLike,
    *,
    data_dir: Path,
    force: bool = False,
    image_size: int | None = None,
) -> BundleResult:
    """Build `arch` with `weights`, split off its head and write the bundle to `out`.

    The ONNX file is checked against eager at batch 1, 2 and 8 on random inputs and on up to
    CHECK_IMAGES real images of `data_dir` before it replaces `out` (atomically). With
    `image_size`, the input is that square size (adapt --image-size), else the architecture's.
    """
    out = Path(out)
    get_arch(arch)  # an unknown name fails before any work
    weights_file = weights if weights not in ("imagenet", "none") else None
    check_bundle_out(out, force, [weights_file, data_dir])
    images = _real_images(data_dir)
    source, module, provenance = source_backbone(arch, weights)
    pre = source.preprocessing or source.spec.preprocessing
    if image_size:
        pre = pre.with_size(image_size)
    dim = feature_dim(module.features, pre)
    source_head = module.source_head
    labels = source.labels or [f"source_{i}" for i in range(source_head.out_features)]
    manifest = bundle_manifest(
        arch=arch,
        preprocessing=pre,
        source=provenance,
        source_labels=labels,
        feature_dim=dim,
        versions=versions(),
    )
    manifest.adapt["checked"] = {"batches": list(CHECK_BATCHES), "images": len(images)}
    x_real = np.stack([preprocess(img, pre) for img in images])
    # temp names of this process (fileio's prefix and pid): two runs writing the same bundle
    # (two adapt runs keeping one cache entry) never share a temp file
    tmp = out.with_name(f"{TMP_PREFIX}{os.getpid()}-{out.name}.export")
    done = out.with_name(f"{TMP_PREFIX}{os.getpid()}-{out.name}")
    errors = []
    for exporter in ("torchscript", "dynamo"):  # as features.py: torchscript is quicker here
        try:
            with onnxio.onnx_step(f"bundle export ({exporter}) of {arch}", tmp, done, target=out):
                _export(module, pre, tmp, exporter)
                diff = _check(module, tmp, out.name, pre.input_size, x_real)
                manifest.adapt["checked"]["max_abs_diff"] = float(f"{diff:.3g}")
                onnxio.finish_onnx(tmp, done, manifest)
                os.replace(done, out)
            break
        except ExportError as e:
            errors.append(f"{exporter}: {e}")
    else:
        raise ExportError(f"the {arch} backbone does not export to ONNX: " + "; ".join(errors))
    sha = sha256_file(out)
    return BundleResult(out, manifest, sha, exporter, len(images), source.weights_file)


def cache_bundle(
    arch: str, weights: str, *, image_size: int | None, data_dir: Path
) -> BundleResult | None:
    """Keep `arch` with `weights` (at `image_size`) as a bundle in the cache, where later adapt
    runs find it without torch (bundlecache.lookup). None when the weights are random or a
    valid entry is there already."""
    paths = bundlecache.entry_paths(arch, weights, image_size)
    if paths is None or bundlecache.lookup(arch, weights, image_size, warn=False):
        return None
    index, path = paths
    path.parent.mkdir(parents=True, exist_ok=True)
    index.unlink(missing_ok=True)  # the entry goes first: it never names a half-made bundle
    path.unlink(missing_ok=True)
    res = write_bundle(arch, weights, path, data_dir=data_dir, image_size=image_size)
    if res.weights_file is None:  # e.g. ImageNet weights not from a file: nothing to bind to
        path.unlink(missing_ok=True)
        return None
    bundlecache.record(
        arch,
        weights,
        image_size,
        bundle_sha256=res.sha256,
        weights_file=res.weights_file,
        weights_sha256=res.manifest.source["sha256"],
    )
    return res


def eager_of_export(export_dir: str | os.PathLike, weights: str):
    """For an EXPORT_DIR of a run adapted on a bundle: that model in eager PyTorch (runs.load_run
    with `weights`, which must be those the bundle was made from), as float32 NCHW -> logits.
    What `verify --eager-weights` compares the torch-free reference with."""
    model, _ = load_run(export_dir, weights)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()

    return run


def _export(module: nn.Module, pre, path: Path, exporter: str) -> None:
    example = torch.randn(2, 3, *pre.input_size, generator=torch.Generator().manual_seed(0))
    onnxio.torch_onnx_export(
        module,
        example,
        path,
        exporter=exporter,
        opset=None,
        input_name="input",
        output_names=[FEATURES, SOURCE_OUTPUT],
    )


def _check(module: nn.Module, path: Path, name: str, size: tuple[int, int], x_real) -> float:
    """Features and source logits of `path` under onnxruntime against eager: random inputs at
    batch 1/2/8, then the real images. Returns the largest difference on the real images."""
    session = onnxio.open_session(path)
    gen = torch.Generator().manual_seed(1)
    cases = [(b, torch.randn(b, 3, *size, generator=gen).numpy()) for b in CHECK_BATCHES]
    cases.append((len(x_real), x_real))
    diff = 0.0
    for batch, x in cases:
        with torch.inference_mode():
            want = [t.numpy() for t in module(torch.from_numpy(x))]
        got = session.run([FEATURES, SOURCE_OUTPUT], {"input": x})
        require_close(got, want, name, batch)
        diff = max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True))
    return diff


def _real_images(data_dir: Path) -> list:
    """Up to CHECK_IMAGES decodable images of `data_dir` (class folders), a seeded spread."""
    ds = scan(data_dir, val_fraction=0.0)
    samples = random.Random(0).sample(ds.samples, len(ds.samples))
    images = []
    for s in samples:
        try:
            images.append(load_image(s.path))
        except DataError:
            continue
        if len(images) == CHECK_IMAGES:
            break
    if not images:
        raise DataError(f"no readable images in {data_dir} to check the bundle on")
    return images
