"""Mutation fuzzer for the readers of untrusted files: the image loader, the manifest reader and
the checkpoint that `adapt --resume` loads.

Every input must end in a decoded 8-bit RGB image of the shape its header declares (or a valid
Manifest), or in one of edgetransfer's own errors (EdgeTransferError). Any other exception is a
crash: it is counted, its input saved under --crashes, and the exit status is 1.

    .venv/bin/python tools/fuzz.py                 # 10,000 inputs per target
    .venv/bin/python tools/fuzz.py -n 2000 --seed 7 --target image

Inputs are valid seeds (every format and Pillow mode the loader supports, manifests in every
container) mutated by bit flips, byte overwrites with boundary values, truncation, splicing and
duplication; a few are plain random bytes. Deterministic for a given --seed.

Target `labels` attaches random manifests (label counts against the model's outputs, duplicates,
case and NFC/NFD twins, control characters, lengths, wrong types, deep nesting) to a real
5-output ONNX model and runs each through read_manifest, predict and evaluate: a model must
never answer with labels that do not fit it, and every refusal is an EdgeTransferError.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from edgetransfer.data import load_image
from edgetransfer.errors import EdgeTransferError
from edgetransfer.manifest import (
    MANIFEST_NAME,
    METADATA_KEY,
    Manifest,
    Preprocessing,
    read_manifest,
)

# Small enough that a mutated header claiming a large size is refused quickly; the property
# under test is the same at any limit.
FUZZ_MAX_PIXELS = 1_000_000
MANIFEST_SUFFIXES = (".json", ".onnx", ".pt", ".safetensors")


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_seeds() -> list[bytes]:
    """Valid images in every supported format and the modes the loader converts."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 17, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    pal = rgb.convert("P")
    seeds = [
        _encode(rgb, "PNG"),
        _encode(rgb, "JPEG", quality=80),
        _encode(rgb, "JPEG", exif=exif, progressive=True),
        _encode(rgb.convert("CMYK"), "JPEG"),
        _encode(rgb.convert("L"), "JPEG"),
        _encode(rgb, "GIF"),
        _encode(rgb, "BMP"),
        _encode(rgb, "WEBP", quality=50),
        _encode(rgb.convert("RGBA"), "WEBP", lossless=True),
        _encode(rgb, "TIFF", compression="tiff_lzw"),
        _encode(rgb.convert("CMYK"), "TIFF"),
        _encode(rgb.convert("1"), "PNG"),
        _encode(rgb.convert("1"), "TIFF", compression="group4"),
        _encode(rgb.convert("LA"), "PNG"),
        _encode(rgb.convert("RGBA"), "PNG"),
        _encode(pal, "PNG", transparency=0),
        _encode(pal, "GIF", transparency=3),
        _encode(Image.fromarray(rng.integers(0, 60000, (9, 7), dtype=np.uint16)), "PNG"),
        _encode(Image.fromarray(rng.integers(-9, 9**6, (9, 7), dtype=np.int32)), "TIFF"),
        _encode(Image.fromarray(rng.standard_normal((9, 7)).astype(np.float32), "F"), "TIFF"),
    ]
    return seeds


def manifest_seeds() -> list[tuple[str, bytes]]:
    """A valid manifest as JSON, inside ONNX metadata, a TorchScript-like zip and safetensors."""
    from onnx import helper
    from safetensors.numpy import save

    m = Manifest(
        arch="tiny_test",
        labels=["cat", "dog", "caf\u00e9"],
        preprocessing=Preprocessing((32, 32), 36, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2)),
        source={"weights": "file"},
        metrics={"val_top1": 0.9},
    )
    text = m.to_json()
    graph = helper.make_graph([], "g", [], [])
    model = helper.make_model(graph)
    helper.set_model_props(model, {METADATA_KEY: text})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/extra/" + MANIFEST_NAME, text)
        zf.writestr("model/data.pkl", b"\x80\x02}q\x00.")
    st = save({"w": np.zeros(3, np.float32)}, metadata={METADATA_KEY: text})
    return [
        (".json", text.encode()),
        (".onnx", model.SerializeToString()),
        (".pt", buf.getvalue()),
        (".safetensors", st),
        (
            ".json",
            json.dumps(
                {**m.to_dict(), "labels": ["x", "y", "z"], "io": {"input": "x", "output": "y"}}
            ).encode(),
        ),
    ]


_INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff", b"\x00\x00",
                struct.pack(">I", 0x7FFFFFFF), struct.pack("<I", 0xFFFFFFFF),
                struct.pack(">I", 40000), b"[", b"{", b'"', b"-1", b"1e999", b"NaN"]  # fmt: skip


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four random mutations of `data` (another seed from `pool` may be spliced in)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip bits
            i = min(pos, len(b) - 1)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # overwrite with a boundary value
            v = rng.choice(_INTERESTING)
            b[pos : pos + len(v)] = v
        elif op == 2:  # truncate
            del b[pos:]
        elif op == 3:  # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and b:  # delete a run
            del b[pos : pos + rng.randint(1, 32)]
        elif op == 5:  # splice in part of another seed
            other = rng.choice(pool)
            start = rng.randrange(len(other))
            b[pos:pos] = other[start : start + rng.randint(1, 64)]
        elif op == 6 and b:  # duplicate a run
            start = rng.randrange(len(b))
            b[pos:pos] = b[start : start + rng.randint(1, 64)]
    return bytes(b)


def check_image(path: Path) -> str:
    """'decoded' or 'rejected'; raises on anything that is neither (a crash)."""
    try:
        img = load_image(path, max_pixels=FUZZ_MAX_PIXELS)
    except EdgeTransferError:
        return "rejected"
    a = np.asarray(img)
    if img.mode != "RGB" or a.dtype != np.uint8 or a.shape != (img.height, img.width, 3):
        raise AssertionError(f"decoded to mode {img.mode} {a.dtype} {a.shape}, not 8-bit RGB")
    if img.width * img.height > FUZZ_MAX_PIXELS:
        raise AssertionError(f"decoded {img.size} past the pixel limit")
    return "decoded"


def check_manifest(path: Path) -> str:
    try:
        m = read_manifest(path)
    except EdgeTransferError:
        return "rejected"
    if not isinstance(m, Manifest) or not m.labels or not all(isinstance(x, str) for x in m.labels):
        raise AssertionError(f"read an invalid manifest: {m!r}")
    Manifest.from_json(m.to_json())  # what was accepted must also round-trip
    return "decoded"


class _Tally:
    """One target's counts: inputs, decoded, rejected, crashes (a crash keeps its first
    traceback, and its input when `crashes` is a folder), and the seconds taken."""

    def __init__(self, crashes: Path | None, limit: int = 4) -> None:
        self.counts = {"inputs": 0, "decoded": 0, "rejected": 0, "crashes": 0}
        self.first_crash: str | None = None
        self.crashes, self.limit, self.start = crashes, limit, time.perf_counter()

    def run(self, data: bytes, name: str, check, *args, **kw) -> None:
        """Count `check(*args, **kw)` ('decoded' or 'rejected'); any exception is a crash of
        `data`, saved as `name`."""
        self.counts["inputs"] += 1
        try:
            self.counts[check(*args, **kw)] += 1
        except Exception as e:  # noqa: BLE001 - counting crashes is the point
            self.counts["crashes"] += 1
            if self.first_crash is None:
                tb = traceback.format_exc(limit=self.limit)
                self.first_crash = f"{type(e).__name__}: {e}\n{tb}"
            if self.crashes is not None:
                self.crashes.mkdir(parents=True, exist_ok=True)
                (self.crashes / name).write_bytes(data)

    def result(self) -> dict:
        seconds = time.perf_counter() - self.start
        return {**self.counts, "seconds": seconds, "first_crash": self.first_crash}


def fuzz(target: str, n: int, seed: int, crashes: Path | None, work: Path) -> dict:
    if target == "labels":
        return fuzz_labels(n, seed, crashes, work)
    rng = random.Random(f"{target}:{seed}")
    if target == "image":
        seeds = [(".img", s) for s in image_seeds()]
        check = check_image
    else:
        seeds = manifest_seeds()
        check = check_manifest
    pool = [s for _, s in seeds]
    tally = _Tally(crashes)
    for i in range(n):
        suffix, base = rng.choice(seeds)
        if target == "manifest" and rng.random() < 0.3:
            suffix = rng.choice(MANIFEST_SUFFIXES)  # the wrong container for the bytes
        if rng.random() < 0.03:
            data = rng.randbytes(rng.randint(0, 256))
        elif rng.random() < 0.05:
            data = base  # the unmutated seed must always be accepted
        else:
            data = mutate(rng, base, pool)
        path = work / f"input{suffix}"
        path.write_bytes(data)
        tally.run(data, f"{target}-{seed}-{i}{suffix}", check, path)
    return tally.result()


