"""Orchestrates data + backbone + head training into a RUN_DIR."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgetransfer.errors import DataError
from edgetransfer.manifest import MANIFEST_NAME, METADATA_KEY, Manifest

DEFAULT_ARCH = "mobilenet_v3_small"
RUN_INFO = "run.json"


@dataclass(frozen=True)
class AdaptConfig:
    """Everything `adapt` needs; the CLI fills it from its options."""

    data_dir: Path
    out: Path
    arch: str = DEFAULT_ARCH
    weights: str = "imagenet"
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-2
    image_size: int | None = None
    val_fraction: float = 0.2
    seed: int = 0
    max_bad: float = 0.1
    force: bool = False
    use_cache: bool = True
    progress: bool = False


@dataclass(frozen=True)
class AdaptResult:
    run_dir: Path
    manifest: Manifest
    bad_files: list[tuple[Path, str]]


def adapt(cfg: AdaptConfig) -> AdaptResult:
    """Freeze the backbone, extract features once, train a new head, write RUN_DIR."""
    import torch

    from edgetransfer.backbones import Classifier, get_arch, load_source, split
    from edgetransfer.data import scan
    from edgetransfer.features import extract
    from edgetransfer.fileio import atomic_write_text, check_can_write, output_dir
    from edgetransfer.manifest import versions
    from edgetransfer.train import TrainConfig, train_head

    get_arch(cfg.arch)  # fail on a bad name before any work
    check_can_write(cfg.out, cfg.force)
    dataset = scan(cfg.data_dir, cfg.val_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)  # before building: --weights none must be reproducible
    source = load_source(cfg.arch, cfg.weights)
    pre = source.preprocessing or source.spec.preprocessing
    if cfg.image_size:
        pre = pre.with_size(cfg.image_size)

    backbone, source_head = split(source.spec, source.model)
    for param in backbone.parameters():
        param.requires_grad_(False)
    backbone.eval()  # frozen BatchNorm statistics and no dropout

    backbone_id = source.provenance.get("sha256") or f"{cfg.arch}:{cfg.weights}:{cfg.seed}"
    feats = extract(
        backbone,
        dataset.samples,
        pre,
        backbone_id=backbone_id,
        use_cache=cfg.use_cache,
        progress=cfg.progress,
    )
    total = len(dataset.samples)
    if feats.bad and len(feats.bad) > cfg.max_bad * total:
        first = "; ".join(r for _, r in feats.bad[:3])
        raise DataError(
            f"{len(feats.bad)} of {total} images could not be read (more than --max-bad "
            f"{cfg.max_bad:.0%}): {first}"
        )
    dataset = dataset.without([p for p, _ in feats.bad])
    labels = torch.tensor([s.label for s in feats.samples])
    is_val = torch.tensor([s.split == "val" for s in feats.samples])
    missing = [
        c for i, c in enumerate(dataset.classes) if not bool(((labels == i) & ~is_val).any())
    ]
    if missing:
        raise DataError(f"no readable training images for class(es): {', '.join(missing)}")
    if not bool(is_val.any()):
        raise DataError("no validation images; put at least 2 images in each class folder")

    head = torch.nn.Linear(source_head.in_features, len(dataset.classes))
    tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    result = train_head(
        head,
        feats.vectors[~is_val],
        labels[~is_val],
        feats.vectors[is_val],
        labels[is_val],
        tcfg,
        progress=cfg.progress,
    )

    src = dict(source.provenance)
    if source.labels is not None:
        src["labels"] = source.labels
    manifest = Manifest(
        arch=cfg.arch,
        labels=list(dataset.classes),
        preprocessing=pre,
        source=src,
        adapt={
            "strategy": "head",
            "epochs": cfg.epochs,
            "best_epoch": result.best_epoch,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "val_fraction": cfg.val_fraction,
        },
        data={
            "fingerprint": dataset.fingerprint(),
            "classes": len(dataset.classes),
            "train": int((~is_val).sum()),
            "val": int(is_val.sum()),
            "bad": len(feats.bad),
        },
        metrics={"val_top1": round(result.val_top1, 6), "val_loss": round(result.val_loss, 6)},
        versions=versions(),
    )
    model = Classifier(backbone, head)
    with output_dir(cfg.out, cfg.force) as tmp:
        save_model(model, manifest, tmp / "model.safetensors")
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        atomic_write_text(tmp / "history.json", json.dumps(result.history, indent=1) + "\n")
        # Where the data lives stays in RUN_DIR only; artifacts carry just its fingerprint.
        run_info = {"data_dir": str(Path(cfg.data_dir).absolute()), "weights": cfg.weights}
        atomic_write_text(tmp / RUN_INFO, json.dumps(run_info, indent=2) + "\n")
        if feats.bad:
            atomic_write_text(
                tmp / "bad_files.txt", "".join(f"{os.fsdecode(p)!r}\t{r}\n" for p, r in feats.bad)
            )
    return AdaptResult(Path(cfg.out), manifest, feats.bad)


def save_model(model, manifest: Manifest, path: Path) -> None:
    """The Classifier's weights as safetensors, with the manifest in the header metadata."""
    from safetensors.torch import save

    from edgetransfer.fileio import atomic_write_bytes

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(state, metadata={METADATA_KEY: manifest.to_json()}))


def load_run(run_dir: str | os.PathLike):
    """The eager Classifier and its manifest from a RUN_DIR (or an EXPORT_DIR with weights)."""
    from edgetransfer.backbones import build_classifier, load_strict, read_state_dict
    from edgetransfer.errors import ManifestError
    from edgetransfer.manifest import read_manifest

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    weights = run_dir / "model.safetensors"
    if not weights.is_file():
        raise ManifestError(f"{run_dir} has no model.safetensors; is it a RUN_DIR from adapt?")
    model = build_classifier(manifest.arch, len(manifest.labels))
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
