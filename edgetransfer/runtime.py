"""Model backends for predict / evaluate / bench: onnxruntime sessions with numpy preprocessing
(no torch import on that path), plus ExecuTorch (.pte), TorchScript and eager RUN_DIR backends
behind the same API."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgetransfer import config
from edgetransfer.bundle import is_bundle
from edgetransfer.data import list_images, load_image, preprocess, resize_crop, softmax
from edgetransfer.errors import DataError, EdgeTransferError, InputError, ManifestError, first_line
from edgetransfer.manifest import (
    ARTIFACTS,
    CODE_FILES,
    METADATA_KEY,
    PTE_BATCH_METHOD,
    Manifest,
    read_manifest,
)
from edgetransfer.onnxio import open_session


def resolve_onnx(path: str | os.PathLike) -> Path:
    """A .onnx file, or the model.onnx inside an EXPORT_DIR."""
    path = Path(path)
    if path.is_dir():
        path = path / ARTIFACTS["onnx"]
        if not path.is_file():
            raise ManifestError(f"{path.parent} has no model.onnx; run `edgetransfer export` first")
    elif not path.is_file():
        raise ManifestError(f"model {path} does not exist")
    elif path.suffix.lower() != ".onnx":
        raise ManifestError(f"{path.name} is not an .onnx file; predict runs ONNX models")
    return path


@dataclass(frozen=True)
class Prediction:
    path: str
    topk: list[tuple[str, float]]  # (label, probability), best first
    logits: list[float]


class Predictor:
    """What predict/evaluate/bench need from a backend: the manifest, input preparation, logits.

    Subclasses set `manifest`, `path`, `raw` and implement `logits`.
    """

    manifest: Manifest
    path: Path
    raw: bool = False
    backend: str = ""

    def logits(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def check_outputs(self, shape: tuple | list, static: bool = False) -> None:
        """Refuse a model whose logits are not [N, one column per manifest label].

        Without this, too few labels end in an IndexError deep in predict and too many are
        silently cut off. With `static`, `shape` is what the model declares (dimensions may be
        names or None, known only at run time): only a declared width is checked, and the
        first real output is checked again.
        """
        n = len(self.manifest.labels)
        if static:
            bad = len(shape) == 2 and isinstance(shape[1], int) and shape[1] != n
        else:
            bad = len(shape) != 2 or shape[1] != n
        if bad:
            dims = "x".join(str(d) if isinstance(d, int) else "N" for d in shape) or "a scalar"
            raise ManifestError(
                f"{self.path.name}: its manifest lists {n} labels but the model outputs "
                f"{dims}; labels and model do not belong together (re-export it with "
                "edgetransfer)"
            )

    def prepare(self, img: Image.Image) -> np.ndarray:
        """One decoded RGB image -> this model's input (without the batch dimension)."""
        p = self.manifest.preprocessing
        if self.raw:
            return np.asarray(resize_crop(img, p), dtype=np.uint8)
        return preprocess(img, p)

    def example(self, batch: int, seed: int = 0) -> np.ndarray:
        """A random input batch of the right shape and dtype (for benchmarks)."""
        h, w = self.manifest.preprocessing.input_size
        rng = np.random.default_rng(seed)
        if self.raw:
            return rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
        return rng.standard_normal((batch, 3, h, w), dtype=np.float32)

    def predict(
        self,
        paths: list[Path],
        topk: int = 5,
        batch_size: int = config.INFER_BATCH_SIZE,
        progress: bool = False,
        skipped: list[tuple[str, str]] | None = None,
    ) -> list[Prediction]:
        """Top-k predictions per image.

        Args:
            skipped: when given, unreadable images are left out and appended here as
                (path, reason), so one bad file does not cost the predictions for the rest;
                when None, the first unreadable image raises DataError.
        """
        from tqdm import tqdm

        labels = self.manifest.labels
        k = max(1, min(topk, len(labels)))
        out: list[Prediction] = []
        bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, leave=False)
        for i in range(0, len(paths), batch_size):
            chunk, xs = [], []
            for p in paths[i : i + batch_size]:
                try:
                    xs.append(self.prepare(load_image(p)))
                except DataError as e:
                    if skipped is None:
                        raise
                    skipped.append((os.fsdecode(p), str(e)))
                    continue
                chunk.append(p)
            bar.update(len(paths[i : i + batch_size]))
            if not xs:
                continue
            logits = self.logits(np.stack(xs))
            probs = softmax(logits.astype(np.float64))
            for p, lg, pr in zip(chunk, logits, probs, strict=True):
                order = np.argsort(-pr, kind="stable")[:k]
                out.append(
                    Prediction(
                        os.fsdecode(p),
                        [(labels[j], float(pr[j])) for j in order],
                        [float(v) for v in lg],
                    )
                )
        bar.close()
        return out


