import pickle
import urllib.error

import pytest
import torch
from safetensors.torch import save_file

from edgetransfer import backbones
from edgetransfer.backbones import ARCHS, build_classifier, get_arch, load_source, read_state_dict
from edgetransfer.errors import ArchError, WeightsError

from .conftest import SOURCE


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ArchError) as e:
        get_arch("resnet9000")
    assert str(e.value) == (
        "unknown architecture 'resnet9000'; choose one of: " + ", ".join(sorted(ARCHS))
    )


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_every_arch_splits_into_features_and_head(name):
    spec = get_arch(name)
    size = 32 if spec.preprocessing.input_size[0] == 32 else 64  # small input keeps it fast
    model = build_classifier(name, 3).eval()
    with torch.no_grad():
        feats = model.features(torch.randn(2, 3, size, size))
        out = model(torch.randn(2, 3, size, size))
    assert feats.ndim == 2 and feats.shape[1] == model.head.in_features
    assert out.shape == (2, 3)


def test_source_file_carries_labels_and_preprocessing():
    src = load_source("simple_cnn", str(SOURCE))
    assert src.labels == ["zero", "one", "two", "three", "four"]
    assert src.preprocessing.input_size == (32, 32)
    assert src.provenance["weights"] == "file" and len(src.provenance["sha256"]) == 64


def test_source_file_for_other_arch_is_refused():
    with pytest.raises(
        WeightsError, match="holds a simple_cnn model, not tiny_test; pass --arch simple_cnn"
    ):
        load_source("tiny_test", str(SOURCE))


def test_plain_state_dict_pth_loads(tmp_path):
    model = get_arch("tiny_test").build(7)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    src = load_source("tiny_test", str(tmp_path / "w.pth"))
    assert src.model.classifier.out_features == 7
    torch.testing.assert_close(src.model.state_dict(), model.state_dict())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"w": _Payload(str(marker))}, f)
    with pytest.raises(
        WeightsError,
        match=r"^refused to load .*evil.pth: it holds more than "
        "tensors, and loading it could run code",
    ):
        load_source("tiny_test", str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_wrong_keys_listed_in_one_line(tmp_path):
    state = get_arch("tiny_test").build(3).state_dict()
    state.pop("features.1.running_mean")
    state["features.9.weight"] = torch.zeros(1)
    state["features.0.weight"] = torch.zeros(8, 3, 5, 5)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(WeightsError) as e:
        load_source("tiny_test", str(tmp_path / "w.safetensors"))
    assert str(e.value) == (
        "w.safetensors does not match the architecture; missing: features.1.running_mean; "
        "unexpected: features.9.weight; shape: features.0.weight (8, 3, 5, 5) vs (8, 3, 3, 3)"
    )


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(WeightsError, match="is not a valid safetensors file"):
        read_state_dict(tmp_path / "w.safetensors")


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist; pass imagenet, none or a path"):
        load_source("tiny_test", str(tmp_path / "nope.pth"))


def test_imagenet_without_network_says_how_to_pass_a_file(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as e:
        load_source("mobilenet_v3_small", "imagenet")
    msg = str(e.value)
    assert msg.startswith(
        "cannot get ImageNet weights for mobilenet_v3_small ([Errno -3] "
        "Temporary failure in name resolution); without network, download https://"
    )
    assert msg.endswith("and pass it with --weights PATH")


def test_imagenet_weights_load_through_torchvision(monkeypatch):
    state = get_arch("mobilenet_v3_small").build(1000).state_dict()
    calls = {}

    def cached(url, **kw):
        calls.update(kw, url=url)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    src = load_source("mobilenet_v3_small", "imagenet")
    assert calls["weights_only"] is True and calls["check_hash"] is True
    assert len(src.labels) == 1000 and src.labels[0] == "tench"


def test_no_imagenet_weights_for_simple_cnn():
    with pytest.raises(WeightsError, match="simple_cnn has no ImageNet weights"):
        load_source("simple_cnn", "imagenet")


def test_run_dir_weights_map_back_to_source_layout(digits_run):
    src = load_source("simple_cnn", str(digits_run / "model.safetensors"))
    assert src.model.classifier[4].out_features == 5
    assert backbones.split(src.spec, src.model)[1].out_features == 5
