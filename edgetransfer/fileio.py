"""Atomic writes, output folders that replace the old one only on success, and safe hashing.

Guarantees, whatever happens mid-run (an exception, a full disk, SIGKILL, a power cut): a file or
folder written here is either the complete old one or the complete new one, never a mix, and the
temp files a killed run leaves behind are cleaned up (or, for a folder caught mid-swap, put back)
by the next run that writes beside them.

`--force` replaces only what edgetransfer wrote (:func:`check_can_write` is the one rule), and
two runs writing the same folder at once take turns for the swap instead of tripping each other.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from edgetransfer.errors import EdgeTransferError, OutputExistsError
from edgetransfer.manifest import MANIFEST_NAME

TMP_PREFIX = ".edgetransfer-tmp-"
_BACKUP = "old-"  # .edgetransfer-tmp-<pid>-old-<name>: the previous <name> during a swap
# Written into every folder output_dir makes that holds no manifest (a report folder), so a
# later --force can tell it from a user's folder.
MARKER = ".edgetransfer"
MARKER_TEXT = "written by edgetransfer: --force may replace this folder\n"
# A folder holding only these counts as empty: the marker, and what file managers drop in
# every folder they show. (data.py has its own list for class folders; fileio imports nothing
# of ours but errors and manifest.)
IGNORABLE = frozenset({MARKER, ".DS_Store", "Thumbs.db", "desktop.ini"})
# what every evaluation report's metrics.json has had (evaluate.EvalResult.to_dict)
_METRICS_KEYS = frozenset({"model", "data_dir", "split", "images", "top1", "per_class"})
_METRICS_MAX = 256 << 20  # a larger file is not one of our reports: never read it whole
# errors the user fixes (space, quota, permissions), worth digging out of an exporter's wrapper
USER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def cache_dir() -> Path:
    """``$EDGETRANSFER_CACHE`` or ``$XDG_CACHE_HOME/edgetransfer`` (``~/.cache/edgetransfer``)."""
    if os.environ.get("EDGETRANSFER_CACHE"):
        return Path(os.environ["EDGETRANSFER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgetransfer"


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
            raise _renamed(_with_filename(e, path), Path(tmp), path) from None
        # torch.save reports a full disk as a RuntimeError raised while the ENOSPC is handled
        found = user_os_error(e) if isinstance(e, Exception) else None
        if found is not None:
            raise _renamed(_with_filename(found, path), Path(tmp), path) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of :func:`atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def check_can_write(
    path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> None:
    """The one rule for writing an output folder; raises OutputExistsError when it is broken.

    `path` must not be one of the command's `inputs` (DATA_DIR, RUN_DIR, a model, a teacher...)
    nor a folder containing one, symlinks resolved and compared by identity (so a name that
    differs only in case on a case-insensitive file system is caught); a folder inside an input
    is fine (the default `export RUN --out RUN/export`). An existing folder that is empty, or
    holds only our marker and OS litter (.DS_Store...), is written as if it were not there.
    Anything else existing needs `force`, and even then must be a folder edgetransfer wrote
    (see :func:`written_by_edgetransfer`): --force never deletes a user's folder.
    """
    path = Path(path).absolute()
    _check_not_an_input(path, inputs)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # (a parent that is a file: making the folder fails with the OS's own words)
    names: list[str] = []
    if stat.S_ISDIR(st.st_mode):
        try:
            names = os.listdir(path)
        except FileNotFoundError:
            return  # another run is swapping it; output_dir checks again before its own swap
        if not [n for n in names if n not in IGNORABLE]:
            return  # e.g. the marker alone, left by a demo that failed before writing anything
    if not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputExistsError(f"{path} exists and is not a folder; choose another --out")
    if not written_by_edgetransfer(path, names):
        raise OutputExistsError(
            f"refusing to replace {path} with --force: it was not written by edgetransfer "
            f"(no {MANIFEST_NAME} or {MARKER} in it); choose a new output folder, or if an "
            "older edgetransfer wrote it, delete it yourself"
        )


def written_by_edgetransfer(folder: str | os.PathLike, names: Iterable[str] | None = None) -> bool:
    """Whether `folder` is one edgetransfer wrote, so --force may replace it.

    It holds our manifest or the marker; or it is what versions before the marker wrote: an
    evaluation report (index.html and a metrics.json with our keys) or a demo folder (only run/
    and export/, one of them with our manifest). `names`: os.listdir(folder), if already read.
    """
    folder = Path(folder)
    names = set(os.listdir(folder) if names is None else names)
    if MANIFEST_NAME in names or MARKER in names:
        return True
    if {"index.html", "metrics.json"} <= names and _our_metrics(folder / "metrics.json"):
        return True
    # (run.checkpoint: what an interrupted adapt of the demo leaves beside run/)
    sub = names - IGNORABLE
    return sub <= {"run", "export", "run.checkpoint"} and any(
        (folder / n / MANIFEST_NAME).is_file() for n in sub & {"run", "export"}
    )


def _our_metrics(path: Path) -> bool:
    """Whether `path` looks like the metrics.json of an evaluation report (EvalResult.to_dict)."""
    try:
        if not path.is_file() or path.stat().st_size > _METRICS_MAX:
            return False
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and _METRICS_KEYS <= data.keys()


def write_marker(folder: str | os.PathLike) -> None:
    """Create `folder` if needed and mark it as written by edgetransfer (see check_can_write)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MARKER, MARKER_TEXT)


