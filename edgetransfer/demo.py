"""The offline demo: adapt the shipped digits 0-4 model to digits 5-9, export, verify, predict.

With PyTorch it runs the full path (eager parity, TorchScript, source retention); without it,
the device path on the shipped backbone bundle (device.py), importing no torch.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from edgetransfer.device import BundleAdaptConfig, adapt_bundle, export_bundle, verify_bundle
from edgetransfer.errors import EdgeTransferError
from edgetransfer.fileio import check_can_write, write_marker
from edgetransfer.manifest import ARTIFACTS
from edgetransfer.runtime import OnnxClassifier

SOURCE_MODEL = "digits04_simple_cnn.safetensors"
SOURCE_BUNDLE = "digits04_simple_cnn.backbone.onnx"  # the same model as a backbone bundle
PACKAGE = Path(__file__).resolve().parent


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


def demo_source(device: bool) -> Path:
    """What the demo adapts: the shipped model, or on the device path its bundle."""
    return source_model(SOURCE_BUNDLE if device else SOURCE_MODEL)


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    export_dir: Path
    val_top1: float
    # source task before / after adaptation; None on the device path, where the backbone and
    # its source head are frozen inside the bundle, so the source task cannot change
    source_top1: tuple[float, float] | None
    parity_passed: bool
    parity_table: str
    predictions: list  # runtime.Prediction
    device: bool = False  # the device path: no PyTorch


def run_demo(
    out: Path, force: bool = False, progress: bool = False, device: bool | None = None
) -> DemoResult:
    """adapt -> export -> verify -> predict on the shipped data, all under `out`.

    Args:
        device: the device path on the shipped bundle (None: when PyTorch is not installed).
    """
    out = Path(out)
    data = sample_data()
    if device is None:
        device = without_torch()
    source = demo_source(device)
    check_can_write(out, force, (data, source_sample_data(), source))
    write_marker(out)  # OUT_DIR holds run/ and export/: marked so a later --force may reuse it
    run_dir, export_dir = out / "run", out / "export"
    if device:
        res = adapt_bundle(BundleAdaptConfig(data, run_dir, source, force=True, progress=progress))
        export_bundle(run_dir, export_dir, force=True)
        report = verify_bundle(export_dir, data)
        return _result(run_dir, export_dir, res.manifest, None, report, device=True)
    return _with_torch(data, source, run_dir, export_dir, progress)


def _with_torch(data: Path, source: Path, run_dir: Path, export_dir: Path, progress: bool):
    # the torch pipelines, imported here: the device path must not import them
    from edgetransfer.adapt import AdaptConfig, adapt
    from edgetransfer.export import ExportConfig, export
    from edgetransfer.verify import verify

    res = adapt(
        AdaptConfig(
            data_dir=data,
            out=run_dir,
            arch="simple_cnn",
            weights=str(source),
            source_data=source_sample_data(),
            force=True,
            progress=progress,
        )
    )
    export(ExportConfig(run_dir=run_dir, out=export_dir, force=True))
    report = verify(export_dir, data, trust_torchscript=True)  # exported just above
    m = res.manifest.metrics
    source_top1 = (m["source_top1_before"], m["source_top1_after"])
    return _result(run_dir, export_dir, res.manifest, source_top1, report, device=False)


def _result(run_dir, export_dir, manifest, source_top1, report, device: bool) -> DemoResult:
    """The demo's result, with a prediction for the first image of each class."""
    data = sample_data()
    images = [sorted((data / label).iterdir())[0] for label in manifest.labels]
    preds = OnnxClassifier(export_dir / ARTIFACTS["onnx"]).predict(images, topk=3)
    return DemoResult(
        run_dir,
        export_dir,
        float(manifest.metrics["val_top1"]),
        source_top1,
        report.passed,
        report.table(),
        preds,
        device,
    )
