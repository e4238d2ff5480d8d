"""Weak scaling across nodes, separating Horovod from the hardware: the table.

Three configurations of one model, batch and step count, at each link rate
(:mod:`chexlib.launch.cluster_scaling` runs them on the local cluster):

``alone``
    one rank on node1, nothing else running: the node's own speed.
``concurrent``
    two independent one-rank jobs at the same time, one per node: what sharing
    the machine (memory bandwidth, caches, the host's scheduler) costs, without
    any communication.
``horovod``
    one Horovod job of two ranks, one per node: sharing plus the allreduce.

So ``horovod / concurrent`` is what Horovod costs (its allreduce over the link and
its per-step work) and ``concurrent / alone`` what the hardware costs. The
allreduce time per step comes from rank 0's Horovod timeline
(:func:`allreduce_per_step`), and :func:`chexlib.report.allreduce_model.check_overhead`
checks the ring-allreduce model against the measured overhead at each shaped rate.

Reporting layer: pandas only, no TensorFlow.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

import pandas as pd

from chexlib.report.allreduce_model import check_overhead

CONFIGURATIONS = ("alone", "concurrent", "horovod")
# issue 23's target: DenseNet121 under Horovod across 2 nodes keeps this much of the two
# independent one-rank jobs' speed (the figure's line and the cross-node verdict)
TARGET_VS_CONCURRENT = 0.90
UNSHAPED = "unshaped"
# Horovod's name of a gradient tensor's allreduce (DistributedOptimizer): metric and
# broadcast tensors are not a step's allreduce
GRADIENT = re.compile(r"HorovodAllreduce_grads")
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)bit\s*$", re.I)


def gbit_per_s(rate: str | None) -> float | None:
    """A ``tc`` rate (``10gbit``, ``1Gbit``, ``100mbit``) in Gbit/s; None: unshaped."""
    if rate in (None, "", "none", UNSHAPED):
        return None
    match = _RATE.match(str(rate))
    if not match:
        raise ValueError(f"link rate {rate!r}: write it as tc does (10gbit, 1gbit, 100mbit)")
    scale = {"": 1e-9, "k": 1e-6, "m": 1e-3, "g": 1.0}[match.group(2).lower()]
    return float(match.group(1)) * scale


def _intervals(events: list[dict]) -> dict[str, list[tuple[float, float, dict]]]:
    """Each gradient tensor's ALLREDUCE phases (start us, end us, args), in order."""
    names = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}  # fmt: skip
    open_: dict = {}
    found: dict[str, list] = {}
    for e in events:
        pid, ph = e.get("pid"), e.get("ph")
        if ph == "B":
            open_.setdefault(pid, []).append(e)
        elif ph == "E" and open_.get(pid):
            begin = open_[pid].pop()
            if begin.get("name") == "ALLREDUCE" and GRADIENT.search(names.get(pid, "")):
                found.setdefault(names[pid], []).append((begin["ts"], e["ts"], e.get("args", {})))
    return found


def allreduce_per_step(events: list[dict]) -> dict:
    """The time rank 0 spent in gradient allreduces, per training step, from its timeline.

    Each gradient tensor is allreduced once a step; Horovod fuses several into one
    operation, so their ALLREDUCE phases overlap: a step's allreduce time is the
    union of its tensors' phases (from the fused buffer's copy-in to its copy-out,
    not the negotiation that waits for the slower rank). The k-th phase of every
    tensor belongs to step k.

    Returns:
        ``steps``, ``ms_per_step`` (one per step), ``median_ms``, ``mean_ms``,
        ``gradient_tensors`` and ``gradient_params`` (from the shapes Horovod records).

    Raises:
        ValueError: no gradient allreduce in the timeline (a 1-rank job, or not Horovod's).
    """
    tensors = _intervals(events)
    if not tensors:
        raise ValueError("the timeline holds no gradient ALLREDUCE (was it a Horovod job?)")
    steps = Counter(len(v) for v in tensors.values()).most_common(1)[0][0]
    kept = {name: v for name, v in tensors.items() if len(v) == steps}
    per_step = [_union_us([(v[k][0], v[k][1]) for v in kept.values()]) / 1e3 for k in range(steps)]
    params = 0
    for v in kept.values():
        shape = re.findall(r"\d+", str(v[-1][2].get("shape", "")))
        params += math.prod(int(d) for d in shape) if shape else 0
    return {
        "steps": steps,
        "ms_per_step": per_step,
        "median_ms": statistics.median(per_step),
        "mean_ms": statistics.fmean(per_step),
        "gradient_tensors": len(kept),
        "gradient_params": params or None,
    }


def _union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def overlap_seconds(spans: list[tuple[float, float]]) -> float:
    """Seconds during which every one of ``spans`` (start, end) ran at once (0: never)."""
    return max(0.0, min(b for _, b in spans) - max(a for a, _ in spans))


