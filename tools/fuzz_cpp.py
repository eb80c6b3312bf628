"""Fuzz the C++ demo (et_onnx, et_torchscript, et_executorch) with hostile images, models and
golden folders.

Every run must end in exit 0 (finite logits as JSON lines), exit 1 (a --selftest mismatch) or a
refusal: exit 2 with one line on stderr (after the two lines describing a loaded model). Anything
else is a finding: a sanitizer report, a signal, a hang (past --timeout), a memory blow-up, a
refusal of several lines, another exit code. Findings are counted, their inputs saved under
--crashes, and the exit status is 1.

    tools/build_cpp_demo.sh --asan                         # cpp_demo/build-asan
    .venv/bin/python tools/fuzz_cpp.py EXPORT_DIR -n 3000  # an EXPORT_DIR of edgetransfer export
    .venv/bin/python tools/fuzz_cpp.py EXPORT_DIR --seconds 40 --json report.json

Inputs: valid seeds (JPEGs: baseline, progressive, gray, CMYK, EXIF-rotated; PNGs: RGB, RGBA,
palette with and without transparency, gray+alpha, 16-bit, 1-bit, interlaced) mutated by bit
flips, boundary bytes, random runs, truncation, splicing and duplication, PNG chunk CRCs fixed up
half the time so the mutation reaches the decoder; the export's model.onnx mutated as bytes and as
a graph (sequence/optional outputs and inputs, wrong, zero and huge dims, other element types, more
outputs, no metadata) and its manifest mutated as JSON (any key dropped or set to a hostile value,
deep nesting, huge or control-character labels); the golden folder with hostile names (../,
absolute, /dev/zero, FIFOs, symlinks out), damaged .bin files and PNGs, and bad shapes or
tolerances. et_torchscript gets the same images and golden folders, and model.pt with mutated
edgetransfer.json. et_executorch gets them too, and model.pte mutated: the program's flatbuffer
(which the runtime verifies), truncation anywhere, renamed constant methods, damaged weights, and
the manifest rewritten in place. Not the XNNPACK delegate's serialized graph: XNNPACK trusts its
numbers, and mutating them crashed inside XNNPACK (3 SIGSEGV and 1 multi-GB allocation in 300
runs), which et_executorch reports in one line but cannot make safe. Each program runs when the
EXPORT_DIR has its model (--programs to choose). Deterministic for a given --seed (but for what
--seconds cuts off).

With the sanitizer build ASan's own limits stand in for RLIMIT_AS, whose shadow memory it would
exhaust: hard_rss_limit_mb and allocator_may_return_null. A release build (--build
cpp_demo/build) runs under RLIMIT_AS instead.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROGRAMS = {"et_onnx": "model.onnx", "et_torchscript": "model.pt", "et_executorch": "model.pte"}
WEIGHTS = {"et_onnx": 3, "et_torchscript": 1, "et_executorch": 2}  # how often each program runs
PTE_METHODS = (b"edgetransfer_manifest", b"edgetransfer_batch", b"forward")
MEMORY_MB = 4096
SANITIZER_EXIT = 86
FINDINGS = ("sanitizer", "signal", "hang", "memory", "not_one_line", "bad_exit", "bad_output")
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: ")
MEMORY_MARKS = ("hard rss limit exhausted", "out of memory", "allocation-size-too-big")
HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 2, 3, 2**31, -(2**31), 2**63, 10**30, 1e308, -1e308, 1e-45, 0.5,
    "", "x", "x" * 100_000, "\x1b]0;owned\x07\r\n", "NaN", "../x", [], {}, [1], [None], [[1, 2]],
    ["a", "a"], [0.5, 0.5], [1e-45, 1e-45, 1e-45], [32, 32], [0, 0], [2**40, 2**40], [-1, 32],
]  # fmt: skip
HOSTILE_NAMES = [
    "../secret.bin", "/dev/zero", "/dev/urandom", "/etc/passwd", "fifo.bin", "folder",
    "link_out.bin", "link_zero.bin", "link_self.bin", "", "missing.bin", "a/../00.input.bin",
    "./00.input.bin", "00.png", "00.logits.bin", "00.input.bin", "golden.json", "\n", "x" * 5000,
    "a\x00b",
]  # fmt: skip


# --- seeds and mutations --------------------------------------------------------------------


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def image_seeds(export: Path) -> list[tuple[str, bytes]]:
    """Small valid JPEGs and PNGs in every kind the decoders handle."""
    golden = export / "golden"
    base = Image.open(golden / "00.png").convert("RGB")
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (21, 13, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    gray = base.convert("L")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    a16 = Image.fromarray((np.asarray(gray, np.uint16) * 251).astype(np.uint16))
    return [
        ("jpg", _encode(base, "JPEG", quality=90)),
        ("jpg", _encode(noise, "JPEG", quality=50, subsampling=0)),
        ("jpg", _encode(base.resize((40, 24)), "JPEG", quality=85, progressive=True)),
        ("jpg", _encode(base, "JPEG", quality=75, optimize=True, exif=exif)),
        ("jpg", _encode(gray, "JPEG", quality=90)),
        ("jpg", _encode(base.convert("CMYK"), "JPEG", quality=90)),
        ("png", _encode(base, "PNG")),
        ("png", _encode(noise.resize((40, 33)), "PNG", interlace=1)),
        ("png", _encode(Image.merge("RGBA", (*base.split(), gray)), "PNG")),
        ("png", _encode(pal, "PNG")),
        ("png", _encode(pal, "PNG", transparency=2)),
        ("png", _encode(Image.merge("LA", (gray, gray)), "PNG")),
        ("png", _encode(a16, "PNG")),
        ("png", _encode(gray.convert("1"), "PNG")),
        ("png", _encode(gray, "PNG", transparency=7)),
    ]


def wrap_output(g, op_type: str) -> None:
    """Make graph `g`'s first output a sequence ("SequenceConstruct") or an optional
    ("Optional") of the tensor it was: a valid model whose output is not a tensor."""
    from onnx import TensorProto, helper

    out = g.output[0].name
    for node in g.node:
        node.output[:] = [f"{o}_t" if o == out else o for o in node.output]
    g.node.append(helper.make_node(op_type, [f"{out}_t"], [out]))
    del g.output[:]
    if op_type == "Optional":
        t = helper.make_tensor_type_proto(TensorProto.FLOAT, None)
        g.output.append(helper.make_value_info(out, helper.make_optional_type_proto(t)))
    else:
        g.output.append(helper.make_tensor_sequence_value_info(out, TensorProto.FLOAT, None))


def sequence_input(g) -> None:
    """Make graph `g`'s first input a sequence whose first tensor the model then reads."""
    from onnx import TensorProto, helper

    inp = g.input[0].name
    g.node.insert(0, helper.make_node("SequenceAt", [f"{inp}_seq", "zero"], [inp]))
    g.initializer.append(helper.make_tensor("zero", TensorProto.INT64, [], [0]))
    del g.input[:]
    g.input.append(helper.make_tensor_sequence_value_info(f"{inp}_seq", TensorProto.FLOAT, None))


