"""The fast paths of feature extraction answer like the plain ones: the onnxruntime backend like
eager PyTorch, draft-mode JPEG decoding like a full decode, decoding threads like none."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from edgetransfer import features
from edgetransfer.backbones import get_arch, load_source, split
from edgetransfer.data import Sample, eval_transform, load_image, scan
from edgetransfer.errors import EdgeTransferError, EdgeTransferWarning
from edgetransfer.features import DRAFT_MAX_DIFF, DRAFT_TIE, extract
from edgetransfer.parity import ATOL, RTOL

from .conftest import DIGITS, SOURCE


@pytest.fixture(scope="module")
def digits_backbone():
    """The shipped (trained) digits model without its head, and its preprocessing."""
    src = load_source("simple_cnn", str(SOURCE))
    backbone, head = split(get_arch("simple_cnn"), src.model)
    return backbone.eval(), head.eval(), src.preprocessing


def _textured_jpeg(path, w, h, seed=0, exif=None):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 64, w // 64, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), np.float32)
    arr = np.clip(base + rng.normal(0, 12, (h, w, 1)), 0, 255).astype(np.uint8)
    kw = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(path, quality=90, **kw)
    return path


def test_onnxruntime_features_match_eager(digits_backbone):
    backbone, _, pre = digits_backbone
    samples = scan(DIGITS).samples
    kw = dict(backbone_id="parity", use_cache=False, workers=0)
    eager = extract(backbone, samples, pre, backend="torch", **kw)
    ort = extract(backbone, samples, pre, backend="onnxruntime", **kw)
    assert (eager.backend, ort.backend) == ("torch", "onnxruntime")
    assert eager.vectors.std(0).mean() > 0.1  # trained features, not a constant
    np.testing.assert_allclose(ort.vectors.numpy(), eager.vectors.numpy(), rtol=RTOL, atol=ATOL)
    # the export is cached by weights: a second run does not export again
    assert len(list((features.cache_dir() / "backbones").glob("*.onnx"))) >= 1


def test_auto_backend_picks_onnxruntime_only_when_it_pays(digits_backbone):
    backbone, _, pre = digits_backbone
    samples = scan(DIGITS).samples
    few = extract(backbone, samples[:10], pre, backbone_id="auto-few", use_cache=False)
    assert few.backend == "torch"  # the default: existing callers are unchanged
    small = extract(
        backbone, samples[:10], pre, backbone_id="auto-few2", use_cache=False, backend="auto"
    )
    # the backbone is cached by now (previous test or not): auto may use it for 10 images
    path = features.onnx_backbone_path(backbone, pre, "auto-few2")
    assert small.backend == ("onnxruntime" if path.is_file() else "torch")
    many = extract(backbone, samples, pre, backbone_id="auto-many", use_cache=False, backend="auto")
    assert many.backend == "onnxruntime"


class _Drifting(torch.nn.Module):
    """Exports fine, but each eager call differs (a Python counter the trace bakes in)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x).mean((2, 3)) * self.calls


def test_a_backbone_that_disagrees_falls_back_to_torch_and_is_remembered(digits_backbone):
    _, _, pre = digits_backbone
    samples = scan(DIGITS).samples
    module = _Drifting()
    with pytest.warns(EdgeTransferWarning, match="differs from eager"):
        out = extract(module, samples, pre, backbone_id="drift", use_cache=False, backend="auto")
    assert out.backend == "torch"
    assert len(out.vectors) == len(samples)
    path = features.onnx_backbone_path(module, pre, "drift")
    assert not path.is_file() and path.with_suffix(".failed").is_file()
    with pytest.warns(EdgeTransferWarning, match="remembered"):
        again = extract(module, samples, pre, backbone_id="drift", use_cache=False, backend="auto")
    assert again.backend == "torch"
    with pytest.raises(EdgeTransferError, match="backend onnxruntime: .*differs"):
        extract(module, samples, pre, backbone_id="drift", use_cache=False, backend="onnxruntime")


def test_unknown_backend_is_refused(digits_backbone):
    backbone, _, pre = digits_backbone
    with pytest.raises(EdgeTransferError, match="unknown backend 'tensorrt'; choose one of"):
        extract(backbone, [], pre, backbone_id="x", backend="tensorrt")


def test_draft_decodes_large_jpegs_smaller_within_the_documented_difference(tmp_path):
    pre = get_arch("mobilenet_v3_small").preprocessing  # resize 256, crop 224
    path = _textured_jpeg(tmp_path / "big.jpg", 2048, 1536)
    plain = load_image(path)
    small = load_image(path, draft=(pre.resize, pre.resize))
    assert plain.size == (2048, 1536)
    assert small.size == (512, 384)  # DCT scale 1/4: the smallest keeping 256 on both sides
    tf = eval_transform(pre)
    diff = (tf(plain) - tf(small)).abs()
    assert float(diff.max()) <= DRAFT_MAX_DIFF
    assert float(diff.mean()) <= DRAFT_MAX_DIFF / 10


