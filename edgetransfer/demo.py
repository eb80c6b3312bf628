"""The offline demo: adapt the shipped digits 0-4 model to digits 5-9, export, verify, predict."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgetransfer.adapt import AdaptConfig, adapt
from edgetransfer.errors import EdgeTransferError
from edgetransfer.export import ExportConfig, export
from edgetransfer.fileio import check_can_write, write_marker
from edgetransfer.manifest import ARTIFACTS
from edgetransfer.runtime import OnnxClassifier
from edgetransfer.verify import verify

SOURCE_MODEL = "digits04_simple_cnn.safetensors"
PACKAGE = Path(__file__).resolve().parent


def sample_data() -> Path:
    """The shipped target sample: digits 5-9, one folder per class."""
    return PACKAGE / "sample_data" / "digits59"


def source_sample_data() -> Path:
    """Held-out images of the source task (digits 0-4), for measuring source retention."""
    return PACKAGE / "sample_data" / "digits04"


def source_model() -> Path:
    """The shipped source model (inside the wheel, or models/ in a source checkout)."""
    for candidate in (PACKAGE / "models" / SOURCE_MODEL, PACKAGE.parent / "models" / SOURCE_MODEL):
        if candidate.is_file():
            return candidate
    raise EdgeTransferError(
        f"the shipped source model {SOURCE_MODEL} is missing; reinstall edgetransfer"
    )


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    export_dir: Path
    val_top1: float
    source_top1: tuple[float, float]  # source task before / after adaptation
    parity_passed: bool
    parity_table: str
    predictions: list  # runtime.Prediction


def run_demo(out: Path, force: bool = False, progress: bool = False) -> DemoResult:
    """adapt -> export -> verify -> predict on the shipped data, all under `out`."""
    out = Path(out)
    data = sample_data()
    check_can_write(out, force, (data, source_sample_data(), source_model()))
    write_marker(out)  # OUT_DIR holds run/ and export/: marked so a later --force may reuse it
    run_dir, export_dir = out / "run", out / "export"
    res = adapt(
        AdaptConfig(
            data_dir=data,
            out=run_dir,
            arch="simple_cnn",
            weights=str(source_model()),
            source_data=source_sample_data(),
            force=True,
            progress=progress,
        )
    )
    export(ExportConfig(run_dir=run_dir, out=export_dir, force=True))
    report = verify(export_dir, data, trust_torchscript=True)  # exported just above
    images = [sorted((data / label).iterdir())[0] for label in res.manifest.labels]
    preds = OnnxClassifier(export_dir / ARTIFACTS["onnx"]).predict(images, topk=3)
    return DemoResult(
        run_dir,
        export_dir,
        float(res.manifest.metrics["val_top1"]),
        (res.manifest.metrics["source_top1_before"], res.manifest.metrics["source_top1_after"]),
        report.passed,
        report.table(),
        preds,
    )