def pte_with_manifest(data: bytes, old: str, new: str) -> bytes:
    """model.pte bytes whose manifest method returns `new` instead of `old`: the flatbuffer string
    is rewritten in place, padded with spaces (trailing whitespace is valid JSON) or cut to the
    old length, so no offset in the program moves."""
    a, b = old.encode(), new.encode("utf-8", "surrogatepass")
    if data.count(a) != 1:
        raise ValueError("the manifest text is not in the program exactly once")
    return data.replace(a, b[: len(a)].ljust(len(a), b" "))


def pte_program_size(data: bytes) -> int:
    """Where a .pte's segments (the XNNPACK blob, weights) start: its extended header "eh00"
    holds the program size and the segment base offset; all of it when there is none."""
    if data[8:12] == b"eh00" and len(data) >= 32:
        return min(struct.unpack_from("<Q", data, 24)[0], len(data))
    return len(data)


def mutate_bytes(data: bytes, rnd: random.Random, seeds: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.choice([1, 1, 2, 3, 4, 8])):
        if not b:
            b = bytearray(rnd.randbytes(rnd.randint(1, 64)))
        op = rnd.randrange(8)
        i = rnd.randrange(len(b))
        if op == 0:
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            b[i] = rnd.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF])
        elif op == 2:
            n = rnd.randint(1, 16)
            b[i : i + n] = rnd.randbytes(n)
        elif op == 3:
            del b[rnd.randint(1, len(b)) :]
        elif op == 4:
            n = rnd.randint(1, 64)
            b[i:i] = b[i : i + n] * rnd.randint(1, 8)
        elif op == 5:
            del b[i : i + rnd.randint(1, 64)]
        elif op == 6:
            other = rnd.choice(seeds)
            j = rnd.randrange(len(other))
            b = b[:i] + other[j : j + rnd.randint(1, 256)] + b[i:]
        else:  # a big-endian field such as a width, height or length set to a boundary
            v = rnd.choice([0, 1, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 2_000_000, 65_535])
            b[i : i + 4] = struct.pack(">I", v)[: len(b[i : i + 4])]
    return bytes(b)


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute every chunk CRC, so a mutation reaches libpng's parsing, not its CRC check."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, i = bytearray(data[:8]), 8
    while i + 8 <= len(data):
        n = int.from_bytes(data[i : i + 4], "big")
        if i + 12 + n > len(data):
            break
        body = data[i + 4 : i + 8 + n]
        out += data[i : i + 4] + body + zlib.crc32(body).to_bytes(4, "big")
        i += 12 + n
    return bytes(out + data[i:])