def _check_not_an_input(path: Path, inputs: Iterable[str | os.PathLike | None]) -> None:
    out = Path(os.path.realpath(path))
    out_id = _file_id(path)
    for given in inputs:
        if given is None:
            continue
        real = Path(os.path.realpath(given))
        found = real == out or out in real.parents
        if not found and out_id is not None:
            # realpath keeps the case it is given: on a case-insensitive file system `Data`
            # and `data` are one folder with two names; their identity is what counts
            found = any(_file_id(p) == out_id for p in (real, *real.parents))
        if found:
            same = real == out or (out_id is not None and _file_id(real) == out_id)
            what = "is" if same else "contains"
            raise OutputExistsError(
                f"refusing to write {path}: it {what} the input {os.fsdecode(given)}; "
                "choose another output folder"
            )


def _file_id(path: str | os.PathLike) -> tuple[int, int] | None:
    """(st_dev, st_ino) of `path`, None when it does not exist or cannot be read."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def user_os_error(e: BaseException) -> OSError | None:
    """The OSError a user can fix (full disk, read-only, no permission) that `e` is or that
    caused it (exporters and torch.save wrap them); None when there is none."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in USER_ERRNOS:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


@contextlib.contextmanager
def output_dir(
    path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a fresh temp folder beside `path`; on success it replaces `path`.

    On any failure the temp folder is removed and an existing `path` is left untouched, so
    an interrupted or failed run never damages earlier results. The old folder is renamed
    aside before the new one takes its place; if the process dies between the two renames, the
    next run writing beside it renames the old folder back. What may be replaced is decided by
    :func:`check_can_write` with the command's `inputs`, here and again just before the swap
    (another run may have written `path` meanwhile). Errors name `path`, never the temp folder.
    """
    path = Path(path).absolute()
    inputs = list(inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path.parent)  # first: it may put back a folder a killed run moved
    check_can_write(path, force, inputs)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(), dir=path.parent))
    try:
        yield tmp
        if not (tmp / MANIFEST_NAME).exists():
            write_marker(tmp)
        with _folder_lock(path.parent) as locked:
            check_can_write(path, force, inputs)
            try:
                _swap(tmp, path)
            except OSError as e:
                if locked or e.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise OutputExistsError(
                    f"another edgetransfer run is writing {path}; try again"
                ) from None
        _fsync_dir(path.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _renamed(e, tmp, path) from None
    except EdgeTransferError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.args and isinstance(e.args[0], str) and str(tmp) in e.args[0]:
            e.args = (e.args[0].replace(str(tmp), str(path)), *e.args[1:])
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, path: Path) -> None:
    """Put `tmp` where `path` is; the old `path` is renamed aside first, put back on failure."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    backup = path.parent / f"{_tmp_prefix()}{_BACKUP}{path.name}"
    os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(backup, path)
        raise
    if backup.is_symlink():  # a link to a folder was replaced: the folder itself stays
        backup.unlink()
    else:
        shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[bool]:
    """An exclusive flock on `folder`, so runs swapping outputs in it take turns.

    Yields whether the lock is held: best effort, not every OS or filesystem has flock.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield False
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError:
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def _renamed(e: OSError, temp: Path, user: Path) -> OSError:
    """`e` with the file names under `temp` (our temp file or folder) given under `user`."""

    def fix(name):
        if name is None:
            return None
        text = os.fsdecode(name)
        if text == str(temp) or text.startswith(str(temp) + os.sep):
            return str(user) + text[len(str(temp)) :]
        if os.path.basename(text).startswith(TMP_PREFIX):
            return str(user)  # a swap's backup
        return name

    filename, filename2 = fix(e.filename), fix(e.filename2)
    if (filename, filename2) == (e.filename, e.filename2):
        return e
    return type(e)(e.errno, e.strerror, filename, None, filename2)


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
