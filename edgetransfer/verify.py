"""Verify: run every exported model in an EXPORT_DIR (TorchScript, .pt2, onnxruntime fp32,
raw-pixel, optimised, int8, fp16, ExecuTorch) on real validation images, beside eager PyTorch,
and hand the answers to parity, which judges them."""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgetransfer import config
from edgetransfer.backbones import outputs as split_outputs
from edgetransfer.data import Dataset, eval_transform, load_image, resize_crop, run_split
from edgetransfer.errors import DataError, EdgeTransferWarning, ManifestError, first_line
from edgetransfer.manifest import ARTIFACTS, CODE_FILES, Manifest, untrusted_skip
from edgetransfer.parity import (
    ATOL,
    RTOL,
    Outputs,
    ParityReport,
    judge,
    recorded_check,
    write_parity,
)
from edgetransfer.runs import load_run
from edgetransfer.runtime import OnnxClassifier, PteClassifier, load_pt2

# runtime name -> (file in EXPORT_DIR, kind); "exact" is judged elementwise, "reduced" by accuracy
RUNTIMES = {
    "torchscript": (ARTIFACTS["torchscript"], "exact"),
    "pt2": (ARTIFACTS["pt2"], "exact"),
    "onnxruntime": (ARTIFACTS["onnx"], "exact"),
    "raw": (ARTIFACTS["raw"], "exact"),
    "optimized": (ARTIFACTS["optimized"], "exact"),
    "fp16": (ARTIFACTS["fp16"], "reduced"),
    "int8": (ARTIFACTS["int8"], "reduced"),
    "executorch": (ARTIFACTS["pte"], "exact"),
}


def _run_code_model(runtime: str, path: Path, run):
    """Load model.pt / model.pt2 (trusted by the caller) and `run` it; a file that does not
    load or run is one line naming it, not torch's traceback."""
    import torch

    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit/export deprecation notes
        try:
            if runtime == "torchscript":
                m = torch.jit.load(str(path), map_location="cpu").eval()
            else:
                m = load_pt2(path)
        except Exception as e:  # torch raises many types for a damaged archive
            raise ManifestError(f"{path.name} is not loadable: {first_line(e)}") from None
        try:
            return run(m)
        except Exception as e:  # anything the model's own code raises
            raise ManifestError(f"{path.name} failed to run: {first_line(e)}") from None


def verify(
    export_dir: str | Path,
    data_dir: str | Path,
    *,
    limit: int | None = None,
    batch_size: int = config.VERIFY_BATCH_SIZE,
    atol: float = ATOL,
    rtol: float = RTOL,
    write: bool = True,
    threads: int | None = None,
    trust_torchscript: bool = False,
) -> ParityReport:
    """Run every exported model in `export_dir` on validation images from `data_dir`.

    The images go through the Python (torchvision) preprocessing once; the same tensors go to
    every float runtime in batches of `batch_size` (so the dynamic batch dimension is
    exercised), and the raw-pixel model gets the same images as uint8 pixels. Each runtime is
    judged against eager PyTorch by parity. Writes parity.json into `export_dir` when `write`
    is set.

    model.pt and model.pt2 can run code when loaded (manifest.CODE_FILES): they are skipped with an
    EdgeTransferWarning unless `trust_torchscript` is set.
    """
    export_dir = Path(export_dir)
    model, manifest = load_run(export_dir)
    dataset = run_split(data_dir, manifest)
    images = _images(dataset, manifest, limit, data_dir)
    with torch.inference_mode():
        ref = _batched(_torch_runner(model), images.tensors, batch_size)
    outputs, skipped = _run_exports(
        export_dir,
        images,
        manifest.io.get("source_output"),
        batch_size=batch_size,
        threads=threads,
        trust_torchscript=trust_torchscript,
    )
    report = ParityReport(export_dir, len(images.names), atol, rtol, skipped=skipped)
    for runtime, got in outputs.items():
        row = judge(
            runtime,
            got,
            ref,
            images.names,
            kind=RUNTIMES[runtime][1],
            labels=manifest.labels,
            truth=images.truth,
            atol=atol,
            rtol=rtol,
        )
        report.runtimes.append(row)
    if images.truth is not None:
        report.eager_top1 = float((ref.logits.argmax(1) == images.truth).mean())
    report.recorded = recorded_check(
        manifest, dataset, report.eager_top1, len(images.names), images.split_images
    )
    if write:
        report.written = write_parity(report)
    return report


@dataclass
class Images:
    """The verify images, prepared once for every runtime."""

    tensors: torch.Tensor  # normalised NCHW through torchvision's preprocessing
    pixels: np.ndarray  # uint8 NHWC at input_size, for the raw-pixel model
    names: list[str]
    truth: np.ndarray | None  # each image's class as an index into the model's labels
    split_images: int  # validation images in the folder (before --limit)


