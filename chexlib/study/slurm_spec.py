"""What a study stage asks of Slurm: the ``slurm:`` mapping of a specification.

A spec (as defaults) or a stage (overriding them) may hold::

    slurm: {nodes: 2, ranks_per_node: 1, cores_per_rank: 1, time: "00:20:00",
            partition: debug, queue_timeout: 600}

``nodes``, ``ranks_per_node`` and ``cores_per_rank`` are positive integers or
strings with placeholders filled per run (``nodes: "{RANKS}"`` gives each run of
a ``RANKS`` grid as many nodes as ranks, one rank per node). ``time`` is a Slurm
time limit (minutes, or ``[D-]HH:MM:SS``); without it, a stage's ``timeout``
(seconds) plus a minute, rounded up to minutes, else the partition's limit.
``queue_timeout``: seconds a job may wait in the queue before the study cancels
it and fails the run (default one hour), so a job that can never start does not
hold the study forever. Only ``chexlib study --executor slurm`` reads these.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

KEYS = ("nodes", "ranks_per_node", "cores_per_rank", "time", "partition", "queue_timeout")
_COUNTS = ("nodes", "ranks_per_node", "cores_per_rank")
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
_TIME = re.compile(r"\d+(?::\d{1,2}){0,2}|\d+-\d+(?::\d{1,2}){0,2}")
_PARTITION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
DEFAULT_QUEUE_TIMEOUT = 3600.0
# What a spec's {hosts} becomes under Slurm: a stand-in the job replaces with its
# allocation's hosts, kept as is in run.json so that run ids do not change.
ALLOCATION_HOSTS = "SLURM_ALLOCATION"


@dataclass(frozen=True)
class Resources:
    """One run's Slurm request (see the module docstring)."""

    nodes: int = 1
    ranks_per_node: int = 1
    cores_per_rank: int = 1
    time: str | None = None
    partition: str | None = None
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT

    def sbatch_options(self) -> list[str]:
        """``#SBATCH`` options (without the prefix) for this request."""
        options = [
            f"--nodes={self.nodes}",
            f"--ntasks-per-node={self.ranks_per_node}",
            f"--cpus-per-task={self.cores_per_rank}",
        ]
        if self.time:
            options.append(f"--time={self.time}")
        if self.partition:
            options.append(f"--partition={self.partition}")
        return options

    def time_seconds(self) -> float | None:
        """The time limit in seconds, or None when the partition's applies."""
        return None if self.time is None else time_to_seconds(self.time)


def time_to_seconds(text: str) -> float:
    """Seconds in a Slurm time limit: ``"30"`` (minutes), ``"1:30:00"``, ``"2-12"``, ..."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # M or M:S
        hours, minutes, seconds = 0, parts[0], parts[1] if len(parts) == 2 else 0
    return float(((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds)


def check(value, field: str, error: Callable[[str], Exception]) -> None:
    """Check a spec's or a stage's ``slurm`` mapping as written (placeholders unfilled).

    Raises:
        error: naming ``field`` and the key, e.g. ``...: slurm.nodes must be ...``.
    """
    if value is None:
        return
    if not isinstance(value, dict):
        raise error(f"{field} must be a mapping of {list(KEYS)}, not {type(value).__name__}")
    unknown = [k for k in value if k not in KEYS]
    if unknown:
        raise error(f"{field}: unknown key(s) {unknown!r}; known: {list(KEYS)}")
    for key, item in value.items():
        if key in _COUNTS and isinstance(item, str) and "{" in item:
            continue  # a placeholder: checked once filled, per run
        _parse(key, item, f"{field}.{key}", error)


def of_run(
    spec: dict, stage: dict, fill: Callable, field: str, error: Callable[[str], Exception]
) -> Resources:
    """One run's :class:`Resources`: the spec's ``slurm``, then its stage's, placeholders
    filled by ``fill``; ``time`` from the stage's ``timeout`` when not given."""
    merged = {**(spec.get("slurm") or {}), **(stage.get("slurm") or {})}
    timeout = stage.get("timeout", spec.get("timeout"))
    if "time" not in merged and timeout is not None:
        merged["time"] = default_time(timeout)
    values = {k: _parse(k, fill(v), f"{field}.{k}", error) for k, v in merged.items()}
    return Resources(**values)


def default_time(timeout: float | None) -> str | None:
    """A Slurm time limit (minutes) for a stage's ``timeout`` seconds: a minute more,
    so the study's own timeout (which names the run) fires first."""
    return None if timeout is None else str(math.ceil(timeout / 60) + 1)


def _parse(key: str, value, field: str, error: Callable[[str], Exception]):
    """``value`` of ``key`` as :class:`Resources` holds it, else ``error`` naming ``field``."""
    shown = f"{type(value).__name__} ({value!r:.80})"
    if key in _COUNTS:
        text = str(value).strip() if isinstance(value, str | int) else ""
        if isinstance(value, bool) or not text.isdigit() or int(text) < 1:
            raise error(f"{field} must be a positive integer, not {shown}")
        return int(text)
    if key == "time":
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return str(value)  # minutes, as Slurm reads a bare number
        if not isinstance(value, str) or not _TIME.fullmatch(value) or not time_to_seconds(value):
            raise error(
                f"{field} must be a Slurm time limit (minutes, or [D-]HH:MM:SS), not {shown}"
            )
        return value
    if key == "partition":
        if not isinstance(value, str) or not _PARTITION.fullmatch(value):
            raise error(f"{field} must be a partition name (letters, digits, '_.-'), not {shown}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise error(f"{field} must be a positive number of seconds, not {shown}")
    return float(value)
