"""The machine a number came from: package versions, CPU model, usable cores, GPUs."""

from __future__ import annotations

import os
import platform
import sys
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


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``: avx512_bf16, amx_bf16, ...); empty off Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """Cores this process may run on (respects taskset/cgroup affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_names() -> list[str]:
    """GPUs TensorFlow sees in this process; empty where TensorFlow is not loaded
    (a report or a study runner never starts it just to ask) or sees no GPU."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
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