# ------------------------------------------------------------------- manifests against a model

LABELS_BASE = ["cat", "dog", "caf\u00e9", "bird", "fish"]  # the fuzz model has 5 outputs
_HOSTILE_TEXT = [
    "\x1b", "\x1b]0;title\x07", "\x1b[2J", "\r", "\n", "\x7f", "\x9b", "\x00", "\t", "\u2028",
    "\u202e", "\ud800", "\u200d", "\u0301", "$\\foo$", "\U0001f408", "\u732b", " ", "/", "..",
]  # fmt: skip
_WRONG_TYPES = [None, 1, 1.5, True, [], {}, ["cat"], {"a": "b"}]


def labels_model(dynamic: bool) -> onnx.ModelProto:
    """A real 5-output ONNX classifier for 5x5 inputs: the mean over channels and rows.

    With `dynamic` the input's height and width are named, not fixed, so the output width is
    known only when it runs (the run-time label check); otherwise it is declared as 5.
    """
    from onnx import TensorProto, helper

    h, w = ("H", "W") if dynamic else (5, 5)
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, h, w])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "W" if dynamic else 5])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    node = helper.make_node("ReduceMean", ["input", "axes"], ["logits"], keepdims=0)
    graph = helper.make_graph([node], "labels_fuzz", [x], [y], initializer=[axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def labels_manifest(rng: random.Random) -> str:
    """A manifest for the 5-output model as JSON text, its labels (sometimes more) mutated:
    counts, duplicates, case, NFC/NFD forms, control characters, lengths, types, nesting."""
    import unicodedata

    labels: list = list(LABELS_BASE)
    deep = 0
    for _ in range(rng.randint(0, 3)):
        op = rng.randrange(10)
        i = rng.randrange(len(labels)) if labels else 0
        if op == 0:  # count: fewer or more than the outputs
            k = rng.choice([0, 1, 4, 6, 10, 1000, 100_001] if rng.random() < 0.05 else [0, 4, 6])
            labels = (labels + [f"extra{j}" for j in range(k)])[:k] if k > 5 else labels[:k]
        elif op == 1 and labels:  # a duplicate
            labels[i] = rng.choice(labels)
        elif op == 2 and labels and isinstance(labels[i], str):  # case
            labels[i] = rng.choice([labels[i].upper(), labels[i].title()])
        elif op == 3 and labels and isinstance(labels[i], str):  # another normal form
            labels[i] = unicodedata.normalize(rng.choice(["NFC", "NFD", "NFKD"]), labels[i])
        elif op == 4 and labels and isinstance(labels[i], str):  # hostile characters
            at = rng.randint(0, len(labels[i]))
            labels[i] = labels[i][:at] + rng.choice(_HOSTILE_TEXT) + labels[i][at:]
        elif op == 5 and labels:  # length
            labels[i] = "x" * rng.choice([0, 1, 255, 256, 257, 4096, 100_000])
        elif op == 6 and labels:  # wrong type for one label
            labels[i] = rng.choice(_WRONG_TYPES)
        elif op == 7:  # wrong type for the list
            labels = rng.choice(_WRONG_TYPES + ["cat,dog"])
            break
        elif op == 8:  # deep nesting in place of the list (or of one label)
            deep = rng.choice([2, 50, 1000, 100_000])
            break
        elif op == 9 and labels:  # a plain valid rename
            labels[i] = rng.choice(["\u732b", "a b", "x" * 40, "\U0001f408"])
    d = Manifest(
        arch="tiny_test",
        labels=["a"],
        preprocessing=Preprocessing((5, 5), 5, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    ).to_dict()
    d["labels"] = "@@DEEP@@" if deep else labels
    if rng.random() < 0.1:  # the source task's labels follow the same rules
        d["source"] = {"labels": rng.choice([list(labels) if isinstance(labels, list) else 1])}
    if rng.random() < 0.05:
        d["io"] = {"input": "input", "output": rng.choice(["logits", "nope", ""])}
    text = json.dumps(d, ensure_ascii=rng.random() < 0.5)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate travels as a \\ud800 escape only
            text = json.dumps(d)
    if deep:
        text = text.replace('"@@DEEP@@"', "[" * deep + '"cat"' + "]" * deep)
    return text


def _labels_data(work: Path) -> Path:
    """One folder per base label, two 12x12 images each, and one unreadable file."""
    data = work / "labels_data"
    rng = np.random.default_rng(0)
    for c, name in enumerate(LABELS_BASE):
        (data / name).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            arr = rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)
            arr[..., c % 3] = 255
            Image.fromarray(arr).save(data / name / f"{i}.png")
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return data


def check_labels_case(path: Path, data: Path, cli: bool = False) -> str:
    """Read, predict and evaluate with the manifest inside `path`; 'decoded' when every path
    accepted it, 'rejected' on edgetransfer's own error. Raises on anything else.

    With `cli`, an accepted model also goes through `edgetransfer predict`, whose output must
    hold no control character but newlines.
    """
    from edgetransfer.evaluate import evaluate
    from edgetransfer.runtime import OnnxClassifier, collect_images

    try:
        manifest = read_manifest(path)
        clf = OnnxClassifier(path, threads=1)
        skipped: list[tuple[str, str]] = []
        preds = clf.predict(collect_images([str(data)]), topk=3, skipped=skipped)
        res = evaluate(path, data, predictor=clf)
    except EdgeTransferError:
        return "rejected"
    labels = manifest.labels
    if clf.manifest.labels != labels or len(labels) != 5:
        raise AssertionError(f"accepted {len(labels)} labels for a 5-output model")
    if len(skipped) != 1 or not preds or any(len(p.logits) != 5 for p in preds):
        raise AssertionError(f"predict kept {len(preds)}, skipped {len(skipped)}")
    for p in preds:
        if any(lb not in labels for lb, _ in p.topk):
            raise AssertionError(f"predicted a label not in the manifest: {p.topk}")
    if res.metrics.labels != labels or res.metrics.images != 10 or len(res.skipped) != 1:
        raise AssertionError(f"evaluate counted {res.metrics.images} images")
    if cli:
        import unicodedata

        from click.testing import CliRunner

        from edgetransfer.cli import cli as command

        out = CliRunner().invoke(command, ["predict", str(path), str(data), "--threads", "1"])
        if out.exit_code != 0:
            raise AssertionError(f"predict exited {out.exit_code}: {out.output[-300:]!r}")
        bad = {c for c in out.output if unicodedata.category(c) == "Cc" and c != "\n"}
        if bad:
            raise AssertionError(f"predict printed control characters {sorted(bad)!r}")
    return "decoded"


def fuzz_labels(n: int, seed: int, crashes: Path | None, work: Path) -> dict:
    """`n` random manifests attached to a real 5-output ONNX model, each run through
    read_manifest, predict and evaluate: counts like :func:`fuzz`."""
    import warnings

    from edgetransfer.errors import EdgeTransferWarning

    rng = random.Random(f"labels:{seed}")
    data = _labels_data(work)
    models = {dyn: labels_model(dyn) for dyn in (False, True)}
    tally = _Tally(crashes)
    for i in range(n):
        text = labels_manifest(rng)
        model = onnx.ModelProto()
        model.CopyFrom(models[rng.random() < 0.5])
        model.metadata_props.add(key=METADATA_KEY, value=text)
        path, blob = work / "model.onnx", model.SerializeToString()
        path.write_bytes(blob)
        cli = rng.random() < 0.05
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EdgeTransferWarning)  # case-only labels warn
            tally.run(blob, f"labels-{seed}-{i}.onnx", check_labels_case, path, data, cli=cli)
    return tally.result()


# ---------------------------------------------------------------------------------------------
# checkpoint mode: mutated and hand-built training checkpoints fed to train.fit(resume=True);
# each must resume (and train on without error) or be refused with EdgeTransferError.

CHECKPOINT_FINGERPRINT = "fuzz"
_CKPT_SOLVERS = ("adamw", "lbfgs")


def _ckpt_problem():
    """The tiny run every checkpoint belongs to: a Linear head on 24 fixed vectors."""
    import torch

    from edgetransfer.train import TensorBatches

    g = torch.Generator().manual_seed(0)
    y = torch.arange(24) % 3
    x = torch.randn(24, 6, generator=g) + torch.randn(3, 6, generator=g)[y]
    return TensorBatches(x, y, 8, 0), TensorBatches(x, y, 24, 0, shuffle=False)


def _ckpt_fit(solver: str, path: Path, epochs: int, resume: bool, on_step=None):
    import torch

    from edgetransfer.train import Checkpoint, TrainConfig, fit

    train, val = _ckpt_problem()
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3)
    cfg = TrainConfig(epochs=epochs, batch_size=8, patience=0, solver=solver, weight_decay=1e-3)
    return fit(
        head,
        [{"params": list(head.parameters()), "lr": 1e-2}],
        train,
        val,
        lambda logits, y, idx: torch.nn.functional.cross_entropy(logits, y),
        cfg,
        checkpoint=Checkpoint(path, CHECKPOINT_FINGERPRINT),
        resume=resume,
        on_step=on_step,
    )


