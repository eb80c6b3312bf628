"""Backbone bundles: a frozen feature extractor as ONNX with the manifest inside.

A bundle (written by `edgetransfer backbone`, where torch is) is what a device without PyTorch
adapts with: this module opens one, runs it over a dataset with decoding threads and a feature
cache keyed by the bundle's sha256, and composes it with a linear head into model.onnx and
model.raw.onnx with the onnx library.

Floor 1: numpy, Pillow, onnx, onnxruntime; never torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetransfer.data import (
    Sample,
    current_max_pixels,
    decode_workers,
    load_image,
    normalize,
    pillow_warnings_off,
    resize_crop,
    threaded_map,
)
from edgetransfer.errors import DataError, EdgeTransferWarning, ManifestError, first_line
from edgetransfer.fileio import atomic_write_bytes, cache_dir, sha256_file
from edgetransfer.manifest import Manifest, Preprocessing, read_manifest
from edgetransfer.onnxio import open_session
from edgetransfer.parity import ATOL, RTOL

# manifest.adapt["kind"] of a bundle: it answers features, not classes
KIND = "backbone"
FEATURES = "features"  # the bundle's output: [N, feature_dim] float32
SOURCE_OUTPUT = "source_logits"  # the source head's logits, when the bundle has one
# names of the head's tensors in a composed model (the bundle's own never start with this)
HEAD_PREFIX = "edgetransfer_head"
# Rows of a cache entry recomputed with the bundle before the entry is used (as features.py).
CHECK_IMAGES = 8
_FORMAT = "edgetransfer-bundle-features-1"


def bundle_manifest(
    *,
    arch: str,
    preprocessing: Preprocessing,
    source: dict,
    source_labels: list[str],
    feature_dim: int,
    versions: dict[str, str],
) -> Manifest:
    """The manifest a bundle carries: the source task's labels (its source_logits output), the
    preprocessing its features were made for, the weights' provenance, the feature size."""
    return Manifest(
        arch=arch,
        labels=list(source_labels),
        preprocessing=preprocessing,
        io={"input": "input", "output": FEATURES, "source_output": SOURCE_OUTPUT},
        source={**source, "labels": list(source_labels)},
        adapt={"kind": KIND, "feature_dim": int(feature_dim)},  # + the export's check
        versions=versions,
    )


def is_bundle(manifest: Manifest) -> bool:
    return manifest.adapt.get("kind") == KIND


@dataclass
class Bundle:
    """An opened bundle: its file, content sha256, manifest and onnxruntime session."""

    path: Path
    sha256: str
    manifest: Manifest
    feature_dim: int
    session: object

    def features(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 NCHW -> [N, feature_dim] float32."""
        name = self.manifest.io["input"]
        return self.session.run([FEATURES], {name: np.asarray(x, np.float32)})[0]


def open_bundle(path: str | os.PathLike, threads: int | None = None) -> Bundle:
    """A bundle from its .onnx file; anything else is a one-line ManifestError."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"backbone bundle {path} does not exist; make one with `edgetransfer backbone ARCH "
            "--out FILE.onnx` where PyTorch is installed"
        )
    if path.suffix.lower() != ".onnx":
        raise ManifestError(f"{path.name} is not a backbone bundle (.onnx)")
    manifest = read_manifest(path)
    if not is_bundle(manifest):
        raise ManifestError(
            f"{path.name} is a classifier, not a backbone bundle; make a bundle with "
            "`edgetransfer backbone ARCH --out FILE.onnx`"
        )
    dim = manifest.adapt.get("feature_dim")
    session = open_session(path, threads)
    outputs = {o.name: o.shape for o in session.get_outputs()}
    width = outputs.get(FEATURES, [None])[-1]
    if (
        not isinstance(dim, int)
        or FEATURES not in outputs
        or isinstance(width, int)
        and width != dim
    ):
        raise ManifestError(f"{path.name}: its outputs do not match its manifest's feature_dim")
    return Bundle(path, sha256_file(path), manifest, dim, session)


# ---------------------------------------------------------------------------------------------
# Features of a dataset


@dataclass
class BundleFeatures:
    """Feature vectors of the samples that decoded (row i: samples[i]), and the ones that did
    not; `cached` says whether they came from the feature cache."""

    samples: list[Sample]
    vectors: np.ndarray  # [N, D] float32
    bad: list[tuple[Path, str]]
    cached: bool = False


class _Decode:
    """Sample i -> (i, uint8 HWC at input_size or None, reason). JPEGs decode at a reduced DCT
    scale that still covers the resize, as features.py does for the torch path."""

    def __init__(self, samples: list[Sample], p: Preprocessing, limit: int) -> None:
        self.samples, self.p, self.limit = samples, p, limit

    def __call__(self, i: int):
        try:
            img = load_image(
                self.samples[i].path, self.limit, draft=(self.p.resize,) * 2, quiet=False
            )
        except DataError as e:
            return i, None, str(e)
        return i, np.asarray(resize_crop(img, self.p), dtype=np.uint8), None


