"""Run records: the ``params.json`` / ``metrics.json`` every run writes, with
the versions and hardware its numbers came from, and helpers to collect them.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, is_dataclass
from importlib import metadata
from pathlib import Path

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


def _jsonable(obj):
    if is_dataclass(obj):
        return asdict(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


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


def collect_runs(study_dir: str | Path) -> list[dict]:
    """Every complete run under ``study_dir/<stage>/<run_id>/`` as a nested record.

    Each record has ``stage``, ``run_id``, ``run_dir``, ``parameters`` (what
    papermill passed), and the run's own ``params`` and ``metrics`` JSON.
    """
    records = []
    for marker in sorted(Path(study_dir).glob("*/*/run.json")):
        run = read_json(marker)
        metrics_path = marker.parent / "metrics.json"
        if run.get("status") != "complete" or not metrics_path.is_file():
            continue
        params_path = marker.parent / "params.json"
        records.append(
            {
                "stage": marker.parent.parent.name,
                "run_id": marker.parent.name,
                "run_dir": str(marker.parent),
                "parameters": run.get("parameters", {}),
                "params": read_json(params_path) if params_path.is_file() else {},
                "metrics": read_json(metrics_path),
            }
        )
    return records


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
