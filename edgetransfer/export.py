"""Export a RUN_DIR for deployment: ONNX (normalised and raw-pixel), TorchScript, .pt2, and
ExecuTorch .pte (lowered in pte.py).

Every artifact carries the manifest; every artifact is checked against eager PyTorch before it
is written. Quantised variants and the latency/accuracy guard live in quantize.py.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgetransfer import config, onnxio, pte, quantize
from edgetransfer.backbones import outputs
from edgetransfer.data import relabel, run_data_dir, run_split
from edgetransfer.errors import ExportError, first_line
from edgetransfer.fileio import (
    atomic_write_bytes,
    atomic_write_text,
    check_can_write,
    output_dir,
    sha256_file,
)
from edgetransfer.golden import GOLDEN_DIR, write_golden
from edgetransfer.manifest import ARTIFACTS, EXPORT_REPORT, MANIFEST_NAME, Manifest, raw_manifest
from edgetransfer.parity import ATOL, CHECK_BATCHES, RTOL, require_close
from edgetransfer.runs import load_run, save_model
from edgetransfer.runtime import OnnxClassifier

EXPORTERS = config.EXPORTERS
DEFAULT_EXPORTER = config.EXPORTER


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how.

    Attributes:
        exporter: "auto", "dynamo" or "torchscript" (the torch.onnx exporter).
        data_dir: images for golden vectors, calibration and the accuracy guard;
            default: the DATA_DIR the run was adapted on.
        calib_size: training images used to calibrate int8.
        max_drop: largest top-1 drop (fraction) a quantised model may have to be recommended.
        executorch: also write model.pte (ExecuTorch, XNNPACK-delegated).
        pte_max_batch: the largest batch model.pte accepts (its memory is planned for it).
        source_weights: for a run adapted on a backbone bundle, the weights the bundle was made
            from (runs.load_run); EXPORT_DIR then holds the whole model.safetensors.
    """

    run_dir: Path
    out: Path
    onnx: bool = True
    torchscript: bool = True
    raw: bool = True
    pt2: bool = False
    int8: bool = False
    fp16: bool = False
    optimize: bool = False
    exporter: str = DEFAULT_EXPORTER
    opset: int | None = None
    force: bool = False
    data_dir: Path | None = None
    golden: int = config.GOLDEN
    calib_size: int = config.CALIB_SIZE
    max_drop: float = config.MAX_DROP
    threads: int | None = None
    executorch: bool = False
    pte_max_batch: int = config.PTE_MAX_BATCH
    source_weights: str | None = None


@dataclass(frozen=True)
class ExportResult:
    out: Path
    files: list[Path]
    manifest: Manifest
    notes: list[str]
    report: dict = field(default_factory=dict)