def extract(
    bundle: Bundle,
    samples: list[Sample],
    *,
    batch_size: int = 32,
    use_cache: bool = True,
    max_pixels: int | None = None,
    workers: int | None = None,
    progress: bool = False,
) -> BundleFeatures:
    """The bundle's features for `samples`, from the cache when an entry passes its checks.

    Args:
        max_pixels: decoding limit per image (None: data.current_max_pixels()).
        workers: decoding threads (None: data.decode_workers chooses).
    """
    limit = max_pixels or current_max_pixels()
    cache = _Cache(bundle, samples, limit)
    if use_cache and (hit := cache.read()) is not None:
        return hit
    out = _compute(bundle, samples, limit, batch_size, workers, progress)
    if use_cache:
        cache.write(out)
    return out


def _compute(bundle, samples, limit, batch_size, workers, progress) -> BundleFeatures:
    from tqdm import tqdm

    decode = _Decode(samples, bundle.manifest.preprocessing, limit)
    n = decode_workers(samples, workers)
    items = (
        threaded_map(decode, len(samples), n, 2 * batch_size)
        if n
        else (decode(i) for i in range(len(samples)))
    )
    p = bundle.manifest.preprocessing
    good: list[int] = []
    bad: list[tuple[Path, str]] = []
    rows: list[np.ndarray] = []
    pending: list = []

    def flush() -> None:
        good.extend(i for i, _ in pending)
        rows.append(bundle.features(normalize(np.stack([a for _, a in pending]), p)))
        pending.clear()

    bar = tqdm(total=len(samples), desc="features", unit="img", disable=not progress, leave=False)
    with pillow_warnings_off(), bar, contextlib.closing(items) as it:
        for i, pixels, reason in it:
            bar.update(1)
            if pixels is None:
                bad.append((samples[i].path, reason))
                continue
            pending.append((i, pixels))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    vectors = np.concatenate(rows) if rows else np.zeros((0, bundle.feature_dim), np.float32)
    return BundleFeatures([samples[i] for i in good], vectors.astype(np.float32), bad)


class _Cache:
    """One extraction's cache entry: keyed by the bundle's sha256, the pixel limit and every
    image file (path, size, mtime); read back only when its metadata checks out and
    CHECK_IMAGES of its rows, recomputed now with the bundle, match."""

    def __init__(self, bundle: Bundle, samples: list[Sample], limit: int) -> None:
        self.bundle, self.samples, self.limit = bundle, samples, limit
        stamps = []
        for s in samples:
            try:
                st = s.path.stat()
                stamps.append(f"{s.path.absolute()}\t{st.st_size}:{st.st_mtime_ns}\n")
            except OSError:
                stamps.append(f"{s.path.absolute()}\tmissing\n")
        self.stamps_sha256 = _sha("".join(stamps))
        p = json.dumps(bundle.manifest.preprocessing.to_dict(), sort_keys=True)
        self.key = _sha(f"bundle|{bundle.sha256}|{limit}|{p}|{self.stamps_sha256}")[:32]
        self.path = cache_dir() / "features" / f"{self.key}.safetensors"

    def read(self) -> BundleFeatures | None:
        try:
            blob = self.path.read_bytes()
        except OSError:
            return None
        try:
            return self._checked(blob)
        except ValueError as e:
            warnings.warn(
                f"feature cache entry {self.path} not used ({e}); recomputing it",
                EdgeTransferWarning,
                stacklevel=3,
            )
            return None

    def _checked(self, blob: bytes) -> BundleFeatures:
        from safetensors.numpy import load

        try:
            t = load(blob)
            meta = _metadata(blob)
            keep, vectors, bad_raw = t["keep"], t["vectors"], t["bad"]
        except Exception as e:  # safetensors raises its own types on a damaged file
            raise ValueError(f"unreadable: {first_line(e)}") from None
        if meta.get("format") != _FORMAT or meta.get("key") != self.key:
            raise ValueError("written for other images or by another tool")
        if meta.get("bundle_sha256") != self.bundle.sha256:
            raise ValueError("made by another backbone bundle")
        if keep.shape != (len(self.samples),) or vectors.dtype != np.float32:
            raise ValueError("its shape does not match the images")
        kept = [i for i, k in enumerate(keep.tolist()) if k]
        if vectors.shape != (len(kept), self.bundle.feature_dim) or not np.isfinite(vectors).all():
            raise ValueError("its vectors do not match the bundle")
        if _sha(vectors.tobytes()) != meta.get("vectors_sha256"):
            raise ValueError("vectors differ from their recorded sha256")
        try:
            bad = [(Path(b), str(r)) for b, r in json.loads(bytes(bad_raw).decode())]
        except (ValueError, TypeError):
            raise ValueError("its list of unreadable images is damaged") from None
        if [b for b, _ in bad] != [s.path for i, s in enumerate(self.samples) if not keep[i]]:
            raise ValueError("its list of unreadable images does not match the images")
        if kept:
            rows = random.SystemRandom().sample(range(len(kept)), min(CHECK_IMAGES, len(kept)))
            decode = _Decode(self.samples, self.bundle.manifest.preprocessing, self.limit)
            with pillow_warnings_off():
                pixels = [decode(kept[r])[1] for r in rows]
            if any(a is None for a in pixels):
                raise ValueError("an image no longer decodes")
            want = self.bundle.features(
                normalize(np.stack(pixels), self.bundle.manifest.preprocessing)
            )
            if not np.all(np.abs(vectors[rows] - want) <= ATOL + RTOL * np.abs(want)):
                raise ValueError(f"cached vectors differ from the bundle's on {len(rows)} rows")
        return BundleFeatures([self.samples[i] for i in kept], vectors, bad, cached=True)

    def write(self, f: BundleFeatures) -> None:
        from safetensors.numpy import save

        good = set(f.samples)
        keep = np.array([s in good for s in self.samples], dtype=np.uint8)
        bad = json.dumps([(str(b), r) for b, r in f.bad]).encode()
        vectors = np.ascontiguousarray(f.vectors, dtype=np.float32)
        meta = {
            "format": _FORMAT,
            "key": self.key,
            "bundle_sha256": self.bundle.sha256,
            "stamps_sha256": self.stamps_sha256,
            "vectors_sha256": _sha(vectors.tobytes()),
        }
        blob = save(
            {"vectors": vectors, "keep": keep, "bad": np.frombuffer(bad, np.uint8)},
            metadata=meta,
        )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, blob)
        except OSError as e:
            warnings.warn(
                f"cache folder {cache_dir()} cannot be written ({e.strerror or e}); going on "
                "without the cache",
                EdgeTransferWarning,
                stacklevel=3,
            )


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _metadata(blob: bytes) -> dict:
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8 : 8 + n]).get("__metadata__")
    return meta if isinstance(meta, dict) else {}