def checkpoint_seeds(work: Path) -> list[tuple[str, bytes]]:
    """Real checkpoints, (solver, bytes): after epoch 2 of 2 for both solvers, and AdamW
    stopped by SIGINT in the middle of epoch 2 (a resume then trains on; see check_checkpoint)."""
    import os
    import signal

    from edgetransfer.train import Interrupted

    seeds = []
    for solver in _CKPT_SOLVERS:
        path = work / f"seed-{solver}.ckpt"
        _ckpt_fit(solver, path, 2, False)
        seeds.append((solver, path.read_bytes()))

    def stop(epoch, step):
        if (epoch, step) == (2, 2):
            os.kill(os.getpid(), signal.SIGINT)  # train.Stop: checkpoint, then Interrupted

    path = work / "seed-mid.ckpt"
    try:
        _ckpt_fit("adamw", path, 2, False, on_step=stop)
    except Interrupted:
        pass
    seeds.append(("adamw", path.read_bytes()))
    return seeds


def check_checkpoint(path: Path, solver: str) -> str:
    """'decoded' (resumed and trained to the end) or 'rejected'; raises on anything else."""
    try:
        res = _ckpt_fit(solver, path, 3, True)
    except EdgeTransferError as e:
        if "\n" in str(e) or "weights_only" in str(e):
            raise AssertionError(f"refusal is not one plain line: {e}") from None
        return "rejected"
    done = len(res.history)  # 3 epochs, or fewer after a stop (patience, L-BFGS converged)
    if not (1 <= res.best_epoch <= done <= 3) or (done < 3 and not res.stopped_early):
        raise AssertionError(f"resumed into an inconsistent result: {res.history}")
    return "decoded"


