"""The contract every artifact carries: labels, preprocessing, provenance (edgetransfer.json)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import unicodedata
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetransfer.errors import EdgeTransferError, EdgeTransferWarning, ManifestError
from edgetransfer.ptefile import read_pte

SCHEMA = 1
MANIFEST_NAME = "edgetransfer.json"
RUN_INFO = "run.json"  # RUN_DIR only: where its data (and bundle) live on this machine
METADATA_KEY = "edgetransfer"  # ONNX metadata_props key and safetensors metadata key
MAX_SIDE = 16384  # largest input_size / resize a manifest may declare
# Real normalisations (std ~0.2, 1/255 at most; mean within 0..1, 127.5 at most) sit far inside
# these; past them inputs overflow float32 (std 1e-45) or mean nothing. cpp_demo checks the same.
STD_RANGE = (1e-4, 1e4)
MAX_ABS_MEAN = 1e4
# Pillow's antialiased filters, which data.resize_crop, torchvision on PIL images and the C++
# demo (cpp_demo/common.cpp) all reproduce pixel for pixel; bicubic is what some pretrained
# weights were evaluated with (timm's tf_efficientnet_lite0)
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_MANIFEST = 1 << 20  # bytes; a manifest is a few KiB
# The one table of artifact files in a RUN_DIR / EXPORT_DIR: kind -> file name. Every module
# that writes, finds or loads an artifact names it through this table.
ARTIFACTS = {
    "weights": "model.safetensors",
    "onnx": "model.onnx",
    "raw": "model.raw.onnx",
    "optimized": "model.opt.onnx",
    "int8": "model.int8.onnx",
    "fp16": "model.fp16.onnx",
    "torchscript": "model.pt",
    "pt2": "model.pt2",
    "pte": "model.pte",
    # a run adapted on a backbone bundle (device.py): the head alone, and the bundle it sits on
    "head": "head.safetensors",
    "bundle": "backbone.onnx",
}
# ExecuTorch constant methods a .pte carries: the manifest JSON, and [min, max] batch the
# forward method accepts (memory is planned for max), so a C++ app needs no sidecar file.
PTE_MANIFEST_METHOD = "edgetransfer_manifest"
PTE_BATCH_METHOD = "edgetransfer_batch"
# Artifacts whose loading can run code, and why: loaded from a folder only when the user says
# the folder is trusted (--trust-torchscript). TorchScript archives carry code (their
# __setstate__ runs at load); torch.export.load unpickles weights and constants stored with
# use_pickle (torch.load(weights_only=False), pickle.loads).
CODE_FILES = {
    ARTIFACTS["torchscript"]: "TorchScript is code and runs when loaded",
    ARTIFACTS["pt2"]: "torch.export's loader unpickles, which can run code",
}


def untrusted_skip(fname: str, not_done: str) -> str:
    """The one line saying a code-carrying file in a folder was skipped, e.g. "not verified"."""
    return (
        f"{fname} {not_done}: {CODE_FILES[fname]}; pass --trust-torchscript to include it "
        "(only for a folder you exported or trust)"
    )


# Labels are printed to terminals, drawn in plots and written one per line to labels.txt: a sane
# length, and a count far above any real task (ImageNet-21k has 21,841 classes).
MAX_LABEL_CHARS = 256
MAX_LABELS = 100_000
# Line and paragraph separators and the bidirectional overrides/isolates: they break labels.txt
# or make a printed label read differently from what it is ("Trojan Source").
_REFUSED_CHARS = frozenset("\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def label_problem(label: str) -> str | None:
    """Why `label` cannot be a class name (None if it can): empty, too long, not valid Unicode,
    or holding a control character (C0/C1 incl. ESC, CR, DEL; line separators; bidi controls).
    """
    if not label:
        return "is empty"
    if len(label) > MAX_LABEL_CHARS:
        return f"is {len(label):,} characters long (at most {MAX_LABEL_CHARS})"
    for ch in label:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            return "is not valid Unicode (a lone surrogate)"
        if cat == "Cc" or ch in _REFUSED_CHARS:
            return f"contains the control character U+{ord(ch):04X}"
    return None


def show_label(label: str) -> str:
    """A label quoted for a one-line message: control and invisible characters escaped."""
    return ascii(label[:60] + ("..." if len(label) > 60 else ""))


def check_labels(
    labels: Sequence[str],
    what: str = "manifest label",
    error: type[EdgeTransferError] = ManifestError,
    fix: str = "re-export the model with valid class names",
    warn_case: bool = True,
) -> None:
    """Refuse labels that are not unique after NFC normalisation or that fail
    :func:`label_problem` (raising `error`); warn when two differ only in case.

    Args:
        what: how the message names one label ("manifest label", "class folder").
        fix: what the user can do about a refused label.
        warn_case: warn about case-only pairs (not for a source task's labels: ImageNet's
            own 'Cardigan'/'cardigan' would warn on every read of every run).
    """
    if len(labels) > MAX_LABELS:
        raise error(f"{len(labels):,} {what}s is more than the {MAX_LABELS:,} supported")
    seen: dict[str, str] = {}
    folded: dict[str, str] = {}
    for label in labels:
        problem = label_problem(label)
        if problem:
            raise error(f"{what} {show_label(label)} {problem}; {fix}")
        key = unicodedata.normalize("NFC", label)
        if key in seen:
            same = "the same" if seen[key] == label else "the same after Unicode normalisation"
            raise error(
                f"{what}s {show_label(seen[key])} and {show_label(label)} are {same}; "
                "class names must be unique"
            )
        seen[key] = label
        fold = key.casefold()
        if fold in folded and warn_case:
            # Worded alike for folders and manifests: the CLI prints a repeated warning once.
            warnings.warn(
                f"classes {show_label(folded[fold])} and {show_label(label)} differ only in "
                "case: they stay separate classes (and collide on case-insensitive file "
                "systems); merge or rename them if they are one class",
                EdgeTransferWarning,
                stacklevel=3,
            )
        else:
            folded[fold] = label


@dataclass(frozen=True)
class Preprocessing:
    """How a decoded RGB image becomes the model's input tensor.

    Resize the shorter side to `resize` (keeping aspect ratio; `interpolation` is Pillow's
    antialiased bilinear or bicubic), crop `input_size` from the centre, scale to [0, 1],
    subtract `mean`, divide by `std`; NCHW float32.
    """

    input_size: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop: str = "center"
    interpolation: str = "bilinear"
    color: str = "RGB"
    layout: str = "NCHW"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("input_size", "mean", "std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        try:
            p = cls(
                input_size=(int(d["input_size"][0]), int(d["input_size"][1])),
                resize=int(d["resize"]),
                mean=tuple(float(v) for v in d["mean"]),
                std=tuple(float(v) for v in d["std"]),
                crop=d.get("crop", "center"),
                interpolation=d.get("interpolation", "bilinear"),
                color=d.get("color", "RGB"),
                layout=d.get("layout", "NCHW"),
            )
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise ManifestError(f"invalid preprocessing in manifest: {e!r}") from None
        finite = all(math.isfinite(v) for v in (*p.mean, *p.std))
        sane = all(abs(v) <= MAX_ABS_MEAN for v in p.mean) and all(
            STD_RANGE[0] <= v <= STD_RANGE[1] for v in p.std
        )
        if len(p.mean) != 3 or len(p.std) != 3 or not finite or not sane:
            raise ManifestError(
                "invalid preprocessing in manifest: mean/std need 3 finite values, "
                f"|mean| <= {MAX_ABS_MEAN:g}, std in [{STD_RANGE[0]:g}, {STD_RANGE[1]:g}]"
            )
        if max(p.resize, *p.input_size) > MAX_SIDE:  # a hostile file must not size our buffers
            raise ManifestError(f"invalid preprocessing in manifest: sizes above {MAX_SIDE} pixels")
        if p.crop != "center" or p.interpolation not in INTERPOLATIONS or p.color != "RGB":
            raise ManifestError(
                f"unsupported preprocessing (crop={p.crop}, interpolation={p.interpolation}, "
                f"color={p.color}); this version supports center, "
                f"{'/'.join(INTERPOLATIONS)}, RGB"
            )
        if min(p.input_size) < 1 or p.resize < max(p.input_size):
            raise ManifestError("invalid preprocessing in manifest: resize smaller than input_size")
        return p

    def with_size(self, size: int) -> Preprocessing:
        """Same preprocessing at a new square input size, keeping the resize/crop ratio."""
        ratio = self.resize / self.input_size[0]
        return dataclasses.replace(self, input_size=(size, size), resize=int(round(size * ratio)))


@dataclass(frozen=True)
class Manifest:
    """edgetransfer.json, schema 1. Free-form sections stay plain dicts."""

    arch: str
    labels: list[str]
    preprocessing: Preprocessing
    io: dict[str, str] = field(default_factory=lambda: {"input": "input", "output": "logits"})
    source: dict[str, Any] = field(default_factory=dict)
    adapt: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "arch": self.arch,
            "labels": list(self.labels),
            "preprocessing": self.preprocessing.to_dict(),
            "io": dict(self.io),
            "source": self.source,
            "adapt": self.adapt,
            "data": self.data,
            "metrics": self.metrics,
            "versions": self.versions,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        if not isinstance(d, dict):
            raise ManifestError("manifest is not a JSON object")
        if d.get("schema") != SCHEMA:
            raise ManifestError(
                f"manifest schema {d.get('schema')!r} is not supported (expected {SCHEMA}); "
                "re-export the model with this edgetransfer version"
            )
        labels = d.get("labels")
        if (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(x, str) for x in labels)
        ):
            raise ManifestError("manifest has no valid 'labels' list")
        check_labels(labels)
        if not isinstance(d.get("arch"), str):
            raise ManifestError("manifest has no 'arch'")
        sections = {}
        for key in ("io", "source", "adapt", "data", "metrics", "versions"):
            value = d.get(key, {})
            if not isinstance(value, dict):
                raise ManifestError(f"manifest section {key!r} is not an object")
            sections[key] = value
        if not all(isinstance(v, str) for v in sections["io"].values()):
            raise ManifestError("manifest section 'io' must map to tensor names (strings)")
        source_labels = sections["source"].get("labels")
        if source_labels is not None:  # the source task's classes, kept with --keep-source-head
            if not isinstance(source_labels, list) or not all(
                isinstance(x, str) for x in source_labels
            ):
                raise ManifestError("manifest 'source.labels' is not a list of strings")
            check_labels(source_labels, "manifest source label", warn_case=False)
        if "io" not in d:
            sections["io"] = {"input": "input", "output": "logits"}
        return cls(
            arch=d["arch"],
            labels=list(labels),
            preprocessing=Preprocessing.from_dict(d.get("preprocessing") or {}),
            **sections,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest is not valid JSON: {e}") from None
        except RecursionError:
            raise ManifestError("manifest is not valid JSON: nested too deeply") from None
        return cls.from_dict(d)


def raw_manifest(manifest: Manifest) -> Manifest:
    """The manifest a raw-pixel model carries: same labels/preprocessing, its own io."""
    io_names = {
        "input": "image",
        "output": "logits",
        "probs": "probs",
        "input_format": "uint8 NHWC RGB at input_size, resized and cropped by the caller; "
        "normalisation is inside the model",
    }
    if "source_output" in manifest.io:
        io_names["source_output"] = manifest.io["source_output"]
    return dataclasses.replace(manifest, io=io_names)


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read the manifest from a RUN_DIR/EXPORT_DIR, a .json, .onnx, .pt, .pt2, .pte or
    .safetensors file.

    TorchScript files are read as zip archives and .pte programs as flatbuffers, so no model
    code is loaded or run.
    """
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path} does not exist")
    if path.is_dir():
        mf = path / MANIFEST_NAME
        if not mf.is_file():
            raise ManifestError(f"{path} has no {MANIFEST_NAME}; is it a RUN_DIR or EXPORT_DIR?")
        return Manifest.from_json(mf.read_bytes())
    suffix = path.suffix.lower()
    if suffix == ".json":
        return Manifest.from_json(path.read_bytes())
    if suffix == ".onnx":
        return Manifest.from_json(_onnx_metadata(path))
    if suffix in (".pt", ".pt2", ".ts", ".zip"):
        return Manifest.from_json(_zip_extra(path))
    if suffix == ".safetensors":
        return Manifest.from_json(_safetensors_metadata(path))
    if suffix == ".pte":
        return Manifest.from_json(pte_manifest_json(path))
    raise ManifestError(
        f"cannot read a manifest from {path.name}: expected a folder, .onnx, .pt, .pt2, .pte, "
        ".safetensors or .json"
    )


