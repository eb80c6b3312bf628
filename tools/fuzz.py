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
                {**m.to_dict(), "labels": ["x"] * 3, "io": {"input": "x", "output": "y"}}
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


def fuzz(target: str, n: int, seed: int, crashes: Path | None, work: Path) -> dict:
    rng = random.Random(f"{target}:{seed}")
    if target == "image":
        seeds = [(".img", s) for s in image_seeds()]
        check = check_image
    else:
        seeds = manifest_seeds()
        check = check_manifest
    pool = [s for _, s in seeds]
    counts = {"inputs": 0, "decoded": 0, "rejected": 0, "crashes": 0}
    first_crash = None
    start = time.perf_counter()
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
        counts["inputs"] += 1
        try:
            counts[check(path)] += 1
        except Exception as e:  # noqa: BLE001 - counting crashes is the point
            counts["crashes"] += 1
            if first_crash is None:
                first_crash = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}"
            if crashes is not None:
                crashes.mkdir(parents=True, exist_ok=True)
                (crashes / f"{target}-{seed}-{i}{suffix}").write_bytes(data)
    counts["seconds"] = time.perf_counter() - start
    counts["first_crash"] = first_crash
    return counts


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

    from edgetransfer.train import TrainConfig, fit

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
        checkpoint=path,
        resume=resume,
        fingerprint=CHECKPOINT_FINGERPRINT,
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
    counts = {"inputs": 0, "decoded": 0, "rejected": 0, "crashes": 0}
    first_crash = None
    start = time.perf_counter()
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
        counts["inputs"] += 1
        try:
            counts[check_checkpoint(path, solver)] += 1
        except Exception as e:  # noqa: BLE001 - counting crashes is the point
            counts["crashes"] += 1
            if first_crash is None:
                first_crash = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
            if crashes is not None:
                crashes.mkdir(parents=True, exist_ok=True)
                (crashes / f"checkpoint-{solver}-{seed}-{i}.ckpt").write_bytes(data)
    counts["seconds"] = time.perf_counter() - start
    counts["first_crash"] = first_crash
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000, help="inputs per target [10000]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", choices=["image", "manifest", "checkpoint", "all"], default="all")
    ap.add_argument("--crashes", type=Path, default=None, help="save crashing inputs here")
    args = ap.parse_args(argv)
    targets = ["image", "manifest", "checkpoint"] if args.target == "all" else [args.target]
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
