"""The backbone bundles adapt keeps in the cache, found again without importing torch.

A head run with PyTorch (adapt --strategy head) keeps its frozen backbone as a bundle in
cache_dir()/bundles/ (bundler.cache_bundle writes it), with an index entry beside it keyed by
the architecture, the weights (``imagenet`` or a file's absolute path) and the input size. A
later run with the same three finds it here and adapts on it (device.py) without PyTorch. An
entry is used only while the weights file and the bundle are byte for byte those recorded
(sha256) and the bundle says it was made from those weights; anything else is a miss, and the
run takes the PyTorch path, which writes the entry anew.

Floor 1: stdlib and the manifest; never torch.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgetransfer import __version__
from edgetransfer.bundle import is_bundle
from edgetransfer.errors import EdgeTransferError, EdgeTransferWarning
from edgetransfer.fileio import atomic_write_text, cache_dir, sha256_file
from edgetransfer.manifest import read_manifest

FORMAT = "edgetransfer-bundle-index-1"
FOLDER = "bundles"


@dataclass(frozen=True)
class CachedBundle:
    """A cache entry that passed its checks: the bundle, its sha256 and the weights it holds."""

    path: Path
    sha256: str
    weights_file: Path


def weights_spec(weights: str) -> str | None:
    """How an entry names the weights: ``imagenet``, or the file's absolute path; None for
    random weights (--weights none), which no file pins and which are never kept."""
    if weights == "none":
        return None
    return weights if weights == "imagenet" else str(Path(weights).absolute())


def entry_paths(arch: str, weights: str, image_size: int | None) -> tuple[Path, Path] | None:
    """(index entry, bundle file) for this architecture, weights and input size; None when the
    weights are random. The package version is part of the key: a new release (whose
    architectures or preprocessing may differ) makes its own bundles."""
    spec = weights_spec(weights)
    if spec is None:
        return None
    text = json.dumps(
        {"arch": arch, "weights": spec, "image_size": image_size, "version": __version__},
        sort_keys=True,
    )
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    folder = cache_dir() / FOLDER
    return folder / f"{key}.json", folder / f"{key}.onnx"


def lookup(
    arch: str, weights: str, image_size: int | None, *, warn: bool = True
) -> CachedBundle | None:
    """The cached bundle for `arch` with `weights` at `image_size`, or None. An entry that
    exists but fails a check is a miss, with one EdgeTransferWarning saying why (`warn`)."""
    paths = entry_paths(arch, weights, image_size)
    if paths is None:
        return None
    try:
        if not paths[0].is_file():
            return None
        return _checked(arch, weights, image_size, *paths)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, EdgeTransferError) as e:
        if warn:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            warnings.warn(
                f"cached backbone bundle {paths[1]} not used ({reason}); adapting with PyTorch",
                EdgeTransferWarning,
                stacklevel=2,
            )
        return None


def _checked(arch, weights, image_size, index: Path, path: Path) -> CachedBundle:
    entry = json.loads(index.read_text())
    if not isinstance(entry, dict):
        raise ValueError("its index entry is not a JSON object")
    want = {"format": FORMAT, "arch": arch, "weights": weights_spec(weights)}
    if any(entry.get(k) != v for k, v in want.items()) or entry.get("image_size") != image_size:
        raise ValueError("its index entry is for something else")
    weights_file = Path(entry["weights_file"])
    if entry["weights"] != "imagenet" and weights_file != Path(entry["weights"]):
        raise ValueError("its index entry names another weights file")
    if sha256_file(weights_file) != entry["weights_sha256"]:
        raise ValueError(f"{weights_file} changed since the bundle was made")
    sha = sha256_file(path)
    if sha != entry["bundle_sha256"]:
        raise ValueError("the bundle changed after it was written (its sha256 differs)")
    m = read_manifest(path)
    size = tuple(m.preprocessing.input_size)
    if (
        not is_bundle(m)
        or m.arch != arch
        or m.source.get("sha256") != entry["weights_sha256"]
        or (image_size is not None and size != (image_size, image_size))
    ):
        raise ValueError("the bundle was not made from these weights")
    return CachedBundle(path, sha, weights_file)


def record(
    arch: str,
    weights: str,
    image_size: int | None,
    *,
    bundle_sha256: str,
    weights_file: Path,
    weights_sha256: str,
) -> Path:
    """Write the index entry of a bundle just written to entry_paths(...)[1] (atomically, after
    the bundle: a reader that finds the entry finds the file it describes)."""
    index, _ = entry_paths(arch, weights, image_size)
    entry = {
        "format": FORMAT,
        "arch": arch,
        "weights": weights_spec(weights),
        "image_size": image_size,
        "weights_file": str(Path(weights_file).absolute()),
        "weights_sha256": weights_sha256,
        "bundle_sha256": bundle_sha256,
        "version": __version__,
    }
    atomic_write_text(index, json.dumps(entry, indent=2) + "\n")
    return index
