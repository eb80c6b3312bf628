"""The feature cache's file names and format are a contract: entries written by an earlier run
(here written by hand, as the format describes them) are found under the same key and read
back without recomputing, and the in-memory rows serve a subset of the last extraction."""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save

from edgetransfer import features
from edgetransfer.backbones import get_arch, load_source, split
from edgetransfer.data import scan
from edgetransfer.errors import EdgeTransferWarning

from .conftest import DIGITS, SOURCE

LIMIT = 50_000_000  # --max-pixels: part of the key


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGETRANSFER_CACHE", str(path))
    features._recent.clear()
    yield path
    features._recent.clear()


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Six digits of two classes and one file that is not an image."""
    root = tmp_path / "data"
    for label in ("five", "six"):
        (root / label).mkdir(parents=True)
        for f in sorted((DIGITS / label).iterdir())[:6]:
            shutil.copy(f, root / label / f.name)
    (root / "six" / "zz_broken.png").write_bytes(b"not an image")
    return root


def _weights_sha256(module: torch.nn.Module) -> str:
    """The backbone hash an entry records: its repr, then every state tensor's name, dtype,
    shape and bytes."""
    h = hashlib.sha256(repr(module).encode())
    for k, v in module.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _write_entry(cache: Path, backbone, pre, samples, backbone_id: str, vectors, bad) -> Path:
    """An entry of format edgetransfer-features-2 for the clean view, as an earlier run left it."""
    stamps = []
    for s in samples:
        st = s.path.stat()
        stamps.append(f"{s.path.absolute()}\t{st.st_size}:{st.st_mtime_ns}\n")
    prefix = f"{backbone_id}|{LIMIT}|none|0|0\n" + json.dumps(pre.to_dict(), sort_keys=True)
    h = hashlib.sha256(prefix.encode())
    for line in stamps:
        h.update(line.encode())
    key = h.hexdigest()[:32]
    bad_paths = {p for p, _ in bad}
    keep = torch.tensor([s.path not in bad_paths for s in samples], dtype=torch.uint8)
    meta = {
        "format": "edgetransfer-features-2",
        "key": key,
        "stamps_sha256": hashlib.sha256("".join(stamps).encode()).hexdigest(),
        "backbone_sha256": _weights_sha256(backbone),
        "shape": json.dumps(list(vectors.shape)),
        "dtype": "float32",
        "vectors_sha256": hashlib.sha256(np.ascontiguousarray(vectors.numpy())).hexdigest(),
        "engine": "torch",
    }
    bad_json = json.dumps([(str(p), r) for p, r in bad]).encode()
    tensors = {
        "vectors": vectors.contiguous(),
        "keep": keep,
        "bad": torch.tensor(list(bad_json), dtype=torch.uint8),
    }
    path = cache / "features" / f"{key}.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(save(tensors, metadata=meta))
    return path


def test_an_entry_written_by_an_earlier_run_is_read_back(cache, dataset):
    src = load_source("simple_cnn", str(SOURCE))
    backbone, _ = split(get_arch("simple_cnn"), src.model)
    pre, samples = src.preprocessing, scan(dataset).samples
    kw = dict(backbone_id="earlier", max_pixels=LIMIT, workers=0)
    fresh = features.extract(backbone, samples, pre, use_cache=False, **kw)
    assert [p.name for p, _ in fresh.bad] == ["zz_broken.png"]
    entry = _write_entry(cache, backbone, pre, samples, "earlier", fresh.vectors, fresh.bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EdgeTransferWarning)
        got = features.extract(backbone, samples, pre, **kw)
    assert got.backend == "cache"  # found under the same key, passed its checks
    assert got.samples == fresh.samples and got.bad == fresh.bad
    torch.testing.assert_close(got.vectors, fresh.vectors, rtol=0, atol=0)
    assert sorted((cache / "features").iterdir()) == [entry]  # nothing rewritten beside it


def test_a_subset_of_the_last_extraction_comes_from_memory(cache, dataset):
    src = load_source("simple_cnn", str(SOURCE))
    backbone, _ = split(get_arch("simple_cnn"), src.model)
    pre, samples = src.preprocessing, scan(dataset).samples
    kw = dict(backbone_id="memory", max_pixels=LIMIT, workers=0)
    whole = features.extract(backbone, samples, pre, **kw)
    (entry,) = (cache / "features").iterdir()
    entry.unlink()  # not from disk: a subset has an entry of its own, which does not exist
    subset = samples[::2]
    got = features.extract(backbone, subset, pre, **kw)
    assert got.backend == "cache"
    rows = [whole.samples.index(s) for s in got.samples]
    torch.testing.assert_close(got.vectors, whole.vectors[rows], rtol=0, atol=0)
    assert {p.name for p, _ in got.bad} <= {"zz_broken.png"}
    assert not list((cache / "features").iterdir())  # served from memory, so nothing written