def test_draft_keeps_the_shorter_side_after_exif_rotation_and_ignores_png(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    path = _textured_jpeg(tmp_path / "r.jpg", 2048, 1024, exif=exif)
    im = load_image(path, draft=(256, 256))
    assert im.size == (256, 512)  # 1/4 scale, then rotated: the shorter side is still 256
    png = tmp_path / "p.png"
    Image.new("RGB", (1200, 900), (10, 20, 30)).save(png)
    assert load_image(png, draft=(256, 256)).size == (1200, 900)


def test_draft_does_not_bypass_the_pixel_limit(tmp_path):
    from edgetransfer.errors import DataError

    path = _textured_jpeg(tmp_path / "big.jpg", 2048, 1536)
    with pytest.raises(DataError, match="exceeds --max-pixels"):
        load_image(path, max_pixels=1_000_000, draft=(64, 64))


def test_top1_unchanged_with_draft_on_enlarged_sample_digits(digits_backbone, tmp_path):
    """The sample digits are 32x32 PNGs (draft does not apply); enlarged to 1024 px JPEGs it
    does (DCT scale 1/8), and the shipped model must answer the same on every one that is not a
    near tie (its 0-4 head on these 5-9 digits has one, top two logits 0.001 apart)."""
    backbone, head, pre = digits_backbone
    samples = scan(DIGITS).samples
    big = []
    for i, s in enumerate(samples):
        path = tmp_path / f"{i}.jpg"
        load_image(s.path).resize((1024, 1024), Image.BICUBIC).save(path, quality=90)
        big.append(Sample(path, s.label, s.split))
    tf = eval_transform(pre)
    plain = torch.stack([tf(load_image(s.path)) for s in big])
    fast = extract(backbone, big, pre, backbone_id="big-digits", use_cache=False, workers=2)
    with torch.inference_mode():
        logits = head(backbone(plain))
    want, got = logits.argmax(1), head(fast.vectors).argmax(1)
    top2 = logits.topk(2, 1).values
    changed = got != want
    assert changed.float().mean() <= 0.01  # at most 2 of the 200
    assert (top2[changed, 0] - top2[changed, 1] < DRAFT_TIE).all(), top2[changed]
    # and on the original PNGs the fast path is the plain path exactly
    small = extract(backbone, samples, pre, backbone_id="digits", use_cache=False, workers=2)
    with torch.inference_mode():
        ref = backbone(torch.stack([tf(load_image(s.path)) for s in samples]))
    torch.testing.assert_close(small.vectors, ref, rtol=0, atol=0)


def test_workers_keep_order_and_report_bad_files(tmp_path, digits_backbone):
    backbone, _, pre = digits_backbone
    samples = scan(DIGITS).samples[:30]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    mixed = samples[:7] + [Sample(broken, 0, "train")] + samples[7:]
    kw = dict(backbone_id="order", use_cache=False, backend="torch", batch_size=8)
    serial = extract(backbone, mixed, pre, workers=0, **kw)
    parallel = extract(backbone, mixed, pre, workers=2, **kw)
    assert parallel.samples == serial.samples == samples
    assert [b for b, _ in parallel.bad] == [broken]
    torch.testing.assert_close(parallel.vectors, serial.vectors, rtol=0, atol=0)


def test_subsets_of_the_last_extraction_are_not_recomputed(digits_backbone, monkeypatch):
    backbone, _, pre = digits_backbone
    ds = scan(DIGITS)
    kw = dict(backbone_id="memo", backend="torch", workers=0)
    whole = extract(backbone, ds.samples, pre, **kw)
    calls = []
    monkeypatch.setattr(features, "_decoded", lambda *a, **k: calls.append(1) or (b for b in ()))
    train = extract(backbone, ds.split("train"), pre, **kw)
    assert calls == [] and train.backend == "cache"
    index = {s: i for i, s in enumerate(whole.samples)}
    rows = torch.tensor([index[s] for s in ds.split("train")])
    torch.testing.assert_close(train.vectors, whole.vectors[rows], rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # without the cache the backbone runs (here: the stubbed decoder is called)
        extract(backbone, ds.split("train"), pre, use_cache=False, **kw)
    assert calls == [1]


def test_augmented_views_do_not_depend_on_decoding_threads(digits_backbone):
    """Random transforms draw from torch's global generator: threads must not swap draws."""
    backbone, _, pre = digits_backbone
    samples = scan(DIGITS).samples[:40]
    kw = dict(backbone_id="aug", use_cache=False, backend="torch", augment="light", view=1)
    one = extract(backbone, samples, pre, workers=0, **kw)
    many = extract(backbone, samples, pre, workers=3, **kw)
    torch.testing.assert_close(many.vectors, one.vectors, rtol=0, atol=0)
    plain = extract(backbone, samples, pre, workers=0, backbone_id="aug", use_cache=False)
    assert not torch.equal(one.vectors, plain.vectors)  # the views really are augmented


def test_decoding_threads_leave_the_warning_filters_as_they_were(digits_backbone, tmp_path):
    backbone, _, pre = digits_backbone
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    samples = scan(DIGITS).samples[:20] + [Sample(broken, 0, "train")]
    before = list(warnings.filters)
    out = extract(backbone, samples, pre, backbone_id="w", use_cache=False, workers=2)
    assert len(out.bad) == 1
    assert warnings.filters == before


def test_adapt_freezes_the_heap_only_while_it_runs(tmp_path, monkeypatch):
    """Full collections skip the pre-existing heap during adapt; the GC is as it was after,
    also when adapt fails, and a caller's own gc.freeze() is left alone."""
    import gc

    from edgetransfer import adapt as adapt_mod

    seen = []
    real = adapt_mod._write_run

    def spy(*a, **k):
        seen.append(gc.get_freeze_count())
        return real(*a, **k)

    monkeypatch.setattr(adapt_mod, "_write_run", spy)
    cfg = adapt_mod.AdaptConfig(
        data_dir=DIGITS, out=tmp_path / "run", arch="simple_cnn", weights=str(SOURCE), epochs=1
    )
    assert gc.get_freeze_count() == 0
    adapt_mod.adapt(cfg)
    assert seen[0] > 0 and gc.get_freeze_count() == 0
    with pytest.raises(EdgeTransferError):
        adapt_mod.adapt(cfg)  # RUN_DIR exists, no --force
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        adapt_mod.adapt(dataclasses.replace(cfg, force=True))
        assert gc.get_freeze_count() > 0  # not unfrozen under the caller
    finally:
        gc.unfreeze()
