"""RUN_DIR's eager model: the weights with the manifest inside, and the checkpoint beside them.
(The data folder a run was adapted on and its split live in data.py: they need no torch.)

Two kinds of run (docs/artifacts.md): a PyTorch run keeps its whole model (model.safetensors);
a run adapted on a backbone bundle keeps only its head (head.safetensors), and its eager model
is the bundle's architecture with the weights the bundle was made from (sha256-checked) and
that head.

Floor 2: the eager model needs torch; it is imported by load_run and save_model alone.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from edgetransfer import config
from edgetransfer.device import bundle_of, load_head
from edgetransfer.errors import ManifestError, WeightsError
from edgetransfer.fileio import atomic_write_bytes, sha256_file
from edgetransfer.manifest import ARTIFACTS, METADATA_KEY, RUN_INFO, Manifest, read_manifest


def checkpoint_path(out: Path) -> Path:
    """Where an interrupted adapt keeps its resumable state: beside RUN_DIR."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".checkpoint")


def save_model(model, manifest: Manifest, path: Path) -> None:
    """The Classifier's weights as safetensors, with the manifest in the header metadata."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={METADATA_KEY: manifest.to_json()}))


def load_run(run_dir: str | os.PathLike, source_weights: str | None = None):
    """The eager Classifier and its manifest from a RUN_DIR (or an EXPORT_DIR with weights).

    Args:
        source_weights: for a run adapted on a backbone bundle without model.safetensors: the
            weights the bundle was made from (imagenet or a file) [default: those run.json
            records, or imagenet when the bundle was made from them].
    """
    from edgetransfer.backbones import build_classifier, load_strict, read_state_dict

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    weights = run_dir / ARTIFACTS["weights"]
    if not weights.is_file() and bundle_of(manifest) is not None:
        return _bundle_run_model(run_dir, manifest, source_weights), manifest
    if not weights.is_file():
        raise _no_model(run_dir)
    source_classes = (
        len(manifest.source.get("labels") or []) if "source_output" in manifest.io else None
    )
    model = build_classifier(
        manifest.arch,
        len(manifest.labels),
        manifest.adapt.get("truncate"),
        manifest.preprocessing,
        source_classes,
        manifest.adapt.get("features") or config.FEATURE,
        tuple(manifest.adapt.get("taps") or ()),
    )
    state, _ = read_state_dict(weights)
    load_strict(model, state, weights.name)
    return model.eval(), manifest


def _no_model(run_dir: Path) -> ManifestError:
    return ManifestError(f"{run_dir} has no model.safetensors; is it a RUN_DIR from adapt?")


def weights_id(run_dir: str | os.PathLike) -> str:
    """sha256 identifying a RUN_DIR's trained model by content: its model.safetensors, or for a
    run adapted on a backbone bundle, its head with the sha256 of the bundle and of the source
    weights the manifest records."""
    run_dir = Path(run_dir)
    weights = run_dir / ARTIFACTS["weights"]
    if weights.is_file():
        return sha256_file(weights)
    manifest = read_manifest(run_dir)
    bundle = bundle_of(manifest)
    if bundle is None:
        raise _no_model(run_dir)
    parts = [sha256_file(run_dir / ARTIFACTS["head"]), bundle["sha256"]]
    parts.append(str(manifest.source.get("sha256")))
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def _bundle_run_model(run_dir: Path, manifest: Manifest, source_weights: str | None):
    """A bundle run's eager Classifier: its architecture with the source weights (their sha256
    must be the manifest's) and the head of head.safetensors."""
    import torch

    from edgetransfer.backbones import Classifier, source_backbone

    weight, bias = load_head(run_dir / ARTIFACTS["head"], manifest)
    source = manifest.source
    chosen = source_weights or recorded_weights(run_dir)
    if chosen is None and source.get("weights") == "imagenet":
        chosen = "imagenet"
    if chosen is None:
        raise WeightsError(
            f"{run_dir} was adapted on a backbone bundle: its PyTorch model needs the weights "
            f"the bundle was made from ({source.get('file') or source.get('weights')}, sha256 "
            f"{str(source.get('sha256'))[:12]}...): pass them with export's or verify's "
            "--eager-weights PATH, or use the exported model.onnx"
        )
    _, module, provenance = source_backbone(manifest.arch, chosen)
    if provenance["sha256"] != source.get("sha256"):
        raise WeightsError(
            f"{chosen} are not the weights the bundle was made from (their sha256 differs from "
            "the manifest's source.sha256); pass those with --eager-weights PATH"
        )
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight.astype("float32")))
        head.bias.copy_(torch.from_numpy(bias.astype("float32")))
    return Classifier(module.features, head).eval()


def eager_here(run_dir: str | os.PathLike) -> bool:
    """Whether a run adapted on the cached bundle (run.json records the weights it was made
    from) has its eager model here: PyTorch is installed, so load_run rebuilds it. Such a run
    then exports, predicts and teaches as a PyTorch run does."""
    import importlib.util

    has_torch = importlib.util.find_spec("torch") is not None
    return has_torch and recorded_weights(Path(run_dir)) is not None


def recorded_weights(run_dir: Path) -> str | None:
    """The --weights a run adapted on a cached bundle was given (run.json), if any."""
    try:
        weights = json.loads((run_dir / RUN_INFO).read_text()).get("weights")
    except (OSError, ValueError, AttributeError):
        return None
    return weights if isinstance(weights, str) and weights != "none" else None