def _images(dataset: Dataset, manifest: Manifest, limit: int | None, data_dir) -> Images:
    """The validation split (a seeded subset with `limit`), decoded; unreadable files left out."""
    p = manifest.preprocessing
    samples = dataset.split("val") or dataset.samples
    split_images = len(samples)
    if limit and limit < len(samples):  # a seeded sample across classes, not the first class
        samples = sorted(random.Random(0).sample(samples, limit), key=lambda s: str(s.path))
    tf = eval_transform(p)
    tensors, pixels, kept = [], [], []
    for s in samples:
        try:
            img = load_image(s.path)
        except DataError:
            continue
        tensors.append(tf(img))
        pixels.append(np.asarray(resize_crop(img, p), dtype=np.uint8))
        kept.append(s)
    if not tensors:
        raise DataError(f"no readable validation images in {data_dir}")
    truth = None
    if set(dataset.classes) <= set(manifest.labels):  # a folder may hold some of the classes
        by_name = {c: i for i, c in enumerate(manifest.labels)}
        idx = [by_name.get(dataset.classes[s.label]) for s in kept]
        if all(i is not None for i in idx):
            truth = np.array(idx)
    return Images(
        torch.stack(tensors), np.stack(pixels), [s.path.name for s in kept], truth, split_images
    )


def _batched(fn, inputs, batch_size: int) -> Outputs:
    """Run `fn` (batch -> Outputs) over `inputs` in batches and join the answers."""
    parts = [fn(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]

    def join(field: str) -> np.ndarray | None:
        arrays = [getattr(part, field) for part in parts]
        return None if arrays[0] is None else np.concatenate(arrays)

    return Outputs(join("logits"), join("source"), join("probs"))


def _torch_runner(model):
    """batch -> Outputs for an eager, TorchScript or .pt2 model."""

    def run(batch) -> Outputs:
        logits, src = split_outputs(model(batch))
        return Outputs(logits.numpy(), None if src is None else src.numpy())

    return run


def _run_exports(
    export_dir: Path,
    images: Images,
    source_name: str | None,
    *,
    batch_size: int,
    threads: int | None,
    trust_torchscript: bool,
) -> tuple[dict[str, Outputs], list[str]]:
    """Every runtime's Outputs on `images`, and the code-carrying files skipped untrusted."""
    outputs: dict[str, Outputs] = {}
    skipped: list[str] = []
    for runtime, (fname, _) in RUNTIMES.items():
        path = export_dir / fname
        if not path.is_file():
            continue
        if fname.endswith(".onnx"):
            outputs[runtime] = _onnx_outputs(path, images, source_name, batch_size, threads)
        elif fname.endswith(".pte"):  # a program, not code: no trust needed (docs/security.md)
            outputs[runtime] = _pte_outputs(path, images, batch_size, threads)
        elif not trust_torchscript and fname in CODE_FILES:
            warnings.warn(untrusted_skip(fname, "not verified"), EdgeTransferWarning, stacklevel=3)
            skipped.append(fname)
        else:
            outputs[runtime] = _run_code_model(
                runtime, path, lambda m: _batched(_torch_runner(m), images.tensors, batch_size)
            )
    return outputs, skipped


def _pte_outputs(path: Path, images: Images, batch_size: int, threads: int | None) -> Outputs:
    """An ExecuTorch program's Outputs: logits, and source logits when it has a second output."""
    program = PteClassifier(path, threads=threads).program

    def run(batch) -> Outputs:
        res = program.run(batch)
        return Outputs(res[0], res[1] if len(res) > 1 else None)

    return _batched(run, images.tensors.numpy(), batch_size)


def _onnx_outputs(
    path: Path, images: Images, source_name: str | None, batch_size: int, threads: int | None
) -> Outputs:
    """An ONNX model's Outputs: normalised tensors in, or uint8 pixels for the raw model (whose
    probabilities are judged too)."""
    clf = OnnxClassifier(path, threads=threads)
    have = {o.name for o in clf.session.get_outputs()}
    names = [clf.manifest.io["output"]] + ([source_name] if source_name in have else [])
    if clf.raw:
        names = ["probs", *names]

    def run(batch) -> Outputs:
        res = clf.session.run(names, {clf.input_name: batch})
        probs = res.pop(0) if clf.raw else None
        return Outputs(res[0], res[1] if len(res) > 1 else None, probs)

    return _batched(run, images.pixels if clf.raw else images.tensors.numpy(), batch_size)