def export(cfg: ExportConfig) -> ExportResult:
    """Write EXPORT_DIR. The weights are copied so `verify` can rebuild the eager reference."""
    import torch

    if cfg.exporter not in config.EXPORTER_CHOICES:
        raise ExportError(
            f"unknown exporter {cfg.exporter!r}; "
            f"choose one of: {', '.join(config.EXPORTER_CHOICES)}"
        )
    if not (
        cfg.onnx
        or cfg.torchscript
        or cfg.raw
        or cfg.pt2
        or cfg.int8
        or cfg.fp16
        or cfg.optimize
        or cfg.executorch
    ):
        raise ExportError(
            "nothing to export; pass --onnx, --torchscript, --raw, --pt2, --int8, "
            "--fp16, --optimize or --executorch"
        )
    if cfg.executorch:  # before any work: a missing extra is one line, not a late failure
        pte.require_executorch()
        if cfg.pte_max_batch < 1:
            raise ExportError(f"--pte-max-batch must be at least 1 (got {cfg.pte_max_batch})")
    inputs = [cfg.run_dir, cfg.data_dir or run_data_dir(cfg.run_dir)]
    check_can_write(cfg.out, cfg.force, inputs)
    model, manifest = load_run(cfg.run_dir, cfg.source_weights)
    dataset, notes = _dataset(cfg, manifest)
    if (cfg.int8 or cfg.fp16) and dataset is None:
        raise ExportError(
            "--int8/--fp16 need images for calibration and the accuracy check; pass --data DATA_DIR"
        )
    h, w = manifest.preprocessing.input_size
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    report: dict = {"exporter": None, "opset": cfg.opset, "artifacts": {}, "notes": notes}
    with output_dir(cfg.out, cfg.force, inputs) as tmp:
        # int8/fp16/optimize are made from model.onnx, which stays as their fp32 baseline
        need_onnx = cfg.onnx or cfg.int8 or cfg.fp16 or cfg.optimize
        exporter = cfg.exporter
        if need_onnx:
            exporter = export_onnx_checked(
                model,
                manifest,
                example,
                tmp / ARTIFACTS["onnx"],
                exporter=cfg.exporter,
                opset=cfg.opset,
                notes=notes,
            )
            report["exporter"] = exporter
        if cfg.raw:
            _with_fallback(
                exporter,
                lambda name: export_raw(model, manifest, tmp / ARTIFACTS["raw"], name, cfg.opset),
                manifest.arch,
                notes,
            )
        if cfg.torchscript:
            export_torchscript(model, manifest, example, tmp / ARTIFACTS["torchscript"])
        if cfg.pt2:
            export_pt2(model, manifest, example, tmp / ARTIFACTS["pt2"])
        if cfg.executorch:
            report["executorch"] = pte.export_pte(
                model, manifest, tmp / ARTIFACTS["pte"], cfg.pte_max_batch, notes
            )
        if cfg.int8 or cfg.fp16 or cfg.optimize:
            if cfg.optimize:
                quantize.save_optimized(
                    tmp / ARTIFACTS["onnx"], tmp / ARTIFACTS["optimized"], manifest
                )
            if cfg.int8:
                calib = _spread([s for s in dataset.samples if s.split == "train"], cfg.calib_size)
                val = dataset.split("val") or dataset.samples
                report["int8"] = quantize.quantize_int8(
                    tmp / ARTIFACTS["onnx"],
                    tmp / ARTIFACTS["int8"],
                    manifest,
                    calib,
                    val,
                    cfg.max_drop,
                )
                if cfg.executorch:
                    xc, _ = quantize.load_inputs(calib, manifest)
                    xv, kept = quantize.load_inputs(val, manifest)
                    truth = np.array([s.label for s in kept])
                    report["pte_int8"] = pte.export_pte_int8(
                        model,
                        manifest,
                        tmp / ARTIFACTS["pte_int8"],
                        xc,
                        xv,
                        truth,
                        cfg.max_drop,
                        cfg.pte_max_batch,
                        notes,
                    )
            if cfg.fp16:
                quantize.convert_fp16(tmp / ARTIFACTS["onnx"], tmp / ARTIFACTS["fp16"], manifest)
            if dataset is None:
                notes.append("no accuracy/latency guard: no images; pass --data DATA_DIR")
            else:
                val = dataset.split("val") or dataset.samples
                fallback = {"int8": report.get("int8"), "pte-int8": report.get("pte_int8")}
                guard = quantize.guard(tmp, manifest, val, cfg.max_drop, cfg.threads, fallback)
                notes += guard.pop("notes")
                report["guard"] = guard
        weights = ARTIFACTS["weights"]
        if (Path(cfg.run_dir) / weights).is_file():
            shutil.copyfile(Path(cfg.run_dir) / weights, tmp / weights)
        else:  # a run adapted on a bundle: its eager model as a PyTorch run would keep it
            save_model(model, manifest, tmp / weights)
        atomic_write_text(tmp / "labels.txt", "".join(f"{label}\n" for label in manifest.labels))
        atomic_write_text(tmp / MANIFEST_NAME, manifest.to_json())
        if dataset is not None and cfg.golden > 0:
            write_golden(
                _eager_logits(model), manifest, dataset.samples, tmp / GOLDEN_DIR, cfg.golden
            )
        for kind, name in ARTIFACTS.items():
            if kind != "weights" and (tmp / name).is_file():
                report["artifacts"][kind] = {
                    "file": name,
                    "bytes": (tmp / name).stat().st_size,
                    "sha256": sha256_file(tmp / name),
                }
        atomic_write_text(tmp / EXPORT_REPORT, json.dumps(report, indent=2) + "\n")
        files = sorted(p.name for p in tmp.iterdir())
    out = Path(cfg.out)
    return ExportResult(out, [out / f for f in files], manifest, notes, report)


