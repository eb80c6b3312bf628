import json

import pytest

from edgetransfer.errors import ManifestError
from edgetransfer.manifest import Manifest, Preprocessing, read_manifest

P = Preprocessing(input_size=(32, 32), resize=36, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def test_roundtrip():
    m = Manifest(arch="tiny_test", labels=["a", "b"], preprocessing=P, metrics={"val_top1": 1.0})
    again = Manifest.from_json(m.to_json())
    assert again == m
    assert json.loads(m.to_json())["preprocessing"]["input_size"] == [32, 32]


def test_with_size_keeps_ratio():
    imagenet = Preprocessing(input_size=(224, 224), resize=256, mean=(0,) * 3, std=(1,) * 3)
    assert imagenet.with_size(160).resize == 183


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(schema=2), "manifest schema 2 is not supported"),
        (lambda d: d.update(labels=[]), "manifest has no valid 'labels' list"),
        (lambda d: d.pop("arch"), "manifest has no 'arch'"),
        (lambda d: d["preprocessing"].update(resize=8), "resize smaller than input_size"),
        (lambda d: d["preprocessing"].pop("mean"), "invalid preprocessing"),
        (lambda d: d.update(metrics=[1]), "manifest section 'metrics' is not an object"),
    ],
)
def test_invalid_manifests(mutate, message):
    d = Manifest(arch="tiny_test", labels=["a", "b"], preprocessing=P).to_dict()
    mutate(d)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(d)


def test_not_json():
    with pytest.raises(ManifestError, match="manifest is not valid JSON"):
        Manifest.from_json("{nope")


@pytest.mark.parametrize(
    "name", ["model.onnx", "model.pt", "model.safetensors", ".", "edgetransfer.json"]
)
def test_every_artifact_carries_the_manifest(digits_export, name):
    m = read_manifest(digits_export / name)
    assert m.labels == ["eight", "five", "nine", "seven", "six"]
    assert m.arch == "simple_cnn" and m.preprocessing.input_size == (32, 32)
    assert m.source["labels"] == ["zero", "one", "two", "three", "four"]


def test_labels_txt(digits_export):
    assert (digits_export / "labels.txt").read_text().split() == read_manifest(digits_export).labels


def test_artifact_without_manifest(tmp_path):
    (tmp_path / "x.onnx").write_bytes(b"not onnx")
    with pytest.raises(ManifestError, match="x.onnx is not a readable ONNX model"):
        read_manifest(tmp_path / "x.onnx")
    with pytest.raises(ManifestError, match="has no edgetransfer.json; is it a RUN_DIR"):
        read_manifest(tmp_path)
