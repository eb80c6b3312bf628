"""Atomic writes, output folders that replace the old one only on success, and safe hashing.

Guarantees, whatever happens mid-run (an exception, a full disk, SIGKILL, a power cut): a file or
folder written here is either the complete old one or the complete new one, never a mix, and the
temp files a killed run leaves behind are cleaned up (or, for a folder caught mid-swap, put back)
by the next run that writes beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from edgetransfer.errors import OutputExistsError

TMP_PREFIX = ".edgetransfer-tmp-"
_BACKUP = "old-"  # .edgetransfer-tmp-<pid>-old-<name>: the previous <name> during a swap


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file that becomes `path` only when the block ends without an error.

    Written through a temp file in the same folder, fsynced, then os.replace'd: a reader sees
    the old file or the whole new one. Streams, so a large payload (a checkpoint) is never held
    in memory as one bytes object. An OSError (ENOSPC, EACCES, ...) carries `path` as its
    filename, so the CLI can say which file could not be written; the temp file is removed
    and an existing `path` is untouched.
    """
    path = Path(path)
    _remove_stale_temps(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(), dir=path.parent)
    except OSError as e:
        raise _with_filename(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _with_filename(e, path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


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
    an interrupted or failed run never damages earlier results. The old folder is renamed
    aside before the new one takes its place; if the process dies between the two renames, the
    next run writing beside it renames the old folder back.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)  # first: it may put back a folder a killed run moved
    check_can_write(path, force)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a folder; choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=path.parent))
    try:
        yield tmp
        if path.exists():
            backup = path.parent / f"{_tmp_prefix()}{_BACKUP}{path.name}"
            os.replace(path, backup)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(backup, path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name = os.fsdecode(e.filename) if e.filename is not None else ""
        if name.startswith(str(tmp)):  # name the file the user asked for, not our temp
            raise type(e)(e.errno, e.strerror, str(path) + name[len(str(tmp)) :]) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _with_filename(e: OSError, path: Path) -> OSError:
    if e.filename is not None:
        return e
    return type(e)(e.errno, e.strerror or os.strerror(e.errno or 0), str(path))


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; best effort (not every OS or filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Remove temp folders/files left by a run that was killed mid-write.

    A folder a killed run had renamed aside to swap in its new output is put back when its
    place is still empty (nothing is lost), and removed when the new output made it there.
    """
    try:
        entries = list(folder.glob(TMP_PREFIX + "*"))
    except OSError:
        return
    for p in entries:
        pid, _, rest = p.name[len(TMP_PREFIX) :].partition("-")
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        if rest.startswith(_BACKUP) and len(rest) > len(_BACKUP):
            original = folder / rest[len(_BACKUP) :]
            if not original.exists() and not original.is_symlink():
                with contextlib.suppress(OSError):
                    os.replace(p, original)
                continue  # never delete the only copy, even if it could not be put back
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