def _eager_logits(model):
    """float32 NCHW numpy -> the eager model's logits (the golden reference)."""
    import torch

    def run(x):
        with torch.inference_mode():
            return outputs(model(torch.from_numpy(x)))[0].numpy()

    return run


def _dataset(cfg: ExportConfig, manifest: Manifest):
    """The scanned DATA_DIR (split as in adapt), and a note when there is none."""
    data_dir = cfg.data_dir or run_data_dir(cfg.run_dir)
    if data_dir is None:
        if cfg.golden <= 0:
            return None, []
        return None, ["no golden/ written: the run's data folder is gone; pass --data DATA_DIR"]
    return relabel(run_split(data_dir, manifest), manifest.labels), []


def _spread(samples: list, n: int) -> list:
    """Up to `n` samples taken round-robin across classes (scan groups them by class)."""
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out, queues = [], [list(v) for _, v in sorted(by_class.items())]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def check_batches(model, path: Path, shape: tuple[int, int], raw: bool = False) -> None:
    """Run `path` under onnxruntime at batch 1, 2 and 8 and compare with eager PyTorch."""
    import torch

    clf = OnnxClassifier(path)
    gen = torch.Generator().manual_seed(1)
    h, w = shape
    for batch in CHECK_BATCHES:
        if raw:
            pixels = torch.randint(0, 256, (batch, h, w, 3), generator=gen, dtype=torch.uint8)
            x, feed = pixels, pixels.numpy()
        else:
            x = torch.randn(batch, 3, h, w, generator=gen)
            feed = x.numpy()
        with torch.inference_mode():
            want = model(x)
        want = list(want) if isinstance(want, tuple) else [want]
        try:
            got = clf.session.run(None, {clf.input_name: feed})
        except Exception as e:  # ORT shape errors: the batch dimension is not really dynamic
            raise ExportError(f"{path.name} fails at batch {batch}: {first_line(e)}") from None
        require_close(got, [t.numpy() for t in want], path.name, batch)


def _with_fallback(exporter: str, run, arch: str, notes: list[str]) -> str:
    """Run `run(exporter_name)`; with "auto", try dynamo then the TorchScript exporter.

    Returns the exporter that produced a checked model.
    """
    candidates = list(EXPORTERS) if exporter == "auto" else [exporter]
    errors = []
    for name in candidates:
        try:
            run(name)
            if errors:
                notes.append(f"used the {name} exporter; " + "; ".join(errors))
            return name
        except ExportError as e:
            errors.append(f"{name}: {e}")
    raise ExportError(f"ONNX export of {arch} failed: " + "; ".join(errors))


def export_onnx_checked(
    model,
    manifest: Manifest,
    example,
    path: Path,
    *,
    exporter: str,
    opset: int | None,
    notes: list[str],
) -> str:
    """Export model.onnx and check it at batch 1/2/8; returns the exporter used."""

    def run(name: str) -> None:
        try:
            export_onnx(model, manifest, example, path, name, opset)
            check_batches(model, path, manifest.preprocessing.input_size)
        except ExportError:
            path.unlink(missing_ok=True)
            raise

    return _with_fallback(exporter, run, manifest.arch, notes)


def export_onnx(
    model, manifest: Manifest, example, path: Path, exporter: str, opset: int | None = None
) -> None:
    """ONNX with a dynamic batch dimension, the manifest in metadata_props, fully checked."""
    tmp = path.with_name(path.name + ".tmp")
    with onnxio.onnx_step(f"ONNX export ({exporter}) of {manifest.arch}", tmp, target=path):
        onnxio.torch_onnx_export(
            model,
            example,
            tmp,
            exporter=exporter,
            opset=opset,
            input_name=manifest.io["input"],
            output_names=output_names(manifest),
        )
        onnxio.finish_onnx(tmp, path, manifest)


