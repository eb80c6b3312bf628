"""RUN_DIR: where adapt's model lives and how the rest reads it back — the weights with the
manifest inside, the checkpoint beside it, the data folder it was adapted on, and the one
train/validation split every later command rebuilds from the manifest.

Floor 2: the eager model needs torch; it is imported by load_run and save_model alone so that
evaluate and report, which only need the split, start without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgetransfer import config
from edgetransfer.data import Dataset, scan
from edgetransfer.errors import ManifestError
from edgetransfer.fileio import atomic_write_bytes
from edgetransfer.manifest import ARTIFACTS, METADATA_KEY, Manifest, read_manifest

RUN_INFO = "run.json"


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
    )
    state, _ = read_state_dict(weights)
    load_strict(model, state, weights.name)
    return model.eval(), manifest


def run_data_dir(run_dir: str | os.PathLike) -> Path | None:
    """The DATA_DIR a RUN_DIR was adapted on, if recorded and still there."""
    try:
        info = json.loads((Path(run_dir) / RUN_INFO).read_text())
        path = Path(info["data_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return path if path.is_dir() else None


def run_split(data_dir: str | os.PathLike, manifest: Manifest) -> Dataset:
    """`data_dir` scanned and split as adapt split it: the manifest's val_fraction and seed."""
    return scan(
        data_dir,
        float(manifest.adapt.get("val_fraction", config.VAL_FRACTION)),
        int(manifest.adapt.get("seed", config.SEED)),
    )