def mutate_json(value, rnd: random.Random):
    """Drop a key, or set any member anywhere to a hostile value (or deep nesting)."""
    value = copy.deepcopy(value)
    for _ in range(rnd.choice([1, 1, 2, 3])):
        holders, stack = [], [value]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                holders += [(v, k) for k in v]
                stack += list(v.values())
            elif isinstance(v, list):
                holders += [(v, i) for i in range(len(v))]
                stack += v
        if not holders:
            return rnd.choice(HOSTILE_VALUES)
        holder, key = rnd.choice(holders)
        op = rnd.randrange(10)
        if op == 0 and isinstance(holder, dict):
            del holder[key]
        elif op == 1:
            holder[key] = f"@deep{rnd.choice([60, 70, 1000, 100_000])}@"  # written by dump_json
        elif op == 2 and isinstance(holder, dict):
            holder[key] = [holder[key]] * rnd.choice([2, 1000, 100_000])
        else:
            holder[key] = rnd.choice(HOSTILE_VALUES)
    return value


def dump_json(value, rnd: random.Random) -> str:
    # Deep values are spliced in as text: Python's json recurses and would hit its own limit.
    text = json.dumps(value, allow_nan=True)
    for depth in (60, 70, 1000, 100_000):
        text = text.replace(f'"@deep{depth}@"', "[" * depth + "]" * depth)
    if rnd.random() < 0.15:
        text = mutate_bytes(text.encode(), rnd, [text.encode()]).decode("utf-8", "replace")
    return text


# --- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    kind: str
    program: str
    args: list[str]
    folder: Path
    selftest: bool = False


@dataclass
class Tally:
    cases: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)  # ok, mismatch, refused, findings...


class Maker:
    """Writes one case's files into its own folder."""

    def __init__(self, export: Path, seed: int, programs: list[str]) -> None:
        import onnx

        self.onnx = onnx
        self.export = export
        self.seed = seed
        self.programs = programs
        self.images = image_seeds(export)
        self.image_bytes = [b for _, b in self.images]
        self.model = onnx.load(export / "model.onnx") if "et_onnx" in programs else None
        self.model_bytes = (export / "model.onnx").read_bytes() if self.model else b""
        self.manifest = json.loads((export / "edgetransfer.json").read_text())
        self.golden = json.loads((export / "golden" / "golden.json").read_text())
        if "et_torchscript" in programs:
            self.pt = zipfile.ZipFile(export / "model.pt")
            self.pt_lock = threading.Lock()  # one ZipFile, read by the worker threads
        if "et_executorch" in programs:
            from edgetransfer.manifest import pte_manifest_json

            self.pte = (export / "model.pte").read_bytes()
            self.pte_text = pte_manifest_json(export / "model.pte")

    def image(self, rnd: random.Random, folder: Path) -> Path:
        ext, data = rnd.choice(self.images)
        data = mutate_bytes(data, rnd, self.image_bytes)
        if rnd.random() < 0.5:
            data = fix_png_crcs(data)
        path = folder / f"image.{ext}"
        path.write_bytes(data)
        return path

    def make(self, index: int, folder: Path) -> Case:
        rnd = random.Random(f"{self.seed}:{index}")
        folder.mkdir(parents=True)
        kinds = {"image": 55, "onnx": 15, "manifest": 10, "golden": 20, "pte": 15}
        kinds = {k: w for k, w in kinds.items() if self.has_kind(k)}
        kind = rnd.choices(list(kinds), list(kinds.values()))[0]
        program = rnd.choices(self.programs, [WEIGHTS[p] for p in self.programs])[0]
        model = str(self.export / PROGRAMS[program])
        if kind == "image":
            images = [self.image(rnd, folder)]
            if rnd.random() < 0.1:  # a batch: one bad image among good ones
                images.insert(0, self.export / "golden" / "00.png")
            return Case(index, kind, program, [model, *map(str, images)], folder)
        if kind == "onnx":
            return Case(
                index, kind, "et_onnx", [self.onnx_model(rnd, folder), self.sample()], folder
            )
        if kind == "pte":
            args = [self.pte_model(rnd, folder), self.sample()]
            if rnd.random() < 0.2:
                args = [args[0], "--selftest", str(self.golden_folder(rnd, folder, damage=False))]
            return Case(index, kind, "et_executorch", args, folder, selftest="--selftest" in args)
        if kind == "manifest":
            text = dump_json(mutate_json(self.manifest, rnd), rnd)
            if program == "et_onnx":
                m = copy.deepcopy(self.model)
                del m.metadata_props[:]
                m.metadata_props.add(key="edgetransfer", value=text)
                path = folder / "model.onnx"
                path.write_bytes(m.SerializeToString())
            elif program == "et_executorch":
                path = folder / "model.pte"
                path.write_bytes(pte_with_manifest(self.pte, self.pte_text, text))
            else:
                path = self.torchscript_with(text, folder / "model.pt")
            args = [str(path), self.sample()]
            if rnd.random() < 0.3:
                args = [str(path), "--selftest", str(self.golden_folder(rnd, folder, damage=False))]
            return Case(index, kind, program, args, folder, selftest="--selftest" in args)
        golden = self.golden_folder(rnd, folder, damage=True)
        return Case(index, kind, program, [model, "--selftest", str(golden)], folder, selftest=True)

    def has_kind(self, kind: str) -> bool:
        if kind == "onnx":
            return "et_onnx" in self.programs
        if kind == "pte":
            return "et_executorch" in self.programs
        return True

    def pte_model(self, rnd: random.Random, folder: Path) -> str:
        """model.pte damaged where the runtime checks: its program, its length, its method
        names, its weights (see the module docstring for the delegate's graph)."""
        data, head = self.pte, pte_program_size(self.pte)
        op = rnd.randrange(5)
        if op <= 1:  # the program flatbuffer: offsets, tables, tensor shapes, instructions
            data = mutate_bytes(data[:head], rnd, [data[:head]]) + data[head:]
        elif op == 2:
            data = data[: rnd.randrange(len(data))]
        elif op == 3:  # a constant method or forward renamed: the program without it
            name = rnd.choice(PTE_METHODS)
            data = data.replace(name, name[:-1] + b"X", 1)
        else:  # weights: after the XNNPACK header (magic XH00) and the graph it points at
            base = head + 4
            if data[base : base + 4] == b"XH00":
                start = head + struct.unpack_from("<I", data, base + 14)[0]
                data = data[:start] + mutate_bytes(data[start:], rnd, [data[start:]])
        path = folder / "model.pte"
        path.write_bytes(data)
        return str(path)

    def sample(self) -> str:
        return str(self.export / "golden" / "00.png")

    def torchscript_with(self, text: str, path: Path) -> Path:
        """model.pt with another edgetransfer.json: the zip rewritten, not re-saved by torch."""
        with self.pt_lock, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
            for info in self.pt.infolist():
                data = self.pt.read(info)
                if info.filename.endswith("/extra/edgetransfer.json"):
                    data = text.encode("utf-8", "surrogatepass")
                out.writestr(info.filename, data)
        return path

    def onnx_model(self, rnd: random.Random, folder: Path) -> str:
        from onnx import TensorProto

        path = folder / "model.onnx"
        if rnd.random() < 0.3:
            data = self.model_bytes
            path.write_bytes(mutate_bytes(data, rnd, [data]))
            return str(path)
        m = copy.deepcopy(self.model)
        g = m.graph
        op = rnd.randrange(9)
        if op == 0:  # sequence output
            wrap_output(g, "SequenceConstruct")
        elif op == 1:  # sequence input
            sequence_input(g)
        elif op == 2:  # optional output
            wrap_output(g, "Optional")
        elif op == 3:  # declared dims: wrong, zero, huge, symbolic
            vi = rnd.choice([*g.input, *g.output])
            dims = vi.type.tensor_type.shape.dim
            d = dims[rnd.randrange(len(dims))]
            choice = rnd.choice([0, 1, 7, 2**31, 2**40, 2**62, -5, "n"])
            if choice == "n":
                d.dim_param = "n"
            else:
                d.dim_value = choice
        elif op == 4:  # element types
            vi = rnd.choice([*g.input, *g.output])
            vi.type.tensor_type.elem_type = rnd.choice(
                [
                    TensorProto.UINT8,
                    TensorProto.FLOAT16,
                    TensorProto.INT64,
                    TensorProto.DOUBLE,
                    TensorProto.STRING,
                ]
            )
        elif op == 5:  # a second output, maybe not named logits
            g.output.append(copy.deepcopy(g.output[0]))
            g.output[1].name = g.node[0].output[0]
            if rnd.random() < 0.5:
                g.output[0].name, g.output[1].name = g.output[1].name, g.output[0].name
        elif op == 6:  # no or several metadata entries
            if rnd.random() < 0.5:
                del m.metadata_props[:]
            else:
                m.metadata_props.add(key="edgetransfer", value="{}")
        elif op == 7:  # a second input
            g.input.append(copy.deepcopy(g.input[0]))
            g.input[1].name = "extra"
        else:  # the raw-pixel model (uint8 NHWC), maybe with a manifest it does not fit
            raw = self.export / "model.raw.onnx"
            if raw.is_file():
                m = self.onnx.load(raw)
                if rnd.random() < 0.5:
                    text = dump_json(mutate_json(self.manifest, rnd), rnd)
                    del m.metadata_props[:]
                    m.metadata_props.add(key="edgetransfer", value=text)
        path.write_bytes(m.SerializeToString())
        return str(path)

    def golden_folder(self, rnd: random.Random, folder: Path, damage: bool) -> Path:
        src = self.export / "golden"
        dst = folder / "golden"
        dst.mkdir()
        for p in src.iterdir():
            if p.suffix in (".bin", ".png", ".json"):
                shutil.copy(p, dst / p.name)
        if not damage:
            return dst
        (folder / "secret.bin").write_bytes((src / "00.input.bin").read_bytes())
        os.mkfifo(dst / "fifo.bin")
        (dst / "folder").mkdir()
        (dst / "link_out.bin").symlink_to(folder / "secret.bin")
        (dst / "link_zero.bin").symlink_to("/dev/zero")
        (dst / "link_self.bin").symlink_to("link_self.bin")
        index = self.golden
        for _ in range(rnd.choice([1, 1, 2])):
            op = rnd.randrange(5)
            if op == 0:
                index = mutate_json(index, rnd)
            elif op == 1:  # a case names a hostile file
                index = copy.deepcopy(index)
                case = rnd.choice(index["cases"])
                case[rnd.choice(["input", "logits", "png"])] = rnd.choice(HOSTILE_NAMES)
            elif op == 2:  # a damaged .bin: short, long, NaN/inf, random
                p = dst / f"{rnd.randrange(5):02d}.{rnd.choice(['input', 'logits'])}.bin"
                a = np.fromfile(p, "<f4")
                v = rnd.randrange(4)
                if v == 0:
                    a = a[: rnd.randrange(len(a))]
                elif v == 1:
                    a = np.concatenate([a, a])
                elif v == 2:
                    a[rnd.randrange(len(a))] = rnd.choice([np.nan, np.inf, -np.inf, 3e38])
                else:
                    a = np.frombuffer(rnd.randbytes(a.nbytes), "<f4")
                a.astype("<f4").tofile(p)
            elif op == 3:  # a damaged PNG
                p = dst / f"{rnd.randrange(5):02d}.png"
                data = mutate_bytes(p.read_bytes(), rnd, self.image_bytes)
                p.write_bytes(fix_png_crcs(data) if rnd.random() < 0.5 else data)
            else:  # golden.json itself damaged as text
                (dst / "golden.json").write_text(dump_json(index, rnd) + " ")
                continue
            (dst / "golden.json").write_text(dump_json(index, rnd))
        return dst


# --- running ---------------------------------------------------------------------------------


def environment(sanitized: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(
        [
            f"exitcode={SANITIZER_EXIT}",
            "detect_leaks=0",  # libtorch and ORT keep caches to exit; a leak is not a crash
            "allocator_may_return_null=1",
            f"hard_rss_limit_mb={MEMORY_MB}",
            "detect_odr_violation=0",
            "abort_on_error=0",
            "handle_segv=1",
            "symbolize=1",
        ]
    )
    env["UBSAN_OPTIONS"] = f"exitcode={SANITIZER_EXIT}:halt_on_error=1:print_stacktrace=1"
    env["OMP_NUM_THREADS"] = "1"
    if not sanitized:
        env.pop("ASAN_OPTIONS")
        env.pop("UBSAN_OPTIONS")
    return env


def limit_memory() -> None:
    limit = MEMORY_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def declared_or_progress(line: str, program: str) -> bool:
    """Lines a program prints on the way (the loaded model, self-test progress): not refusals."""
    return line.startswith(("selftest ", "selftest: raw-pixel")) or (
        line.startswith(f"{program}: ")
        and (": arch " in line or line.startswith((f"{program}: input '", f"{program}: forward(")))
    )


def judge(case: Case, rc: int | None, out: str, err: str) -> str:
    """'ok', 'mismatch', 'refused', 'runtime_crash', or the name of a finding."""
    if rc is None:
        return "hang"
    if any(mark in err for mark in MEMORY_MARKS):
        return "memory"
    if rc == SANITIZER_EXIT or any(mark in err for mark in SANITIZER_MARKS):
        return "sanitizer"
    if rc < 0:
        return "signal" if -rc != signal.SIGKILL else "memory"
    if rc == 2:
        lines = [line for line in err.splitlines() if not declared_or_progress(line, case.program)]
        ok = len(lines) == 1 and lines[0].startswith(f"{case.program}: ") and out == ""
        if ok and "ExecuTorch crashed (" in lines[0]:
            return "runtime_crash"  # inside the prebuilt runtime, reported in one line: counted
        return "refused" if ok else "not_one_line"
    if rc == 1 and case.selftest:
        return "mismatch"
    if rc != 0:
        return "bad_exit"
    try:
        if case.selftest:
            return "ok" if json.loads(out)["selftest"] == "pass" else "bad_output"
        rows = [json.loads(line) for line in out.splitlines()]
        good = len(rows) == len(case.args) - 1 and all(
            np.all(np.isfinite(r["logits"])) and r["topk"] for r in rows
        )
        return "ok" if good else "bad_output"
    except (ValueError, KeyError, TypeError):
        return "bad_output"


def run_case(case: Case, build: Path, timeout: float, sanitized: bool) -> tuple[str, str]:
    cmd = [str(build / case.program), *case.args]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env=environment(sanitized), start_new_session=True,
        preexec_fn=None if sanitized else limit_memory,
    )  # fmt: skip
    try:
        out, err = p.communicate(timeout=timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        rc = None
    out_s, err_s = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    return judge(case, rc, out_s, err_s), err_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "export", type=Path, help="an EXPORT_DIR (model.onnx, model.pt and/or model.pte, golden/)"
    )
    ap.add_argument(
        "--programs",
        nargs="+",
        choices=list(PROGRAMS),
        help="which programs to run [each one whose model the EXPORT_DIR has]",
    )
    ap.add_argument("--build", type=Path, default=ROOT / "cpp_demo" / "build-asan")
    ap.add_argument("-n", type=int, default=3000, help="cases [3000]")
    ap.add_argument("--seconds", type=float, default=None, help="stop starting cases after this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds before a run is a hang")
    ap.add_argument("--crashes", type=Path, default=None, help="save findings' inputs here")
    ap.add_argument("--json", type=Path, default=None, help="write the counts here")
    ap.add_argument(
        "--log", type=Path, default=None, help="write each case's outcome and last line"
    )
    args = ap.parse_args(argv)
    programs = args.programs or [p for p in PROGRAMS if (args.export / PROGRAMS[p]).is_file()]
    if not programs:
        models = ", ".join(PROGRAMS.values())
        print(f"fuzz_cpp: {args.export} has none of {models}", file=sys.stderr)
        return 2
    for program in programs:
        if not (args.export / PROGRAMS[program]).is_file():
            print(f"fuzz_cpp: {program} needs {args.export / PROGRAMS[program]}", file=sys.stderr)
            return 2
        if not (args.build / program).is_file():
            print(
                f"fuzz_cpp: no {args.build / program}; run tools/build_cpp_demo.sh --asan",
                file=sys.stderr,
            )
            return 2
    sanitized = (args.build / "CMakeCache.txt").is_file() and "ET_SANITIZE:BOOL=ON" in (
        args.build / "CMakeCache.txt"
    ).read_text()
    maker = Maker(args.export, args.seed, programs)
    tally = Tally()
    findings: list[tuple[Case, str, str]] = []
    lock = threading.Lock()
    start = time.monotonic()

    def one(index: int, work: Path) -> None:
        if args.seconds is not None and time.monotonic() - start > args.seconds:
            return
        case = maker.make(index, work / f"{index:06d}")
        outcome, err = run_case(case, args.build, args.timeout, sanitized)
        with lock:
            record(case, outcome, err)
        shutil.rmtree(case.folder, ignore_errors=True)

    log = args.log.open("w", buffering=1) if args.log else None  # line by line: a live view

    def record(case: Case, outcome: str, err: str) -> None:
        if log:
            last = err.strip().splitlines()[-1:] or [""]
            print(
                f"{case.index}\t{case.kind}\t{case.program}\t{outcome}\t{last[0][:300]}", file=log
            )
        tally.cases += 1
        tally.by_kind[f"{case.kind}/{case.program}"] = (
            tally.by_kind.get(f"{case.kind}/{case.program}", 0) + 1
        )
        tally.outcomes[outcome] = tally.outcomes.get(outcome, 0) + 1
        if outcome in FINDINGS:
            findings.append((case, outcome, err))
            print(
                f"fuzz_cpp: case {case.index} ({case.kind}, {case.program}): {outcome}",
                file=sys.stderr,
            )
            if args.crashes:
                dest = args.crashes / f"{case.index:06d}_{outcome}"
                fifo = shutil.ignore_patterns("fifo.bin")  # copying would block on it
                shutil.copytree(case.folder, dest, symlinks=True, dirs_exist_ok=True, ignore=fifo)
                (dest / "command.txt").write_text(
                    " ".join([case.program, *case.args]) + "\n\n" + err
                )

    with tempfile.TemporaryDirectory(prefix="fuzz_cpp_") as tmp:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda i: one(i, Path(tmp)), range(args.n)))
    seconds = time.monotonic() - start
    counts = {"cases": tally.cases, "seconds": round(seconds, 1), "sanitized": sanitized}
    outcomes = ("ok", "mismatch", "refused", "runtime_crash", *FINDINGS)
    counts |= {k: tally.outcomes.get(k, 0) for k in outcomes}
    counts["by_kind"] = dict(sorted(tally.by_kind.items()))
    print(json.dumps(counts))
    if args.json:
        args.json.write_text(json.dumps(counts, indent=1) + "\n")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
