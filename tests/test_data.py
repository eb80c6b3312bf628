import io

import numpy as np
import pytest
from PIL import Image

from edgetransfer.data import eval_transform, load_image, preprocess, scan
from edgetransfer.errors import DataError
from edgetransfer.manifest import Preprocessing

from .conftest import make_images


def test_scan_splits_each_class_and_is_seeded(colors):
    ds = scan(colors, val_fraction=0.25, seed=0)
    assert ds.classes == ["blue", "green", "red"]
    for label in range(3):
        in_class = [s for s in ds.samples if s.label == label]
        assert len(in_class) == 8
        assert sum(s.split == "val" for s in in_class) == 2
    again = scan(colors, val_fraction=0.25, seed=0)
    assert [(s.path, s.split) for s in again.samples] == [(s.path, s.split) for s in ds.samples]
    other = scan(colors, val_fraction=0.25, seed=1)
    assert {s.path for s in other.split("val")} != {s.path for s in ds.split("val")}
    assert ds.fingerprint() == again.fingerprint() != other.fingerprint()


def test_scan_uses_train_and_val_folders(tmp_path):
    make_images(tmp_path / "d" / "train", per_class=4)
    make_images(tmp_path / "d" / "val", per_class=2, classes={"red": (200, 0, 0)})
    ds = scan(tmp_path / "d")
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds.split("train")) == 12
    assert [ds.classes[s.label] for s in ds.split("val")] == ["red", "red"]


def test_scan_ignores_hidden_entries(colors):
    (colors / ".ipynb_checkpoints").mkdir()
    (colors / "__MACOSX").mkdir()
    (colors / "red" / ".DS_Store").write_bytes(b"\0")
    (colors / "red" / "._00.png").write_bytes(b"junk")
    (colors / "red" / "Thumbs.db").write_bytes(b"junk")
    ds = scan(colors)
    assert ds.classes == ["blue", "green", "red"]
    assert len(ds.samples) == 24


@pytest.mark.parametrize(
    "setup, message",
    [
        (
            lambda p: None,
            "data folder {p} does not exist; pass a folder with one sub-folder of images per class",
        ),
        (
            lambda p: p.mkdir(),
            "data folder {p} is empty; put one sub-folder of images per class in it",
        ),
        (
            lambda p: make_images(p, classes={"red": (255, 0, 0)}),
            "{p} has only one class (red); at least 2 class folders needed",
        ),
    ],
)
def test_scan_errors(tmp_path, setup, message):
    p = tmp_path / "data"
    setup(p)
    with pytest.raises(DataError) as e:
        scan(p)
    assert str(e.value) == message.format(p=p)


def test_scan_empty_class_folder(colors):
    (colors / "yellow").mkdir()
    (colors / "yellow" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"^class folder\(s\) with no images: yellow; add images"):
        scan(colors)


def test_scan_val_class_missing_from_train(tmp_path):
    make_images(tmp_path / "train", per_class=2)
    make_images(tmp_path / "val", per_class=1, classes={"purple": (120, 0, 120)})
    with pytest.raises(DataError, match="val/ has classes that train/ lacks: purple"):
        scan(tmp_path)


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG", **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "I;16", "CMYK", "RGB"])
def test_load_image_any_mode_becomes_rgb(tmp_path, mode):
    im = Image.new("RGB", (10, 6), (10, 200, 30)).convert(mode)
    path = tmp_path / "x.tif" if mode == "CMYK" else tmp_path / "x.png"
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (10, 6)


def test_load_image_16bit_is_scaled_not_clipped(tmp_path):
    arr = np.linspace(0, 4000, 64, dtype=np.uint16).reshape(8, 8)
    im = Image.fromarray(arr)
    assert im.mode == "I;16"
    im.save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out[..., 0])) > 32


def test_load_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    im.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


def test_load_image_transparent_onto_white(tmp_path):
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "t.png")
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255


@pytest.mark.parametrize("content", [b"", b"this is text", None])
def test_load_image_bad_files(tmp_path, content):
    p = tmp_path / "bad.jpg"
    if content is None:  # a truncated PNG
        content = _png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60]
    p.write_bytes(content)
    with pytest.raises(DataError, match=r"^bad.jpg: not a readable image"):
        load_image(p)


def test_load_image_pixel_limit(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    with pytest.raises(DataError, match="100x100 exceeds --max-pixels 5000"):
        load_image(tmp_path / "big.png", max_pixels=5000)


@pytest.mark.parametrize("size", [(37, 53), (64, 32), (32, 32), (300, 200), (1, 1)])
def test_numpy_preprocess_matches_torchvision(size):
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    p = Preprocessing(input_size=(24, 24), resize=28, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    want = eval_transform(p)(img).numpy()
    got = preprocess(img, p)
    assert got.shape == (3, 24, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
