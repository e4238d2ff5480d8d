"""Run records: the ``params.json`` / ``metrics.json`` every run writes, with
the versions and hardware its numbers came from, and helpers to collect them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import platform
import stat
import tempfile
import warnings
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from importlib import metadata
from pathlib import Path, PurePath

_PACKAGES = ("tensorflow", "tensorflow-cpu", "horovod", "numpy", "pandas", "pillow", "chexlib")


def versions() -> dict[str, str]:
    """Installed versions of the packages that shape our numbers."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_names() -> list[str]:
    """GPUs TensorFlow can see; empty without TensorFlow or without GPUs."""
    try:
        import tensorflow as tf
    except ImportError:
        return []
    names = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        names.append(details.get("device_name", gpu.name))
    return names


def environment_info(with_gpus: bool = True) -> dict:
    """Versions and hardware, for the record of every measurement."""
    info = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": usable_cores(),
        "versions": versions(),
    }
    if with_gpus:
        gpus = gpu_names()
        info["gpus"] = gpus
        info["hardware"] = (
            f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU only: {info['cpu_count']}x {info['cpu']}"
        )
    return info


class RecordError(ValueError):
    """A JSON record on disk is unreadable (corrupt, truncated, wrong shape); names the file."""


class RecordWarning(UserWarning):
    """A record was left out of a collection because it is unreadable; names the file."""


def table_records(table) -> list[dict]:
    """Rows of a pandas table as JSON-ready dicts (NaN becomes None; see :func:`json_safe`)."""
    return json_safe(table.to_dict(orient="records"))


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
    """Replace ``path`` with ``text`` so a reader sees the old file or the new one,
    never half of one (also after a crash or a full disk).

    The text goes to a unique temporary file in the same folder, is flushed to
    disk, then renamed over ``path``; on any error the temporary file is removed
    and ``path`` is left as it was. A symlink is followed (its target is
    replaced); an existing file keeps its permissions, and a read-only one is
    refused (``PermissionError``), as writing it in place would be.
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
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(target.parent)
    return path


def _fsync_dir(folder: Path) -> None:
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


def write_run_record(run_dir: str | Path, params, metrics: dict) -> None:
    """Write ``params.json`` and ``metrics.json`` (with environment) into ``run_dir``."""
    run_dir = Path(run_dir)
    write_json(run_dir / "params.json", params)
    metrics = {**metrics, "environment": metrics.get("environment") or environment_info()}
    write_json(run_dir / "metrics.json", metrics)


# --- collecting a study ------------------------------------------------------


def _flatten(prefix: str, value, into: dict) -> None:
    """Scalars stay; dicts become ``prefix.key`` columns; lists are left out."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif not isinstance(value, list):
        into[prefix] = value


def collect_runs(study_dir: str | Path, on_error: str = "warn") -> list[dict]:
    """Every complete run under ``study_dir/<stage>/<run_id>/`` as a nested record.

    Each record has ``stage``, ``run_id``, ``run_dir``, ``parameters`` (what
    papermill passed), and the run's own ``params`` and ``metrics`` JSON.

    Args:
        study_dir: the study's folder.
        on_error: what an unreadable ``run.json``, ``params.json`` or
            ``metrics.json`` does: ``"warn"`` leaves that run out with a
            :class:`RecordWarning` naming the file (a summary of the other runs
            is still worth having); ``"raise"`` raises the error
            (:class:`RecordError` or ``OSError``).
    """
    if on_error not in ("warn", "raise"):
        raise ValueError(f"on_error must be 'warn' or 'raise', not {on_error!r}")
    records = []
    for marker in sorted(Path(study_dir).glob("*/*/run.json")):
        try:
            record = _run_record(marker)
        except (RecordError, OSError) as err:
            if on_error == "raise":
                raise
            warnings.warn(f"run left out: {err}", RecordWarning, stacklevel=2)
            continue
        if record is not None:
            records.append(record)
    return records


def _run_record(marker: Path) -> dict | None:
    """The record of the run whose ``run.json`` is ``marker``; None if not complete."""
    run = read_json(marker, expect=dict)
    metrics_path = marker.parent / "metrics.json"
    if run.get("status") != "complete" or not metrics_path.is_file():
        return None
    params_path = marker.parent / "params.json"
    parameters = run.get("parameters", {})
    if not isinstance(parameters, dict):
        raise RecordError(f"{marker}: 'parameters' must be a JSON object")
    return {
        "stage": marker.parent.parent.name,
        "run_id": marker.parent.name,
        "run_dir": str(marker.parent),
        "parameters": parameters,
        "params": read_json(params_path, expect=dict) if params_path.is_file() else {},
        "metrics": read_json(metrics_path, expect=dict),
    }


def runs_table(records: list[dict]):
    """One tidy row per run: stage, run id, parameters and scalar metrics (dotted keys)."""
    import pandas as pd

    rows = []
    for rec in records:
        row = {"stage": rec["stage"], "run_id": rec["run_id"]}
        _flatten("", {k: v for k, v in rec["parameters"].items() if k != "OUTPUT_DIR"}, row)
        _flatten("", rec["metrics"], row)
        rows.append(row)
    return pd.DataFrame(rows)
