"""Read what an ExecuTorch .pte program declares — its constant methods (the manifest), the
forward method's tensor shapes and how many of its instructions are delegate calls — straight
from the flatbuffer, with the standard library only.

Floor 0: `info` and `read_manifest` describe a .pte without importing torch or the ExecuTorch
runtime, and without handing a file they have not checked to native code. Every offset is
bounds-checked, so a damaged or hostile file is a one-line ManifestError.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from edgetransfer.errors import ManifestError

FILE_ID = b"ET12"  # program.fbs file_identifier
# The flatbuffer part of a .pte (weights and delegate blobs live in segments after it) stays
# small; a cap keeps a hostile header from making us read gigabytes.
MAX_PROGRAM_BYTES = 256 << 20
# program.fbs: KernelTypes union members (1-based) and ScalarType values used here
_STRING, _INT, _TENSOR = 6, 2, 5
_SCALAR = {0: "uint8", 1: "int8", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64"}
# InstructionArguments union: 1 KernelCall (a portable/optimized kernel), 2 DelegateCall
_KERNEL_CALL, _DELEGATE_CALL = 1, 2


class _Buf:
    """Bounds-checked little-endian flatbuffer access."""

    def __init__(self, data: bytes, name: str) -> None:
        self.data, self.name = data, name

    def _bad(self) -> ManifestError:
        return ManifestError(f"{self.name} is not a readable ExecuTorch program (damaged .pte)")

    def unpack(self, fmt: str, pos: int):
        size = struct.calcsize(fmt)
        if pos < 0 or pos + size > len(self.data):
            raise self._bad()
        return struct.unpack_from("<" + fmt, self.data, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        """Absolute position of field `index` of the table at `table`, None when absent."""
        vtable = table - self.unpack("i", table)
        vsize = self.unpack("H", vtable)
        slot = 4 + 2 * index
        if slot + 2 > vsize:
            return None
        off = self.unpack("H", vtable + slot)
        return table + off if off else None

    def ref(self, table: int, index: int) -> int | None:
        """Where a table/vector/string field points to."""
        pos = self.field(table, index)
        return None if pos is None else pos + self.unpack("I", pos)

    def vector(self, table: int, index: int) -> tuple[int, int]:
        """(first element position, length) of a vector field; (0, 0) when absent."""
        pos = self.ref(table, index)
        if pos is None:
            return 0, 0
        n = self.unpack("I", pos)
        if n > len(self.data):
            raise self._bad()
        return pos + 4, n

    def tables(self, table: int, index: int) -> list[int]:
        start, n = self.vector(table, index)
        return [start + 4 * i + self.unpack("I", start + 4 * i) for i in range(n)]

    def scalars(self, table: int, index: int, fmt: str) -> list:
        start, n = self.vector(table, index)
        size = struct.calcsize(fmt)
        return [self.unpack(fmt, start + size * i) for i in range(n)]

    def string(self, table: int, index: int) -> str | None:
        pos = self.ref(table, index)
        if pos is None:
            return None
        n = self.unpack("I", pos)
        if pos + 4 + n > len(self.data):
            raise self._bad()
        try:
            return self.data[pos + 4 : pos + 4 + n].decode("utf-8")
        except UnicodeDecodeError:
            raise self._bad() from None

    def scalar(self, table: int, index: int, fmt: str, default=0):
        pos = self.field(table, index)
        return default if pos is None else self.unpack(fmt, pos)


@dataclass(frozen=True)
class PteTensor:
    dtype: str
    shape: list[int]  # for a dynamic dimension: the largest size memory is planned for


@dataclass(frozen=True)
class PteInfo:
    """What a .pte declares, read without running it."""

    methods: dict[str, list]  # constant methods: name -> returned values (str/int)
    inputs: list[PteTensor]  # of "forward"
    outputs: list[PteTensor]
    delegate_calls: int  # forward's instructions handed to a delegate (XNNPACK)
    kernel_calls: int  # forward's instructions run by ExecuTorch's own kernels
    operators: list[str]  # the kernels those calls use


def read_pte(path: str | Path) -> PteInfo:
    """Parse the flatbuffer part of a .pte (weights and delegate data are not read)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 8 or head[4:8] != FILE_ID:
                raise ManifestError(
                    f"{path.name} is not an ExecuTorch program (no {FILE_ID.decode()} "
                    "identifier); export one with `edgetransfer export RUN --executorch`"
                )
            size = path.stat().st_size
            # extended header "eh00": header length (u32), program size (u64), segment base
            if head[8:12] == b"eh00" and len(head) >= 24:
                size = struct.unpack_from("<Q", head, 16)[0]
            if size > MAX_PROGRAM_BYTES:
                raise ManifestError(f"{path.name}: its program part is implausibly large")
            f.seek(0)
            data = f.read(size)
    except OSError as e:
        raise ManifestError(f"cannot read {path.name}: {e.strerror or e}") from None
    buf = _Buf(data, path.name)
    root = buf.unpack("I", 0)
    methods: dict[str, list] = {}
    forward = None
    for plan in buf.tables(root, 1):  # Program.execution_plan
        name = buf.string(plan, 0)
        if name == "forward":
            forward = plan
            continue
        values = buf.tables(plan, 2)  # ExecutionPlan.values
        out: list = []
        for i in buf.scalars(plan, 4, "i"):  # ExecutionPlan.outputs
            if not 0 <= i < len(values):
                raise buf._bad()
            out.append(_value(buf, values[i]))
        methods[str(name)] = out
    if forward is None:
        raise ManifestError(f"{path.name} has no forward method")
    values = buf.tables(forward, 2)

    def tensors(index: int) -> list[PteTensor]:
        found = []
        for i in buf.scalars(forward, index, "i"):
            if not 0 <= i < len(values):
                raise buf._bad()
            v = _value(buf, values[i])
            if isinstance(v, PteTensor):
                found.append(v)
        return found

    calls = {_KERNEL_CALL: 0, _DELEGATE_CALL: 0}
    for chain in buf.tables(forward, 5):  # ExecutionPlan.chains
        for ins in buf.tables(chain, 2):  # Chain.instructions
            kind = buf.scalar(ins, 0, "B")
            if kind in calls:
                calls[kind] += 1
    operators = [
        f"{buf.string(op, 0)}.{buf.string(op, 1) or 'default'}" for op in buf.tables(forward, 6)
    ]
    return PteInfo(
        methods, tensors(3), tensors(4), calls[_DELEGATE_CALL], calls[_KERNEL_CALL], operators
    )


def _value(buf: _Buf, evalue: int):
    """An EValue as a Python str/int, a PteTensor, or None for other kinds."""
    kind = buf.scalar(evalue, 0, "B")
    val = buf.ref(evalue, 1)
    if val is None:
        return None
    if kind == _STRING:
        return buf.string(val, 0)
    if kind == _INT:
        return buf.scalar(val, 0, "q")
    if kind == _TENSOR:
        dtype = _SCALAR.get(buf.scalar(val, 0, "b"), "other")
        return PteTensor(dtype, buf.scalars(val, 2, "i"))
    return None
