"""Property tests for the readers of untrusted files: whatever the bytes, the image loader and the
manifest reader end in a valid result or in edgetransfer's own error, never another exception.

tools/fuzz.py runs the same properties on 10,000 mutated inputs per target; this is the sample.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetransfer.errors import EdgeTransferError, ManifestError
from edgetransfer.manifest import Manifest

_spec = importlib.util.spec_from_file_location(
    "et_fuzz", Path(__file__).resolve().parents[1] / "tools" / "fuzz.py"
)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

IMAGE_SEEDS = fuzz.image_seeds()
MANIFEST_SEEDS = fuzz.manifest_seeds()
# 60 examples per property: the suite's regression check; tools/fuzz.py runs long budgets
FAST = settings(
    max_examples=60,
    database=None,  # no example database kept between runs: every run is the same sample
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_every_seed_is_accepted(work):
    """The unmutated inputs decode: the fuzz targets are not trivially rejecting everything."""
    for i, data in enumerate(IMAGE_SEEDS):
        (work / f"seed{i}").write_bytes(data)
        assert fuzz.check_image(work / f"seed{i}") == "decoded", i
    for i, (suffix, data) in enumerate(MANIFEST_SEEDS):
        (work / f"seed{i}{suffix}").write_bytes(data)
        assert fuzz.check_manifest(work / f"seed{i}{suffix}") == "decoded", suffix


@FAST
@given(seed=st.sampled_from(IMAGE_SEEDS), rng=st.randoms(use_true_random=False))
def test_image_loader_on_mutated_images(work, seed, rng: random.Random):
    path = work / "mutated.img"
    path.write_bytes(fuzz.mutate(rng, seed, IMAGE_SEEDS))
    assert fuzz.check_image(path) in ("decoded", "rejected")  # anything else raised


@FAST
@given(data=st.binary(max_size=512))
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=b"\xff\xd8\xff")
@example(data=b"GIF89a\xff\xff\xff\xff")
def test_image_loader_on_random_bytes(work, data):
    path = work / "random.jpg"
    path.write_bytes(data)
    assert fuzz.check_image(path) in ("decoded", "rejected")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
VALID = json.loads(MANIFEST_SEEDS[0][1])
FIELDS = [
    ("schema",), ("arch",), ("labels",), ("labels", 0), ("io",), ("io", "output"),
    ("preprocessing",), ("preprocessing", "input_size"), ("preprocessing", "input_size", 0),
    ("preprocessing", "resize"), ("preprocessing", "mean"), ("preprocessing", "std", 1),
    ("preprocessing", "crop"), ("metrics",), ("source",),
]  # fmt: skip


def _replace(obj, where, value):
    obj = json.loads(json.dumps(obj))
    target = obj
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    return obj


@FAST
@given(where=st.sampled_from(FIELDS), value=JSON)
@example(where=("preprocessing", "input_size", 0), value=float("inf"))
@example(where=("preprocessing", "std", 1), value=float("nan"))
@example(where=("preprocessing", "resize"), value=10**12)
@example(where=("io", "output"), value=["logits"])
def test_manifest_with_any_field_value(where, value):
    text = json.dumps(_replace(VALID, where, value))
    try:
        m = Manifest.from_json(text)
    except ManifestError:
        return
    assert Manifest.from_json(m.to_json()) == m  # accepted manifests round-trip


@FAST
@given(data=st.binary(max_size=256) | JSON.map(lambda v: json.dumps(v).encode()))
@example(data=b"[" * 100_000)
@example(data=b'{"schema": 1, "labels": ["\\ud800"]')
def test_manifest_from_any_bytes(data):
    try:
        Manifest.from_json(data)
    except ManifestError:
        pass


@FAST
@given(seed=st.sampled_from(MANIFEST_SEEDS), rng=st.randoms(use_true_random=False))
def test_read_manifest_on_mutated_containers(work, seed, rng: random.Random):
    suffix, data = seed
    path = work / f"mutated{suffix}"
    path.write_bytes(fuzz.mutate(rng, data, [d for _, d in MANIFEST_SEEDS]))
    assert fuzz.check_manifest(path) in ("decoded", "rejected")


def test_crash_is_detected(work, monkeypatch):
    """The property can fail: a loader raising a foreign exception is reported as a crash."""

    def broken(path, max_pixels=None):
        raise struct_error("unpack requires a buffer of 4 bytes")

    struct_error = __import__("struct").error
    monkeypatch.setattr(fuzz, "load_image", broken)
    (work / "x.png").write_bytes(IMAGE_SEEDS[0])
    with pytest.raises(struct_error):
        fuzz.check_image(work / "x.png")
    counts = fuzz.fuzz("image", 5, 0, None, work)
    assert counts["crashes"] == 5
    assert issubclass(ManifestError, EdgeTransferError)
