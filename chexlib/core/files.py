"""Durable files: JSON records written atomically (a reader sees the old file or
the new one, never half), read back with errors that name the file."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import socket
import stat
import tempfile
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime
from pathlib import Path, PurePath


class RecordError(ValueError):
    """A JSON record on disk is unreadable (corrupt, truncated, wrong shape); names the file."""


def json_safe(obj):
    """``obj`` as plain JSON values: NaN and infinities become ``None``, numpy
    scalars and arrays, dataclasses, ``to_dict()`` objects, paths, tuples and
    sets become their JSON form.

    Raises:
        TypeError: a value with no JSON form (naming its type).
    """
    if obj is None or isinstance(obj, str | bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):  # numpy float64 too (a float subclass)
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {_json_key(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [json_safe(v) for v in obj]
    if is_dataclass(obj) and not isinstance(obj, type):
        return json_safe(asdict(obj))
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    if isinstance(obj, PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return json_safe(obj.tolist())
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_key(key):
    if isinstance(key, str | int | float | bool) or key is None:
        return key
    if hasattr(key, "item"):  # a numpy scalar as a key
        return key.item()
    return str(key)


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace ``path`` with ``text`` (UTF-8), as :func:`write_bytes_atomic` does."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes, sync: bool = True) -> Path:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one,
    never half of one (also after a crash or a full disk).

    The bytes go to a unique temporary file in the same folder, are flushed to
    disk (``sync``), then renamed over ``path``; on any error the temporary file
    is removed and ``path`` is left as it was. A symlink is followed (its target
    is replaced); an existing file keeps its permissions, and a read-only one is
    refused (``PermissionError``), as writing it in place would be. ``sync=False``
    skips the two fsyncs, for many small files that can be regenerated.
    """
    path = Path(path)
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    else:  # a rename would replace a read-only file: refuse as writing in place would
        if not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(target.parent)
    return path


def fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: not every file system allows it)."""
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


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as JSON atomically (see :func:`write_text_atomic`).

    Values are made JSON-safe first (:func:`json_safe`: NaN -> null, numpy ->
    Python), so a value with no JSON form fails before anything is written.
    """
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)


def read_json(path: str | Path, expect: type | None = None):
    """Read a JSON record.

    Args:
        path: the file.
        expect: the type the top-level value must have (e.g. ``dict``), if any.

    Raises:
        RecordError: the file is not valid JSON (corrupt, truncated, empty) or
            not of the ``expect``-ed type; the message names the file.
        OSError: the file cannot be read (``FileNotFoundError`` when missing).
    """
    path = Path(path)
    raw = path.read_bytes()
    if not raw.strip():
        raise RecordError(f"{path}: empty JSON record (cut short?); rerun what wrote it")
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RecordError(
            f"{path}: not a JSON record (not UTF-8 text at byte {err.start})"
        ) from None
    except json.JSONDecodeError as err:
        raise RecordError(
            f"{path}: corrupt JSON record ({err.msg} at line {err.lineno} column {err.colno}); "
            "rerun what wrote it, or delete the file"
        ) from None
    if expect is not None and not isinstance(value, expect):
        raise RecordError(
            f"{path}: expected a JSON {_JSON_NAMES.get(expect, expect.__name__)}, "
            f"found {_JSON_NAMES.get(type(value), type(value).__name__)}"
        )
    return value


_JSON_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


_JSON_NAMES[type(None)] = "null"


_JSON_NAMES[bool] = "boolean"


@contextlib.contextmanager
def folder_lock(folder: str | Path, name: str, busy):
    """Hold ``folder/name`` (an ``flock``; the folder is made if missing) for the block:
    one process at a time works in ``folder``.

    The kernel releases an ``flock`` when its holder exits or is killed, so a dead
    holder never leaves a stale lock; the file's text (pid, host, since when) names
    the holder for the error another process gets.

    Args:
        busy: ``holder text -> exception`` raised when another process holds it.
    """
    import fcntl  # here: POSIX only, and only the lockers need it

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip()[:200] or "process unknown"
            raise busy(holder) from None
        os.ftruncate(fd, 0)
        since = datetime.now(UTC).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock
