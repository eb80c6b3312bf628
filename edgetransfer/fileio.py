"""Atomic writes, output folders that replace the old one only on success, and safe hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgetransfer.errors import OutputExistsError

TMP_PREFIX = ".edgetransfer-tmp-"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_can_write(path: str | os.PathLike, force: bool) -> None:
    """Raise OutputExistsError when `path` exists and `force` is off."""
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, force: bool) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path`.

    On any failure the temp folder is removed and an existing `path` is left untouched, so
    an interrupted or failed run never damages earlier results.
    """
    path = Path(path).absolute()
    check_can_write(path, force)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=path.parent))
            os.replace(path, old / "old")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tmp_prefix() -> str:
    # The pid in the name lets a later run tell a dead run's leftovers from a live run's work.
    return f"{TMP_PREFIX}{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(folder: Path) -> None:
    """Remove temp folders/files left by a run that was killed mid-write."""
    for p in folder.glob(TMP_PREFIX + "*"):
        pid = p.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
