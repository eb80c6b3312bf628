"""Bad input, faults and security (issue 7): every case ends in one clear line, the documented
exit code, and nothing written earlier damaged; no file from elsewhere runs code or is read."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image, ImageFile

from edgetransfer import fileio
from edgetransfer.backbones import SMALL, get_arch, read_state_dict
from edgetransfer.data import (
    DEFAULT_MAX_PIXELS,
    current_max_pixels,
    list_images,
    load_image,
    pixel_limit,
    preprocess,
    scan,
)
from edgetransfer.errors import (
    DataError,
    EdgeTransferWarning,
    InputError,
    ManifestError,
    OutputExistsError,
    WeightsError,
    printable,
)
from edgetransfer.manifest import METADATA_KEY, Manifest
from edgetransfer.runtime import OnnxClassifier

from .conftest import DIGITS, make_images, run


def adapt_args(data_dir, out, *extra):
    return ["adapt", data_dir, "--arch", "tiny_test", "--weights", "none", "--epochs", "2",
            "--out", out, "-q", *extra]  # fmt: skip


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's shape)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def pixels(path) -> np.ndarray:
    return np.asarray(load_image(path)).astype(int)


# ---------------------------------------------------------------------------------------------
# 1. content is sniffed, not trusted by extension


def test_png_named_jpg_decodes(tmp_path):
    (tmp_path / "x.jpg").write_bytes(encode(Image.new("RGB", (5, 4), (9, 99, 199)), "PNG"))
    assert pixels(tmp_path / "x.jpg")[0, 0].tolist() == [9, 99, 199]


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("empty.jpg", b"", "cannot identify image file"),
        ("text.jpg", b"hello, I am text", "cannot identify image file"),
        # an EPS named .jpg: Pillow would hand it to Ghostscript; it is not a decoded format
        ("eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\nshowpage\n", "cannot"),
    ],
)
def test_not_an_image_is_refused(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=rf"^{name}: not a readable image \({reason}"):
        load_image(tmp_path / name)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_but_partly_decodable_is_refused(tmp_path, fmt):
    rng = np.random.default_rng(0)
    full = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt)
    (tmp_path / "cut.img").write_bytes(full[: len(full) // 2])
    with Image.open(tmp_path / "cut.img") as im:  # the header is intact: it looks fine
        assert im.size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(DataError, match=r"^cut.img: not a readable image"):
        load_image(tmp_path / "cut.img")


def test_files_without_image_extension_are_sniffed(tmp_path):
    d = tmp_path / "cls"
    d.mkdir()
    red = Image.new("RGB", (6, 6), (255, 0, 0))
    (d / "IMG_0001").write_bytes(encode(red, "JPEG"))  # no extension
    (d / "photo.jpg_large").write_bytes(encode(red, "PNG"))  # mangled extension
    (d / "scan.dat").write_bytes(encode(red, "BMP"))
    (d / "notes.txt").write_text("not an image")
    (d / "BMW.txt").write_text("BMW cars are listed here, nothing else" * 3)
    (d / "README").write_bytes(b"")
    names = [p.name for p in list_images(d)]
    assert names == ["IMG_0001", "photo.jpg_large", "scan.dat"]
    for p in list_images(d):
        assert load_image(p).size == (6, 6)


def test_bad_files_are_listed_and_threshold_fails(colors, tmp_path):
    red = colors / "red"
    (red / "empty.jpg").write_bytes(b"")
    (red / "text.jpg").write_text("text")
    noise = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    (red / "cut.png").write_bytes(encode(Image.fromarray(noise), "PNG")[:2000])
    (red / "fine.jpg").write_bytes(encode(Image.new("RGB", (40, 30), (200, 40, 40)), "PNG"))
    res = run(*adapt_args(colors, tmp_path / "run", "--max-bad", "0.15"))
    assert res.exit_code == 0, res.output
    listed = (tmp_path / "run" / "bad_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(
        repr(str(red / n)) for n in ("empty.jpg", "text.jpg", "cut.png")
    )
    assert json.loads((tmp_path / "run" / "edgetransfer.json").read_text())["data"]["bad"] == 3
    # 3 of 28 is more than 10%: refused, and the earlier run is untouched
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    res = run(*adapt_args(colors, tmp_path / "run", "--force"))
    assert res.exit_code == 1
    assert res.output.startswith("Error: 3 of 28 images could not be read (more than --max-bad")
    assert len(res.output.splitlines()) == 1
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------------------------------
# 2. every Pillow mode becomes correct 8-bit RGB


def test_cmyk_colour(tmp_path):
    red = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    red.save(tmp_path / "c.tif")
    red.save(tmp_path / "c.jpg", quality=95)
    assert pixels(tmp_path / "c.tif")[0, 0].tolist() == [255, 0, 0]
    np.testing.assert_allclose(pixels(tmp_path / "c.jpg")[4, 4], [255, 0, 0], atol=8)


def test_palette_with_and_without_transparency(tmp_path):
    im = Image.new("P", (4, 2))
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putdata([0, 1, 0, 1, 0, 1, 0, 1])
    im.save(tmp_path / "opaque.png")
    im.save(tmp_path / "holes.png", transparency=0)
    im.save(tmp_path / "holes.gif", transparency=0)
    assert pixels(tmp_path / "opaque.png")[0, :2].tolist() == [[0, 0, 0], [255, 0, 0]]
    for name in ("holes.png", "holes.gif"):  # the transparent index shows the white background
        assert pixels(tmp_path / name)[0, :2].tolist() == [[255, 255, 255], [255, 0, 0]], name


def test_alpha_is_composited_onto_white(tmp_path):
    Image.new("RGBA", (2, 2), (0, 0, 0, 128)).save(tmp_path / "half.png")
    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "clear.png")
    Image.new("LA", (2, 2), (0, 255)).save(tmp_path / "solid.png")
    np.testing.assert_allclose(pixels(tmp_path / "half.png")[0, 0], [127, 127, 127], atol=1)
    assert pixels(tmp_path / "clear.png")[0, 0].tolist() == [255, 255, 255]
    assert pixels(tmp_path / "solid.png")[0, 0].tolist() == [0, 0, 0]


def test_32bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = (np.arange(64, dtype=np.int32).reshape(8, 8) * 10_000) - 100_000
    Image.fromarray(arr).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    out = pixels(tmp_path / "i.tif")
    assert out[0, 0].tolist() == [0, 0, 0] and out[-1, -1].tolist() == [255, 255, 255]
    assert (np.diff(out[..., 0].ravel()) >= 0).all() and len(np.unique(out)) == 64


def test_float_grayscale_with_nan_and_1bit(tmp_path):
    arr = np.array([[0.0, 0.5], [1.0, np.nan]], dtype=np.float32)
    Image.fromarray(arr, "F").save(tmp_path / "f.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value in cast" from the NaN
        out = pixels(tmp_path / "f.tif")[..., 0]
    assert out.tolist() == [[0, 128], [255, 0]]
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "b.png")
    assert pixels(tmp_path / "b.png").tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_exif_orientation_with_palette_and_pixel_order(tmp_path):
    arr = np.zeros((2, 3, 3), np.uint8)
    arr[0, 0] = (255, 0, 0)  # red top-left
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180
    Image.fromarray(arr).save(tmp_path / "r.png", exif=exif)
    out = pixels(tmp_path / "r.png")
    assert out.shape == (2, 3, 3) and out[-1, -1].tolist() == [255, 0, 0]


# ---------------------------------------------------------------------------------------------
# 3. decompression bombs: refused from the header, before any pixel is decoded


@pytest.fixture
def no_decoding(monkeypatch):
    def boom(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


@pytest.mark.parametrize(
    "size, message",
    [
        ((9000, 9000), r"^bomb.png: 9000x9000 exceeds --max-pixels 64000000; pass a larger"),
        ((100_000, 100_000), r"^bomb.png: refused as a decompression bomb \(Image size"),
    ],
)
def test_bomb_refused_before_decoding(tmp_path, no_decoding, size, message):
    (tmp_path / "bomb.png").write_bytes(png_claiming(*size))
    assert (tmp_path / "bomb.png").stat().st_size < 200
    with pytest.raises(DataError, match=message):
        load_image(tmp_path / "bomb.png")


def test_elongated_images_are_bounded(tmp_path, no_decoding):
    (tmp_path / "strip.png").write_bytes(png_claiming(1, 60_000))
    with pytest.raises(DataError, match=r"^strip.png: 1x60000 is too elongated \(over 1000:1\)"):
        load_image(tmp_path / "strip.png")


def test_pixel_limit_scopes_the_default(tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    assert current_max_pixels() == DEFAULT_MAX_PIXELS
    with pixel_limit(5000):
        with pytest.raises(DataError, match="100x100 exceeds --max-pixels 5000"):
            load_image(tmp_path / "big.png")
        with pixel_limit(None):  # None keeps the limit in force
            assert current_max_pixels() == 5000
        assert load_image(tmp_path / "big.png", max_pixels=10_000).size == (100, 100)
    assert current_max_pixels() == DEFAULT_MAX_PIXELS
    assert load_image(tmp_path / "big.png").size == (100, 100)


def test_global_max_pixels_reaches_predict(digits_export, tmp_path):
    Image.new("RGB", (100, 100)).save(tmp_path / "big.png")
    msg = "Error: big.png: 100x100 exceeds --max-pixels 5000; pass a larger --max-pixels if the "
    res = run("--max-pixels", "5000", "predict", digits_export, tmp_path / "big.png")
    assert res.exit_code == 1 and res.output.startswith(msg)
    res = run(
        "predict", digits_export, tmp_path / "big.png", env={"EDGETRANSFER_MAX_PIXELS": "5000"}
    )
    assert res.exit_code == 1 and res.output.startswith(msg)
    assert current_max_pixels() == DEFAULT_MAX_PIXELS  # restored after the command
    assert run("predict", digits_export, tmp_path / "big.png").exit_code == 0


def test_adapt_max_pixels_lists_refused_images_and_cache_respects_it(colors, tmp_path):
    Image.new("RGB", (100, 100), (200, 40, 40)).save(colors / "red" / "zz_big.png")
    res = run(*adapt_args(colors, tmp_path / "a", "--max-pixels", "2000", "--max-bad", "0.2"))
    assert res.exit_code == 0, res.output
    assert (
        "zz_big.png: 100x100 exceeds --max-pixels 2000"
        in (tmp_path / "a" / "bad_files.txt").read_text()
    )
    # the same data without the limit must not reuse the cached verdict
    res = run(*adapt_args(colors, tmp_path / "b"))
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "b" / "bad_files.txt").exists()


# ---------------------------------------------------------------------------------------------
# 4. hidden entries, symlinks, names that are not UTF-8


def test_hidden_entries_never_become_classes_or_samples(colors):
    (colors / ".ipynb_checkpoints").mkdir()
    make_images(colors / ".ipynb_checkpoints", per_class=1)
    (colors / "red" / "._x.jpg").write_bytes(encode(Image.new("RGB", (4, 4)), "JPEG"))
    (colors / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (colors / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    ds = scan(colors)
    assert ds.classes == ["blue", "green", "red"] and len(ds.samples) == 24


def test_symlinked_classes_subfolders_and_files_are_followed(tmp_path):
    elsewhere = make_images(tmp_path / "elsewhere", per_class=2)
    d = make_images(tmp_path / "d", per_class=2, classes={"red": (200, 0, 0)})
    (d / "blue").symlink_to(elsewhere / "blue", target_is_directory=True)
    (d / "red" / "more").symlink_to(elsewhere / "green", target_is_directory=True)
    (d / "red" / "link.png").symlink_to(elsewhere / "red" / "00.png")
    ds = scan(d)
    assert ds.classes == ["blue", "red"]
    names = sorted(os.path.relpath(s.path, d) for s in ds.samples if s.label == 1)
    assert names == ["red/00.png", "red/01.png", "red/link.png", "red/more/00.png",
                     "red/more/01.png"]  # fmt: skip


def test_symlink_loop_is_detected_and_warned(colors, tmp_path):
    (colors / "red" / "sub").mkdir()
    (colors / "red" / "sub" / "up").symlink_to(colors / "red", target_is_directory=True)
    with pytest.warns(EdgeTransferWarning) as caught:
        found = list_images(colors / "red")
    assert len(found) == 8 and len(caught) == 1
    assert str(caught[0].message) == (
        f"{colors / 'red' / 'sub' / 'up'} leads to a folder already read (a symlink loop or a "
        "second link to it); skipped"
    )
    res = run(*adapt_args(colors, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    warned = [x for x in res.output.splitlines() if x.startswith("Warning: ")]
    assert warned == [f"Warning: {caught[0].message}"]
    assert (
        json.loads((tmp_path / "run" / "edgetransfer.json").read_text())["data"]["train"]
        + json.loads((tmp_path / "run" / "edgetransfer.json").read_text())["data"]["val"]
        == 24
    )


def test_dangling_symlink_is_a_bad_file(colors):
    (colors / "red" / "gone.png").symlink_to(colors / "nowhere.png")
    assert colors / "red" / "gone.png" in list_images(colors / "red")
    with pytest.raises(DataError, match=r"^gone.png: not a readable image \(\[Errno 2\]"):
        load_image(colors / "red" / "gone.png")


def _bytes_path(folder: Path, name: bytes) -> bytes:
    return os.path.join(os.fsencode(folder), name)


def test_non_utf8_file_names_are_handled_and_printed_safely(colors, tmp_path, digits_export):
    red = os.fsencode(colors / "red")
    with open(os.path.join(red, b"caf\xe9.png"), "wb") as f:
        f.write(encode(Image.new("RGB", (40, 30), (200, 40, 40)), "PNG"))
    with open(os.path.join(red, b"bad\xff.jpg"), "wb") as f:
        f.write(b"text")
    res = run(*adapt_args(colors, tmp_path / "run", "--max-bad", "0.2"))
    assert res.exit_code == 0, res.output
    listing = (tmp_path / "run" / "bad_files.txt").read_bytes().decode("utf-8")  # valid UTF-8
    assert "bad\\udcff.jpg" in listing and "bad\\xff.jpg: not a readable image" in listing
    # predict prints the file name as its own bytes (like ls), and never crashes
    res = run("predict", digits_export, os.fsdecode(os.path.join(red, b"caf\xe9.png")))
    assert res.exit_code == 0, res.output
    assert b"caf\xe9.png: " in res.stdout_bytes
    res = run("predict", digits_export, os.fsdecode(os.path.join(red, b"bad\xff.jpg")))
    assert res.exit_code == 1
    assert res.output.startswith("Error: bad\\xff.jpg: not a readable image (cannot identify")
    assert len(res.output.splitlines()) == 1


def test_non_utf8_class_folder_is_one_line_error(colors):
    os.mkdir(_bytes_path(colors, b"caf\xe9"))
    res = run("adapt", colors, "--arch", "tiny_test", "--weights", "none")
    assert res.exit_code == 1
    assert res.output == (
        f"Error: class folder {colors}/caf\\xe9 has a name that is not valid UTF-8; rename it "
        "(class names become the model's labels)\n"
    )


def test_printable():
    assert printable(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert printable("caf\u00e9 \ud800") == "caf\u00e9 \\ud800"


# ---------------------------------------------------------------------------------------------
# 5. degenerate datasets and images


def test_class_with_no_readable_images(colors, tmp_path):
    (colors / "yellow").mkdir()
    for i in range(2):
        (colors / "yellow" / f"{i}.jpg").write_bytes(b"junk")
    res = run(*adapt_args(colors, tmp_path / "run", "--max-bad", "0.5"))
    assert res.exit_code == 1
    assert res.output == "Error: no readable training images for class(es): yellow\n"


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p.mkdir(), "Error: data folder {p} is empty; put one sub-folder"),
        (lambda p: make_images(p, classes={"red": (1, 2, 3)}), "Error: {p} has only one class"),
        (
            lambda p: (make_images(p / "train"), make_images(p / "val", classes={"x": (0, 0, 0)})),
            "Error: val/ has classes that train/ lacks: x;",
        ),
    ],
)
def test_degenerate_datasets_through_cli(tmp_path, setup, message):
    p = tmp_path / "data"
    setup(p)
    res = run(*adapt_args(p, tmp_path / "run"))
    assert res.exit_code == 1 and res.output.startswith(message.format(p=p))
    assert len(res.output.splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("size", [(1, 1), (1000, 2), (2, 1000), (3, 1)])
def test_tiny_and_elongated_images_preprocess_to_the_right_shape(size):
    from edgetransfer.data import eval_transform

    img = Image.new("RGB", size, (10, 20, 30))
    assert preprocess(img, SMALL).shape == (3, 32, 32)
    assert tuple(eval_transform(SMALL)(img).shape) == (3, 32, 32)


def test_tiny_and_elongated_images_through_adapt_and_predict(colors, tmp_path, digits_export):
    odd = {"one.png": (1, 1), "wide.png": (1000, 2), "tall.png": (2, 1000)}
    for name, size in odd.items():
        Image.new("RGB", size, (200, 40, 40)).save(colors / "red" / name)
    res = run(*adapt_args(colors, tmp_path / "run", "--max-bad", "0"))
    assert res.exit_code == 0, res.output
    res = run("predict", digits_export, *[colors / "red" / n for n in odd], "--json")
    assert res.exit_code == 0, res.output
    assert len(res.output.splitlines()) == 3


# ---------------------------------------------------------------------------------------------
# 6-7. model files: no code runs, truncated files are one line


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_through_cli_never_runs(colors, tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": _Payload(str(marker))}, f)
    res = run(*adapt_args(colors, tmp_path / "run")[:4], "--weights", tmp_path / "evil.pth")
    assert res.exit_code == 1
    assert res.output.startswith(
        f"Error: refused to load {tmp_path / 'evil.pth'}: it holds more than tensors, and loading "
        "it could run code"
    )
    assert not marker.exists() and not (tmp_path / "run").exists()


@pytest.fixture
def tiny_weights(tmp_path):
    from safetensors.torch import save_file

    state = get_arch("tiny_test").build(3).state_dict()
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    return tmp_path


@pytest.mark.parametrize(
    "name, message",
    [
        ("w.safetensors", r"w.safetensors is not a valid safetensors file"),
        ("w.pth", r"w.pth is not a readable weights file"),
    ],
)
def test_truncated_weights_are_one_line(tiny_weights, name, message):
    path = tiny_weights / name
    read_state_dict(path)  # whole: fine
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match=message) as e:
        read_state_dict(path)
    assert "\n" not in str(e.value)
    res = run(
        "adapt", DIGITS, "--arch", "tiny_test", "--weights", path, "--out", tiny_weights / "r"
    )
    assert res.exit_code == 1 and len(res.output.splitlines()) == 1
    assert res.output.startswith("Error: ") and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# 8. ONNX external data may not point outside the model's folder


def _external_model(folder: Path, location: str | None) -> Path:
    """A small classifier whose weight lives in external data at `location` (None: w.bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    manifest = Manifest(arch="tiny_test", labels=["a", "b"], preprocessing=SMALL)
    helper.set_model_props(model, {METADATA_KEY: manifest.to_json()})
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    if location is not None:
        model = onnx.load(str(path), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save_model(model, path)
    return path


@pytest.fixture
def outside(tmp_path, monkeypatch):
    """A file outside every model folder, with valid weights in it; any Python-level open of it,
    or any onnxruntime session, fails the test."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(6, dtype=np.float32).tobytes())
    opened = []

    def hook(event, args):
        if event == "open" and args and str(args[0]).endswith("secret.bin"):
            opened.append(args[0])

    sys.addaudithook(hook)
    import onnxruntime

    def no_session(*a, **k):
        raise AssertionError("an onnxruntime session was created")

    yield secret, opened, lambda: monkeypatch.setattr(onnxruntime, "InferenceSession", no_session)
    opened.append(None)  # the hook cannot be removed; past this it records nothing we check


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("command", ["predict", "info"])
def test_external_data_outside_folder_is_refused(tmp_path, outside, kind, command):
    secret, opened, forbid_sessions = outside
    folder = tmp_path / "exp"
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[kind]
    path = _external_model(folder, location)
    if kind == "symlink":
        (folder / "link.bin").symlink_to(secret)
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    forbid_sessions()
    args = ["predict", path, tmp_path / "x.png"] if command == "predict" else ["info", path]
    res = run(*args)
    assert res.exit_code == 1
    assert res.output == (
        f"Error: model.onnx refers to external data outside its folder ({location!r}); "
        "refusing to load it\n"
    )
    assert opened == []


def test_external_data_inside_folder_still_works(tmp_path):
    """The control: the same model with its data beside it loads and answers."""
    path = _external_model(tmp_path / "exp", None)
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "x.png")
    res = run("predict", path, tmp_path / "x.png", "--json")
    assert res.exit_code == 0, res.output
    assert run("info", path).exit_code == 0


def test_external_data_in_a_constant_node_is_checked(tmp_path):
    from edgetransfer.onnxio import check_external_data

    path = _external_model(tmp_path / "exp", None)
    model = onnx.load(str(path), load_external_data=False)
    const = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    const.data_location = TensorProto.EXTERNAL
    const.ClearField("float_data")
    entry = const.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    model.graph.node.append(helper.make_node("Constant", [], ["c"], value=const))
    onnx.save_model(model, path)
    with pytest.raises(ManifestError, match=r"outside its folder \('../../etc/passwd'\)"):
        check_external_data(path)


# ---------------------------------------------------------------------------------------------
# 9. onnxruntime input errors are ours, naming expected vs got


@pytest.mark.parametrize(
    "model, batch, got",
    [
        ("model.onnx", np.zeros((2, 32, 32), np.float32), "float32 (2, 32, 32)"),  # grayscale
        ("model.onnx", np.zeros((1, 1, 32, 32), np.float32), "float32 (1, 1, 32, 32)"),
        ("model.onnx", np.zeros((1, 3, 16, 16), np.float32), "float32 (1, 3, 16, 16)"),
        ("model.onnx", np.zeros((1, 3, 32, 32), np.uint8), "uint8 (1, 3, 32, 32)"),
        ("model.raw.onnx", np.zeros((1, 32, 32, 3), np.float32), "float32 (1, 32, 32, 3)"),
        ("model.raw.onnx", np.zeros((1, 3, 32, 32), np.uint8), "uint8 (1, 3, 32, 32)"),
    ],
)
def test_wrong_batches_raise_input_error(digits_export, model, batch, got):
    clf = OnnxClassifier(digits_export / model)
    want = (
        "'image' as uint8 [N, 32, 32, 3] (uint8 NHWC RGB pixels)"
        if clf.raw
        else "'input' as float32 [N, 3, 32, 32] (normalised NCHW RGB)"
    )
    with pytest.raises(InputError) as e:
        clf.logits(batch)
    assert str(e.value) == f"{model} expects input {want}; got {got}"


def test_float64_batch_is_accepted_and_grayscale_image_predicts(digits_export, tmp_path):
    clf = OnnxClassifier(digits_export / "model.onnx")
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32))
    np.testing.assert_allclose(clf.logits(x), clf.logits(x.astype(np.float32)), rtol=0, atol=0)
    Image.new("L", (20, 20), 128).save(tmp_path / "gray.png")
    Image.new("I;16", (20, 20), 3000).save(tmp_path / "deep.png")
    res = run("predict", digits_export, tmp_path / "gray.png", tmp_path / "deep.png")
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------------------------------
# 10. atomic replacement, crash mid-write, stale temps


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(fileio.TMP_PREFIX)]


def test_crash_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "parity.json"
    fileio.atomic_write_text(target, "old")

    def crash(*a, **k):
        raise KeyboardInterrupt  # the process is stopped between write and rename

    monkeypatch.setattr(fileio.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        fileio.atomic_write_text(target, "new")
    assert target.read_text() == "old" and _temps(tmp_path) == []


def test_full_disk_keeps_old_file_and_names_it(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    fileio.atomic_write_bytes(target, b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(OSError) as e:
        fileio.atomic_write_bytes(target, b"new" * 1000)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
    assert target.read_bytes() == b"old" and _temps(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_of_dead_runs_are_cleaned_up(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale_file = tmp_path / f"{fileio.TMP_PREFIX}{dead}-abc123"
    stale_dir = tmp_path / f"{fileio.TMP_PREFIX}{dead}-def456"
    live_file = tmp_path / f"{fileio.TMP_PREFIX}{alive}-ghi789"
    stale_file.write_bytes(b"half a model")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"half")
    live_file.write_bytes(b"another run is writing this")
    fileio.atomic_write_text(tmp_path / "labels.txt", "a\n")
    assert sorted(_temps(tmp_path)) == [live_file]


def test_folder_caught_mid_swap_is_put_back(tmp_path):
    dead = _dead_pid()
    moved = tmp_path / f"{fileio.TMP_PREFIX}{dead}-old-run"  # killed between the two renames
    moved.mkdir()
    (moved / "model.safetensors").write_bytes(b"the only copy")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        with fileio.output_dir(tmp_path / "run", force=False):
            pass
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == b"the only copy"
    # a leftover whose place is taken (the swap finished) is just removed
    leftover = tmp_path / f"{fileio.TMP_PREFIX}{dead}-old-run"
    leftover.mkdir()
    with fileio.output_dir(tmp_path / "other", force=False) as tmp:
        (tmp / "x").write_text("x")
    assert _temps(tmp_path) == [] and (tmp_path / "run" / "model.safetensors").exists()


def test_output_dir_failures_leave_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    fileio.write_marker(out)  # a folder edgetransfer wrote: --force may replace it
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with fileio.output_dir(out, force=True) as tmp:
            (tmp / "keep.txt").write_text("new")
            raise RuntimeError("training diverged")
    assert (out / "keep.txt").read_text() == "mine" and _temps(tmp_path) == []
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(fileio.os, "replace", second_rename_fails)
    with pytest.raises(OSError):
        with fileio.output_dir(out, force=True) as tmp:
            (tmp / "keep.txt").write_text("new")
    assert (out / "keep.txt").read_text() == "mine" and _temps(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 13. a full disk or a read-only folder is one line, and earlier artifacts stay valid


@pytest.mark.parametrize(
    "err, message",
    [
        (errno.ENOSPC, "no space left on device while writing {f}; free some space and run again"),
        (errno.EROFS, "read-only file system: cannot write {f}; choose a writable --out"),
        (errno.EACCES, "permission denied: {f}"),
    ],
)
def test_disk_errors_are_one_line_and_old_run_survives(colors, tmp_path, monkeypatch, err, message):
    out = tmp_path / "run"
    assert run(*adapt_args(colors, out, "--no-cache")).exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def fail(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(fileio.os, "fsync", fail)
    res = run(*adapt_args(colors, out, "--no-cache", "--force"))
    assert res.exit_code == 1
    pattern = re.escape("Error: " + message) + "\n"
    m = re.fullmatch(pattern.replace(re.escape("{f}"), "(\\S+)"), res.output)
    assert m, res.output
    # the file the user would recognise (in or beside RUN_DIR), never our temp name
    assert m[1].startswith(str(out)) and fileio.TMP_PREFIX not in m[1]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _temps(tmp_path) == []