def _odd_value(rng: random.Random):
    import torch

    dtype = rng.choice([torch.float32, torch.float64, torch.float16, torch.int64, torch.uint8,
                        torch.bool])  # fmt: skip
    shape = [rng.choice([0, 1, 2, 3, 5, 6, 18]) for _ in range(rng.randint(0, 3))]
    return rng.choice([
        None, True, False, -1, 0, 1, 2, 3, 2**40, -(2**63), 0.5, float("nan"), float("inf"),
        "x", "", [], {}, [None], [1, 2], {"a": 1}, (1, 2), torch.zeros(0),
        torch.zeros(shape).to(dtype), torch.full([3, 6], float("nan")), torch.tensor(1.0),
    ])  # fmt: skip


def _nodes(obj, where=()):
    """Every (path) into nested dicts/lists/tuples, the root included."""
    yield where
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nodes(v, (*where, k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _nodes(v, (*where, i))


def _get(obj, where):
    for k in where:
        obj = obj[k]
    return obj


def _set(obj, where, value):
    """`obj` with the node at `where` replaced (tuples rebuilt), or removed when value is
    _DELETE."""
    if not where:
        return value
    parent = _get(obj, where[:-1])
    key = where[-1]
    if isinstance(parent, tuple):
        items = list(parent)
        if value is _DELETE:
            del items[key]
        else:
            items[key] = value
        return _set(obj, where[:-1], tuple(items))
    if value is _DELETE:
        del parent[key]
    else:
        parent[key] = value
    return obj


_DELETE = object()


def mutate_state(rng: random.Random, state):
    """One to three structural mutations of a checkpoint's state (a deep copy)."""
    import copy

    import torch

    state = copy.deepcopy(state)
    for _ in range(rng.randint(1, 3)):
        nodes = list(_nodes(state))
        where = rng.choice(nodes[1:] or nodes) if rng.random() < 0.97 else ()
        node = _get(state, where)
        op = rng.randrange(6)
        if op == 0 and where:
            value = _DELETE
        elif op == 1:
            value = _odd_value(rng)
        elif op == 2 and isinstance(node, torch.Tensor):  # same data, another shape or type
            flat = node.flatten()
            value = rng.choice([
                flat, flat[: max(0, flat.numel() - 1)], torch.cat([flat, flat[:1]]),
                node.to(torch.float64), node.to(torch.int64), node.unsqueeze(0),
                node.t() if node.dim() == 2 else node.flip(0) if node.dim() else node * 2,
                torch.full_like(node, float("nan")) if node.is_floating_point() else node + 1,
            ])  # fmt: skip
        elif op == 3 and isinstance(node, list):
            value = node[: rng.randrange(len(node) + 1)] + node[: rng.randrange(3)]
        elif op == 4 and isinstance(node, dict):
            value = {**node, rng.choice(["x", 0, "step", "best"]): _odd_value(rng)}
        else:
            value = copy.deepcopy(_get(state, rng.choice(nodes)))  # another part's value
        try:
            state = _set(state, where, value)
        except (KeyError, IndexError, TypeError):
            pass
    return state


def fuzz_checkpoint(n: int, seed: int, crashes: Path | None, work: Path) -> dict:
    """Mode `checkpoint`: same counts as :func:`fuzz` (decoded: resumed and trained on)."""
    import io as _io

    import torch

    rng = random.Random(f"checkpoint:{seed}")
    seeds = checkpoint_seeds(work)
    states = [(solver, torch.load(_io.BytesIO(b), weights_only=True)) for solver, b in seeds]
    pool = [b for _, b in seeds]
    tally = _Tally(crashes, limit=6)
    path = work / "input.ckpt"
    for i in range(n):
        solver, state = rng.choice(states)
        r = rng.random()
        if r < 0.15:  # bytes: flipped, cut, spliced or random
            data = mutate(rng, rng.choice(pool), pool) if r < 0.12 else rng.randbytes(256)
        else:
            buf = _io.BytesIO()
            torch.save(state if r < 0.17 else mutate_state(rng, state), buf)
            data = buf.getvalue()
        path.write_bytes(data)
        tally.run(data, f"checkpoint-{solver}-{seed}-{i}.ckpt", check_checkpoint, path, solver)
    return tally.result()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="inputs per target [10000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--target", choices=["image", "manifest", "labels", "checkpoint", "all"], default="all"
    )
    ap.add_argument("--crashes", type=Path, default=None, help="save crashing inputs here")
    args = ap.parse_args(argv)
    targets = (
        ["image", "manifest", "labels", "checkpoint"] if args.target == "all" else [args.target]
    )
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for t in targets:
            if t == "checkpoint":
                rows.append((t, fuzz_checkpoint(args.n, args.seed, args.crashes, Path(work))))
            else:
                rows.append((t, fuzz(t, args.n, args.seed, args.crashes, Path(work))))
    print(
        f"{'target':<10} {'inputs':>8} {'decoded':>8} {'rejected':>9} {'crashes':>8} {'time s':>8}"
    )
    for t, c in rows:
        print(
            f"{t:<10} {c['inputs']:>8} {c['decoded']:>8} {c['rejected']:>9} {c['crashes']:>8} "
            f"{c['seconds']:>8.1f}"
        )
    bad = [(t, c) for t, c in rows if c["crashes"]]
    for t, c in bad:
        print(f"\nfirst crash in {t}: {c['first_crash']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
