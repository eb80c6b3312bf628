"""RUN_DIR's eager model: the weights with the manifest inside, and the checkpoint beside them.
(The data folder a run was adapted on and its split live in data.py: they need no torch.)

Floor 2: the eager model needs torch; it is imported by load_run and save_model alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgetransfer import config
from edgetransfer.device import bundle_of
from edgetransfer.errors import ManifestError
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import ARTIFACTS, METADATA_KEY, Manifest, read_manifest


def checkpoint_path(out: Path) -> Path:
    """Where an interrupted adapt keeps its resumable state: beside RUN_DIR."""
    out = Path(out).absolute()
    return out.with_name(out.name + ".checkpoint")


def save_model(model, manifest: Manifest, path: Path) -> None:
    """The Classifier's weights as safetensors, with the manifest in the header metadata."""
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={METADATA_KEY: manifest.to_json()}))


def load_run(run_dir: str | os.PathLike):
    """The eager Classifier and its manifest from a RUN_DIR (or an EXPORT_DIR with weights)."""
    from edgetransfer.backbones import build_classifier, load_strict, read_state_dict

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    if bundle_of(manifest) is not None:
        raise ManifestError(
            f"{run_dir} was adapted on a backbone bundle and has no PyTorch model; export it "
            "(`edgetransfer export`) and use its model.onnx"
        )
    weights = run_dir / ARTIFACTS["weights"]
    if not weights.is_file():
        raise ManifestError(f"{run_dir} has no model.safetensors; is it a RUN_DIR from adapt?")
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
