"""Export a RUN_DIR to ONNX and TorchScript, each carrying the manifest, plus labels.txt."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgetransfer.errors import ExportError
from edgetransfer.manifest import MANIFEST_NAME, METADATA_KEY, Manifest

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_EXPORTER = "dynamo"


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how."""

    run_dir: Path
    out: Path
    onnx: bool = True
    torchscript: bool = True
    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    force: bool = False
    data_dir: Path | None = None  # images for golden vectors; default: the RUN_DIR's DATA_DIR
    golden: int = 5


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Path]
    manifest: Manifest
    notes: list[str]


def export(cfg: ExportConfig) -> ExportResult:
    """Write EXPORT_DIR: model.onnx, model.pt, labels.txt, edgetransfer.json, model.safetensors.

    The weights are copied so that `verify` can rebuild the eager model from the folder alone.
    """
    import torch

    from edgetransfer.adapt import load_run
    from edgetransfer.fileio import atomic_write_text, check_can_write, output_dir

    if cfg.exporter not in EXPORTERS:
        raise ExportError(
            f"unknown exporter {cfg.exporter!r}; choose one of: {', '.join(EXPORTERS)}"
        )
    if not (cfg.onnx or cfg.torchscript):
        raise ExportError("nothing to export; pass --onnx and/or --torchscript")
    check_can_write(cfg.out, cfg.force)
    model, manifest = load_run(cfg.run_dir)
    samples, notes = _golden_samples(cfg, manifest)
    h, w = manifest.preprocessing.input_size
    torch.manual_seed(0)
    example = torch.randn(2, 3, h, w)
    with output_dir(cfg.out, cfg.force) as tmp:
        if cfg.onnx:
            export_onnx(model, manifest, example, tmp / "model.onnx", cfg.exporter, cfg.opset)
        if cfg.torchscript:
            export_torchscript(model, manifest, example, tmp / "model.pt")
        shutil.copyfile(Path(cfg.run_dir) / "model.safetensors", tmp / "model.safetensors")
        atomic_write_text(tmp / "labels.txt", "".join(f"{label}\n" for label in manifest.labels))
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        if samples:
            from edgetransfer.golden import GOLDEN_DIR, write_golden

            write_golden(model, manifest, samples, tmp / GOLDEN_DIR, cfg.golden)
        files = sorted(p.name for p in tmp.iterdir())
    out = Path(cfg.out)
    return ExportResult(out, [out / f for f in files], manifest, notes)


def _golden_samples(cfg: ExportConfig, manifest: Manifest):
    """Validation samples for golden vectors, and a note when there are none."""
    from edgetransfer.adapt import run_data_dir
    from edgetransfer.data import scan

    if cfg.golden <= 0:
        return [], []
    data_dir = cfg.data_dir or run_data_dir(cfg.run_dir)
    if data_dir is None:
        return [], ["no golden/ written: the RUN_DIR's data folder is gone; pass --data DATA_DIR"]
    seed = int(manifest.adapt.get("seed", 0))
    ds = scan(data_dir, float(manifest.adapt.get("val_fraction", 0.2)), seed)
    return ds.samples, []


def export_onnx(
    model, manifest: Manifest, example, path: Path, exporter: str, opset: int | None = None
) -> None:
    """ONNX with a dynamic batch dimension, the manifest in metadata_props, fully checked."""
    import warnings

    import onnx
    import torch

    io = manifest.io
    tmp = path.with_name(path.name + ".tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=True,
                    external_data=False,
                    input_names=[io["input"]],
                    output_names=[io["output"]],
                    opset_version=opset,
                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}},
                    verbose=False,
                )
            else:
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    input_names=[io["input"]],
                    output_names=[io["output"]],
                    opset_version=opset or 17,
                    dynamic_axes={io["input"]: {0: "batch"}, io["output"]: {0: "batch"}},
                )
        proto = onnx.load(str(tmp))
    except Exception as e:  # exporter failures come in many types
        raise ExportError(
            f"ONNX export ({exporter}) of {manifest.arch} failed: {str(e).splitlines()[0][:300]}"
        ) from None
    finally:
        if tmp.exists():
            os.unlink(tmp)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: manifest.to_json()})
    proto.producer_name = "edgetransfer"
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(
            f"exported ONNX model fails onnx.checker: {str(e).splitlines()[0]}"
        ) from None
    from edgetransfer.fileio import atomic_write_bytes

    atomic_write_bytes(path, proto.SerializeToString())


def export_torchscript(model, manifest: Manifest, example, path: Path) -> None:
    """Trace the model, check the trace against eager, save with the manifest as an extra file."""
    import io as _io
    import warnings

    import torch

    from edgetransfer.fileio import atomic_write_bytes
    from edgetransfer.verify import ATOL, RTOL

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        try:
            torch.testing.assert_close(traced(example), model(example), rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            raise ExportError(
                f"TorchScript trace differs from eager: {str(e).splitlines()[0]}"
            ) from None
        buf = _io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={MANIFEST_NAME: manifest.to_json()})
    atomic_write_bytes(path, buf.getvalue())