# ---------------------------------------------------------------------------------------------
# Composing the bundle and a head into the deployed models


def compose(
    bundle_path: Path, weight: np.ndarray, bias: np.ndarray, p: Preprocessing, *, raw: bool
):
    """The bundle's graph up to its features, then ``logits = features @ weight.T + bias``.

    With `raw`, the graph takes uint8 NHWC pixels at input_size and normalises them itself
    (``x * 1/(255 std) - mean/std``), and outputs ``probs`` (softmax) before ``logits``: the
    same contract as the torch path's model.raw.onnx. Returns an onnx.ModelProto.
    """
    import onnx
    from onnx import TensorProto, compose, helper, numpy_helper

    body = onnx.load(str(bundle_path))
    del body.metadata_props[:]
    weight = np.asarray(weight, np.float32)
    classes, dim = weight.shape
    h = HEAD_PREFIX
    nodes = [helper.make_node("Gemm", [FEATURES, f"{h}.weight", f"{h}.bias"], ["logits"], transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])]
    if raw:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1))
        outputs.insert(
            0, helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", classes])
        )
    head = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["batch", dim])],
        outputs,
        initializer=[
            numpy_helper.from_array(weight, f"{h}.weight"),
            numpy_helper.from_array(np.asarray(bias, np.float32), f"{h}.bias"),
        ],
    )
    model = compose.merge_models(
        body,
        _like(body, head),
        io_map=[(FEATURES, FEATURES)],
        outputs=[o.name for o in outputs],
        producer_name="edgetransfer",
    )
    if not raw:
        return model
    return compose.merge_models(
        _like(body, _pixels_graph(p, body.graph.input[0].name)),
        model,
        io_map=[("normalised", body.graph.input[0].name)],
        producer_name="edgetransfer",
    )


def _pixels_graph(p: Preprocessing, into: str):
    """uint8 NHWC pixels ``image`` -> normalised float32 NCHW ``normalised``."""
    from onnx import TensorProto, helper, numpy_helper

    std = np.asarray(p.std, np.float32)
    scale = (1.0 / (255.0 * std)).reshape(1, 3, 1, 1).astype(np.float32)
    shift = (-np.asarray(p.mean, np.float32) / std).reshape(1, 3, 1, 1).astype(np.float32)
    h, w = p.input_size
    pre = f"{HEAD_PREFIX}_pixels"
    return helper.make_graph(
        [
            helper.make_node("Transpose", ["image"], [f"{pre}.nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Cast", [f"{pre}.nchw"], [f"{pre}.float"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{pre}.float", f"{pre}.scale"], [f"{pre}.scaled"]),
            helper.make_node("Add", [f"{pre}.scaled", f"{pre}.shift"], ["normalised"]),
        ],
        "pixels",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", h, w, 3])],
        [helper.make_tensor_value_info("normalised", TensorProto.FLOAT, ["batch", 3, h, w])],
        initializer=[
            numpy_helper.from_array(scale, f"{pre}.scale"),
            numpy_helper.from_array(shift, f"{pre}.shift"),
        ],
    )


def _like(model, graph):
    """`graph` as a model with `model`'s IR version and opsets (merge_models needs them equal)."""
    from onnx import helper

    return helper.make_model(
        graph, ir_version=model.ir_version, opset_imports=list(model.opset_import)
    )


def head_logits(features: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The numpy reference of the composed head: float64 arithmetic, float32 out."""
    out = np.asarray(features, np.float64) @ np.asarray(weight, np.float64).T + bias
    return out.astype(np.float32)