def overlap_fraction(spans: list[tuple[float, float]]) -> float:
    """:func:`overlap_seconds` as a share of the shortest span (1: the short one ran
    entirely while the others did)."""
    return overlap_seconds(spans) / max(1e-9, min(b - a for a, b in spans))


def _rate(rec: dict, what: str) -> float:
    value = rec.get("images_per_sec_per_rank")
    if not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{what}: images_per_sec_per_rank is {value!r}, not a positive number")
    return float(value)


def link_rows(
    link_rate: str | None,
    alone: dict,
    concurrent: list[dict],
    horovod: dict,
    allreduce: dict,
    spans: list[tuple[float, float]],
) -> list[dict]:
    """The three rows of one link rate from the runs' records (``metrics.json`` dicts).

    Args:
        concurrent: the two independent jobs' records; ``spans``: their training
            (start, end) in seconds since the epoch, to show they overlapped.
        allreduce: :func:`allreduce_per_step` of the Horovod job's timeline.
    """
    for rec in (*concurrent, horovod):
        for key in ("model", "batch_size_per_rank", "steps_per_epoch"):
            if rec.get(key) != alone.get(key):
                hint = " (each rank's shard caps its steps: more images or fewer steps)"
                raise ValueError(f"run {rec.get('run_id', '?')}: {key} {rec.get(key)!r} differs "
                                 f"from the alone run's {alone.get(key)!r}"
                                 f"{hint if key == 'steps_per_epoch' else ''}")  # fmt: skip
    base = _rate(alone, "alone")
    shared = statistics.fmean(_rate(r, "concurrent") for r in concurrent)
    rates = {"alone": base, "concurrent": shared, "horovod": _rate(horovod, "horovod")}
    hosts = {
        "alone": alone.get("hosts_per_rank"),
        "concurrent": [h for r in concurrent for h in (r.get("hosts_per_rank") or [None])],
        "horovod": horovod.get("hosts_per_rank"),
    }
    rows = []
    for name in CONFIGURATIONS:
        rows.append({
            "link_rate": link_rate or UNSHAPED, "gbit_per_s": gbit_per_s(link_rate),
            "configuration": name, "model": alone["model"],
            "batch_size_per_rank": alone["batch_size_per_rank"],
            "ranks": 1 if name == "alone" else 2, "hosts": hosts[name],
            "images_per_sec_per_rank": rates[name],
            "step_ms": 1e3 * alone["batch_size_per_rank"] / rates[name],
            "efficiency_vs_alone": rates[name] / base,
            "efficiency_vs_concurrent": rates[name] / shared,
            "allreduce_ms_per_step": allreduce["median_ms"] if name == "horovod" else None,
            "overlap_seconds": overlap_seconds(spans) if name == "concurrent" else None,
            "overlap_fraction": overlap_fraction(spans) if name == "concurrent" else None,
        })  # fmt: skip
    rows[-1].update(_check(rows, allreduce))
    return rows


def _check(rows: list[dict], allreduce: dict) -> dict:
    """The ring model against Horovod's step minus the concurrent jobs' step (both share
    the machine alike, so what is left is Horovod's); unshaped: no rate to model."""
    by = {r["configuration"]: r for r in rows}
    gbit = by["horovod"]["gbit_per_s"]
    if gbit is None:
        return {"check": None}
    common = {
        "model": by["alone"]["model"],
        "batch_size_per_rank": by["alone"]["batch_size_per_rank"],
    }
    baseline = {**common, "ranks": 1, "run_id": "concurrent",
                "images_per_sec_per_rank": by["concurrent"]["images_per_sec_per_rank"]}  # fmt: skip
    together = {**common, "ranks": 2, "run_id": "horovod", "hosts": by["horovod"]["hosts"],
                "images_per_sec_per_rank": by["horovod"]["images_per_sec_per_rank"]}  # fmt: skip
    result = check_overhead(baseline, together, gbit, params=allreduce.get("gradient_params"))
    return {"check": {**result, "model": common["model"], "timeline_allreduce_ms":
                      allreduce["median_ms"]}}  # fmt: skip


def scaling_table(rows: list[dict]) -> pd.DataFrame:
    """One row per (model, link rate, configuration), the check's numbers as columns."""
    table = pd.DataFrame(rows)
    checks = table.pop("check") if "check" in table else pd.Series([None] * len(table))
    for key in ("predicted_ms", "measured_ms", "relative_error", "within"):
        table[f"model_{key}"] = [c.get(key) if isinstance(c, dict) else None for c in checks]
    return table


def allreduce_checks(rows: list[dict]) -> list[dict]:
    """The model's checks of :func:`link_rows`' rows (the summary's ``allreduce_checks``)."""
    return [r["check"] for r in rows if isinstance(r.get("check"), dict)]