def pte_manifest_json(path: Path) -> str:
    """The manifest JSON an ExecuTorch program returns from its constant method."""
    value = read_pte(path).methods.get(PTE_MANIFEST_METHOD)
    if not value or not isinstance(value[0], str):
        raise ManifestError(
            f"{Path(path).name} carries no edgetransfer metadata; export it with edgetransfer"
        )
    if len(value[0]) > MAX_MANIFEST:
        raise ManifestError(f"{Path(path).name}: its manifest is implausibly large")
    return value[0]


def _onnx_metadata(path: Path) -> str:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others
        raise ManifestError(f"{path.name} is not a readable ONNX model: {e}") from None
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return prop.value
    raise ManifestError(
        f"{path.name} carries no edgetransfer metadata; export it with edgetransfer"
    )


def _zip_extra(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                if name.endswith("/extra/" + MANIFEST_NAME) or name == "extra/" + MANIFEST_NAME:
                    # Read at most MAX_MANIFEST bytes: the size in the zip header can lie.
                    with zf.open(name) as f:
                        data = f.read(MAX_MANIFEST + 1)
                    if len(data) > MAX_MANIFEST:
                        raise ManifestError(f"{path.name}: its manifest is implausibly large")
                    return data.decode("utf-8")
    except ManifestError:
        raise
    except Exception as e:  # zipfile raises many types on damaged archives (zlib, EOF, ...)
        raise ManifestError(f"{path.name} is not a TorchScript archive: {e}") from None
    raise ManifestError(
        f"{path.name} carries no edgetransfer metadata; export it with edgetransfer"
    )


def _safetensors_metadata(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError
        raise ManifestError(f"{path.name} is not a readable safetensors file: {e}") from None
    if METADATA_KEY not in meta:
        raise ManifestError(f"{path.name} carries no edgetransfer metadata")
    return meta[METADATA_KEY]


def versions() -> dict[str, str]:
    """Versions of the libraries that shape an artifact, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    from edgetransfer import __version__

    out = {"edgetransfer": __version__}
    for pkg in ("torch", "torchvision", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