class RawPixels:
    """Builds the raw-pixel wrapper lazily (torch is imported only when exporting)."""

    @staticmethod
    def wrap(model, manifest: Manifest):
        import torch
        from torch import nn

        p = manifest.preprocessing

        class _Raw(nn.Module):
            """uint8 NHWC RGB at input_size -> (probs, logits); normalisation in the graph."""

            def __init__(self) -> None:
                super().__init__()
                self.model = model
                # x/255 - mean, / std  ==  x * scale + shift, folded into two constants
                std = torch.tensor(p.std, dtype=torch.float32)
                mean = torch.tensor(p.mean, dtype=torch.float32)
                self.register_buffer("scale", (1.0 / (255.0 * std)).view(1, 3, 1, 1))
                self.register_buffer("shift", (-mean / std).view(1, 3, 1, 1))

            def forward(self, image: torch.Tensor):
                x = image.permute(0, 3, 1, 2).to(torch.float32) * self.scale + self.shift
                out = self.model(x)
                if isinstance(out, tuple):  # a kept source head answers too
                    return torch.softmax(out[0], dim=1), out[0], out[1]
                return torch.softmax(out, dim=1), out

        return _Raw().eval()


def output_names(manifest: Manifest) -> list[str]:
    """ONNX output names: the logits, and the source logits when a source head was kept."""
    names = [manifest.io["output"]]
    if "source_output" in manifest.io:
        names.append(manifest.io["source_output"])
    return names


def export_raw(
    model, manifest: Manifest, path: Path, exporter: str, opset: int | None = None
) -> None:
    """model.raw.onnx: decoded pixels in, probabilities and logits out; checked at batch 1/2/8."""
    import torch

    wrapped = RawPixels.wrap(model, manifest)
    h, w = manifest.preprocessing.input_size
    example = torch.randint(0, 256, (2, h, w, 3), dtype=torch.uint8)
    rm = raw_manifest(manifest)
    tmp = path.with_name(path.name + ".tmp")
    with onnxio.onnx_step(f"raw-pixel export ({exporter})", tmp, target=path):
        onnxio.torch_onnx_export(
            wrapped,
            example,
            tmp,
            exporter=exporter,
            opset=opset,
            input_name="image",
            output_names=["probs", *output_names(rm)],
        )
        onnxio.finish_onnx(tmp, path, rm)
    try:
        check_batches(wrapped, path, (h, w), raw=True)
    except ExportError:
        path.unlink(missing_ok=True)
        raise


def export_torchscript(model, manifest: Manifest, example, path: Path) -> None:
    """Trace the model, check the trace against eager, save with the manifest as an extra file."""
    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        _check_against_eager(traced, model, example, "TorchScript trace")
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={MANIFEST_NAME: manifest.to_json()})
    atomic_write_bytes(path, buf.getvalue())


def _check_against_eager(module, model, example, what: str) -> None:
    """`module` must answer like eager `model` at batch 1, 2 and 8 (fp32 tolerance)."""
    import torch

    gen = torch.Generator().manual_seed(2)
    for batch in CHECK_BATCHES:
        x = torch.randn(batch, *example.shape[1:], generator=gen)
        try:
            torch.testing.assert_close(module(x), model(x), rtol=RTOL, atol=ATOL)
        except AssertionError as e:
            raise ExportError(
                f"{what} differs from eager at batch {batch}: {first_line(e)}"
            ) from None


def export_pt2(model, manifest: Manifest, example, path: Path) -> None:
    """A torch.export ExportedProgram (.pt2) with a dynamic batch and the manifest inside."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(
                model,
                (example,),
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            )
        except Exception as e:
            raise ExportError(f"torch.export of {manifest.arch} failed: {first_line(e)}") from None
        with torch.no_grad():
            _check_against_eager(ep.module(), model, example, ".pt2 program")
        buf = io.BytesIO()
        torch.export.save(ep, buf, extra_files={MANIFEST_NAME: manifest.to_json()})
    atomic_write_bytes(path, buf.getvalue())