def check_batch(batch, inp, raw: bool, what: str) -> np.ndarray:
    """`batch` as the dtype ONNX input `inp` takes, or InputError naming expected vs got.

    Floats of another width are cast for a float model; anything else is refused rather than
    cast, since uint8 pixels fed to a normalised model (or floats to a raw one) would run and
    answer nonsense.
    """
    want = np.dtype(np.uint8 if raw else np.float32)
    dims = [d if isinstance(d, int) else None for d in inp.shape]
    expected = f"{want.name} [{', '.join('N' if d is None else str(d) for d in dims)}]"
    got = getattr(batch, "dtype", type(batch).__name__)
    shape = getattr(batch, "shape", ())
    ok_kind = isinstance(batch, np.ndarray) and (
        batch.dtype == want or (not raw and np.issubdtype(batch.dtype, np.floating))
    )
    ok_shape = len(shape) == len(dims) and all(
        d is None or d == n for d, n in zip(dims, shape, strict=False)
    )
    if not (ok_kind and ok_shape):
        hint = " (uint8 NHWC RGB pixels)" if raw else " (normalised NCHW RGB)"
        raise InputError(
            f"{what} expects input {inp.name!r} as {expected}{hint}; got {got} {tuple(shape)}"
        )
    return batch.astype(want, copy=False)


class OnnxClassifier(Predictor):
    """An exported model under onnxruntime, with labels and preprocessing from its metadata."""

    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        threads: int | None = None,
        opt_level: str = "all",
        provider: str = config.PROVIDER,
    ) -> None:
        self.path = resolve_onnx(path)
        self.session = open_session(self.path, threads, opt_level, provider)
        meta = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise ManifestError(
                f"{self.path.name} carries no edgetransfer metadata; export it with edgetransfer"
            )
        self.manifest = Manifest.from_json(meta[METADATA_KEY])
        if is_bundle(self.manifest):
            raise ManifestError(
                f"{self.path.name} is a backbone bundle (it outputs features, not classes); "
                f"adapt on it with `edgetransfer adapt DATA_DIR --backbone {self.path.name}`, "
                "then export"
            )
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.raw = inp.type == "tensor(uint8)"  # model.raw.onnx: uint8 NHWC pixels in
        outputs = {o.name: o for o in self.session.get_outputs()}
        want = self.manifest.io.get("output", "logits")
        self._out = [want if want in outputs else next(iter(outputs))]
        self.check_outputs(outputs[self._out[0]].shape, static=True)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Logits for a batch: normalised float32 NCHW, or uint8 NHWC pixels for a raw model.

        A batch of the wrong shape or kind raises InputError naming what the model expects,
        instead of onnxruntime's own message.
        """
        batch = check_batch(batch, self.session.get_inputs()[0], self.raw, self.path.name)
        try:
            out = self.session.run(self._out, {self.input_name: batch})[0]
        except Exception as e:  # onnxruntime's own exception types
            first = first_line(e)
            raise InputError(f"onnxruntime could not run {self.path.name}: {first}") from None
        self.check_outputs(getattr(out, "shape", ()))
        return out


EXECUTORCH_EXTRA = "pip install 'edgetransfer[executorch]'"


def executorch_runtime():
    """The ExecuTorch runtime singleton, or a one-line error naming the extra to install."""
    try:
        from executorch.runtime import Runtime
    except ImportError:
        raise EdgeTransferError(
            f"ExecuTorch is not installed; {EXECUTORCH_EXTRA} to export or run .pte programs"
        ) from None
    return Runtime.get()


@contextlib.contextmanager
def _runtime_log() -> Iterator[io.StringIO]:
    """Hold what the ExecuTorch runtime logs through sys.stderr (CPU probing on every load, the
    reason when a load or run fails) off the terminal; errors quote its last line."""
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        yield log


def _reason(e: BaseException, log: io.StringIO) -> str:
    """The runtime's own last log line (why), then its exception (the error code)."""
    lines = [ln.split("] ", 1)[-1] for ln in log.getvalue().splitlines() if ln.strip()]
    return f"{lines[-1]} ({first_line(e)})" if lines else first_line(e)


class PteProgram:
    """A .pte program's forward method under the ExecuTorch runtime, fed numpy batches.

    Batches larger than the program's largest (memory is planned for it when the program loads)
    are run in pieces; a fixed-batch program gets its last piece padded.
    """

    def __init__(self, source: Path | bytes, name: str, threads: int | None = None) -> None:
        import torch

        rt = executorch_runtime()
        if threads:
            from executorch.extension.pybindings import portable_lib

            with _runtime_log():
                portable_lib._unsafe_reset_threadpool(int(threads))  # XNNPACK's threads
        self.name = name
        with _runtime_log() as log:
            try:
                program = rt.load_program(source)
                # the method lives in the program's memory: keep the program with it
                self._program = program
                self.method = program.load_method("forward")
                low = high = None
                if PTE_BATCH_METHOD in program.method_names:
                    low, high = (int(v) for v in program.load_method(PTE_BATCH_METHOD).execute([]))
            except Exception as e:  # the runtime raises RuntimeError/ValueError for a bad program
                raise ManifestError(
                    f"{name} is not a loadable ExecuTorch program: {_reason(e, log)}"
                ) from None
        meta = self.method.metadata
        planned = list(meta.input_tensor_meta(0).sizes())
        self.shape = planned[1:]
        self.max_batch = high or planned[0]
        self.min_batch = low or planned[0]
        self._torch = torch

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every output of forward for a float32 NCHW batch."""
        torch = self._torch
        if len(batch) == 0:
            raise InputError(f"{self.name}: an empty batch has no answers; pass 1 image or more")
        parts: list[list[np.ndarray]] = []
        for i in range(0, len(batch), self.max_batch):
            piece = np.ascontiguousarray(batch[i : i + self.max_batch], np.float32)
            n = len(piece)
            if n < self.min_batch:  # a fixed-batch program: pad, then drop the padding
                pad = np.zeros((self.min_batch - n, *piece.shape[1:]), np.float32)
                piece = np.concatenate([piece, pad])
            with _runtime_log() as log:
                try:
                    out = self.method.execute([torch.from_numpy(piece)])
                except Exception as e:  # RuntimeError with the runtime's error code
                    raise InputError(
                        f"ExecuTorch could not run {self.name}: {_reason(e, log)}"
                    ) from None
            parts.append([o.detach().numpy()[:n] for o in out])
        return [np.concatenate(col) for col in zip(*parts, strict=True)]


class PteClassifier(Predictor):
    """An ExecuTorch program (model.pte), with labels and preprocessing read from the program.

    A .pte holds operator names, delegate data and weights, not code: loading it runs only the
    kernels and delegates built into the runtime (docs/security.md).
    """

    backend = "executorch"

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)  # parsed in Python first: a clear error early
        self.program = PteProgram(self.path, self.path.name, threads)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        h, w = self.manifest.preprocessing.input_size
        shape = getattr(batch, "shape", ())
        if (
            not isinstance(batch, np.ndarray)
            or not np.issubdtype(batch.dtype, np.floating)
            or tuple(shape[1:]) != (3, h, w)
        ):
            got = getattr(batch, "dtype", type(batch).__name__)
            raise InputError(
                f"{self.path.name} expects input 'input' as float32 [N, 3, {h}, {w}] "
                f"(normalised NCHW RGB); got {got} {tuple(shape)}"
            )
        logits = self.program.run(batch)[0]
        self.check_outputs(logits.shape)
        return logits


def load_pt2(path: Path):
    """torch.export.load(path).module(), with torch's logged traceback for a damaged archive
    kept off the terminal (the caller turns the exception into one line)."""
    import logging

    import torch

    log = logging.getLogger("torch.export")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        return torch.export.load(str(path)).module()
    finally:
        log.setLevel(level)


class TorchClassifier(Predictor):
    """A TorchScript file, a .pt2 program or a RUN_DIR's eager model, fed numpy batches.

    Preprocessing is the same numpy path as for ONNX (tested equal to torchvision's), so every
    backend sees identical inputs.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import torch

        path = Path(path)
        if threads:
            torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit/export deprecation notes
            if path.is_dir():
                from edgetransfer.runs import load_run  # imports torch: not on the ONNX path

                self.model, self.manifest = load_run(path)
                self.backend = "eager"
            elif path.suffix.lower() == ".pt2":
                self.manifest = read_manifest(path)
                try:
                    self.model = load_pt2(path)
                except Exception as e:  # torch raises many types for a bad archive
                    first = first_line(e)
                    raise ManifestError(
                        f"{path.name} is not a loadable .pt2 program: {first}"
                    ) from None
                self.backend = "pt2"
            else:
                self.manifest = read_manifest(path)  # read as a zip first: no code runs
                try:
                    # TorchScript is code: load only files you exported or trust.
                    self.model = torch.jit.load(str(path), map_location="cpu").eval()
                except Exception as e:  # torch.jit raises RuntimeError and friends
                    first = first_line(e)
                    raise ManifestError(
                        f"{path.name} is not a loadable TorchScript model: {first}"
                    ) from None
                self.backend = "torchscript"
        self.path = path

    @classmethod
    def from_module(cls, model, manifest: Manifest, path: str | os.PathLike) -> TorchClassifier:
        """Wrap an eager model already in memory (adapt's report uses the model it just built)."""
        self = cls.__new__(cls)
        self.model, self.manifest, self.path, self.backend = (
            model.eval(),
            manifest,
            Path(path),
            "eager",
        )
        return self

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            from edgetransfer.backbones import outputs

            try:
                out = outputs(self.model(torch.from_numpy(np.ascontiguousarray(batch, np.float32))))
            except Exception as e:  # whatever the model's own code raises, as for onnxruntime
                first = first_line(e)
                raise InputError(f"{self.path.name} could not run: {first}") from None
            if not isinstance(out[0], torch.Tensor):
                raise ManifestError(f"{self.path.name} does not output a logits tensor")
            logits = out[0].numpy()
        self.check_outputs(logits.shape)
        return logits


def load_predictor(
    model: str | os.PathLike, provider: str = config.PROVIDER, threads: int | None = None
) -> Predictor:
    """The right backend for MODEL: .onnx -> onnxruntime, .pte -> ExecuTorch, .pt -> TorchScript,
    .pt2 -> torch.export, an EXPORT_DIR -> its model.onnx, a RUN_DIR -> the eager model from
    model.safetensors (or, for a run adapted on a backbone bundle, from the source weights the
    bundle was made from and its head: runs.load_run).

    Only the onnxruntime path avoids importing torch.
    """
    path = Path(model)
    if not path.exists():
        raise ManifestError(f"model {path} does not exist")
    if path.is_dir():
        if (path / ARTIFACTS["onnx"]).is_file():
            return OnnxClassifier(path / ARTIFACTS["onnx"], threads, provider=provider)
        bundle_run = (path / ARTIFACTS["head"]).is_file()
        from edgetransfer.runs import eager_here  # runs imports torch only in load_run

        if bundle_run and not eager_here(path):
            raise ManifestError(
                f"{path} was adapted on a backbone bundle and has no PyTorch model here; export "
                "it (`edgetransfer export`) and use its model.onnx"
            )
        if not bundle_run and not (path / ARTIFACTS["weights"]).is_file():
            # Never model.pt/.pt2 implicitly: loading them can run code (name the file instead).
            code = [f for f in CODE_FILES if (path / f).is_file()]
            hint = (
                f" ({code[0]} is not used from a folder: it can run code when loaded; name "
                "the file itself to run it if you trust it)"
                if code
                else ""
            )
            raise ManifestError(
                f"{path} has neither model.onnx nor model.safetensors; pass an EXPORT_DIR, "
                f"a RUN_DIR or a model file{hint}"
            )
        kind = "a RUN_DIR"
    elif path.suffix.lower() == ".onnx":
        return OnnxClassifier(path, threads, provider=provider)
    elif path.suffix.lower() in (".pt", ".pt2", ".pte"):
        kind = path.suffix.lower() + " model"
    else:
        raise ManifestError(
            f"{path.name} is not a model: expected .onnx, .pte, .pt, .pt2, an EXPORT_DIR or a "
            "RUN_DIR"
        )
    if provider != "cpu":
        engine = "ExecuTorch (CPU, XNNPACK)" if kind == ".pte model" else "PyTorch (CPU)"
        raise EdgeTransferError(
            f"--provider {provider} applies to ONNX models; {kind} runs on {engine}"
        )
    if kind == ".pte model":
        return PteClassifier(path, threads)
    return TorchClassifier(path, threads)


def collect_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders (recursively) and glob patterns into image paths."""
    import glob

    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += list_images(p)
        elif p.is_file():
            out.append(p)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                raise DataError(f"{item}: no such file, folder or matching pattern")
            out += [Path(m) for m in matches if Path(m).is_file()]
    if not out:
        raise DataError("no images found in the given paths")
    return out
