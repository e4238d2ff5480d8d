"""Sentences of the walkthrough's prose built from numbers, never typed.

A notebook's Markdown states no measured figure (a time, a speed-up, a gain):
a code cell shows it, as Markdown returned by one of these functions, which read the run records or this run's own clock, and published
numbers (the poster's, CheXNet's) come from :mod:`chexlib.core.reference`.
``tests/test_notebook_prose.py`` fails on a figure typed in Markdown.

* :func:`header`: the opening cell of every notebook: the time earlier runs of
  it took (their ``run.json``), on the hardware their records name; starts
  this run's clock;
* :func:`run_time`: the closing cell: what this run took, on this machine;
* :func:`poster_records_gain`, :func:`naive_vs_optimized`: sentences that
  quote the poster or the study's training table (``*_text``: the string).

Imports ``chexlib.core`` only: the header cell runs
before anything else and stays light (no TensorFlow, no pandas).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from chexlib.core.files import RecordError, read_json
from chexlib.core.machine import cpu_model, usable_cores
from chexlib.core.reference import POSTER_RECORDS_GAIN, POSTER_RECORDS_GAIN_SETUP

NOT_MEASURED = "not measured yet"
OUTPUTS = Path(__file__).resolve().parents[2] / "outputs"  # the checkout's, as `chexlib study`
_started: dict[str, float] = {}  # notebook -> when its header cell ran (this kernel)


def seconds_text(seconds: float) -> str:
    """``68 s``, ``1.3 min``, ``2.4 h``: a duration at a readable scale."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def range_text(values: list[float]) -> str:
    """One duration, or ``low to high`` over several."""
    low, high = min(values), max(values)
    if seconds_text(low) == seconds_text(high):
        return seconds_text(low)
    return f"{seconds_text(low)} to {seconds_text(high)}"


def hardware_text(cores, cpu) -> str:
    """``2 cores of <CPU model>``, from a record's environment or :mod:`chexlib.core.machine`."""
    if not cores or not cpu:
        return "hardware not recorded"
    return f"{cores} CPU core{'s' if cores != 1 else ''} of {cpu}"


def this_machine() -> str:
    return hardware_text(usable_cores(), cpu_model())


def _notebook_of(run: dict) -> str:
    return Path(str(run.get("notebook", ""))).stem


def study_roots(outputs: str | Path | None = None) -> list[Path]:
    """Where studies are: ``outputs``, or the repository's ``outputs/`` and, for a run
    of a study (its ``run.json`` in the working folder), that study's outputs root."""
    if outputs:
        return [Path(outputs)]
    roots, here = [OUTPUTS], Path.cwd()
    try:
        run = read_json(here / "run.json", expect=dict)
    except (RecordError, OSError):
        return roots  # not a study's run: a notebook opened by hand
    # <root>/<study>/<stage>/<run>/, or a collecting run's <root>/<study>/<folder>/
    depth = 2 if here.parent.name == run.get("stage") else 1
    if len(here.parents) > depth and here.parents[depth].resolve() != OUTPUTS.resolve():
        roots.append(here.parents[depth])
    return roots


def earlier_runs(notebook: str, outputs: str | Path | None = None) -> list[dict]:
    """Complete runs of ``notebook`` in every study under :func:`study_roots`:
    ``{study, stage, seconds, hardware}`` each."""
    found, roots = [], study_roots(outputs)
    for root in roots:
        markers = sorted(root.glob("*/*/*/run.json")) + sorted(root.glob("*/*/run.json"))
        for marker in markers:
            try:
                run = read_json(marker, expect=dict)
            except (RecordError, OSError):
                continue  # a broken record is the summary's to report, not the header's
            seconds = run.get("seconds")
            if run.get("status") != "complete" or _notebook_of(run) != notebook:
                continue
            if not isinstance(seconds, int | float) or not math.isfinite(seconds):
                continue
            study = marker.relative_to(root).parts[0]
            found.append({
                "study": study if root == roots[0] else str(root / study),
                "stage": run.get("stage"),
                "seconds": float(seconds),
                "hardware": _recorded_hardware(marker.parent),
            })  # fmt: skip
    return found


def _recorded_hardware(run_dir: Path) -> str:
    """The machine a run's own ``metrics.json`` says it ran on."""
    try:
        env = read_json(run_dir / "metrics.json", expect=dict).get("environment") or {}
    except (RecordError, OSError):
        env = {}
    return hardware_text(env.get("cpu_count"), env.get("cpu"))


def time_text(notebook: str, outputs: str | Path | None = None) -> str:
    """Markdown: per study, how long the earlier runs of ``notebook`` took, and where."""
    runs = earlier_runs(notebook, outputs)
    if not runs:
        return f"**Time:** {NOT_MEASURED} (no finished run of this notebook under `outputs/`)."
    lines = ["**Time**, measured (each study's `run.json`, kernel start to last cell):"]
    for study in sorted({r["study"] for r in runs}):
        mine = [r for r in runs if r["study"] == study]
        seconds = [r["seconds"] for r in mine]
        machines = sorted({r["hardware"] for r in mine})
        count = f"{len(mine)} run{'s' if len(mine) != 1 else ''}"
        each = f" each, {seconds_text(sum(seconds))} in all" if len(mine) > 1 else ""
        lines.append(
            f"- study `{study}`: {count}, {range_text(seconds)}{each}; on {', '.join(machines)}"
        )
    return "\n".join(lines)


def header(notebook: str, outputs: str | Path | None = None):
    """The generated part of a notebook's header: earlier runs' times, and the
    machine this run is on. Starts the clock :func:`run_time` reads."""
    _started[notebook] = time.monotonic()
    return _markdown(f"{time_text(notebook, outputs)}\n\nThis run: on {this_machine()}.")


def run_time(notebook: str):
    """Markdown: this run's time from its header cell to here, on this machine."""
    start = _started.get(notebook)
    if start is None:
        return _markdown(f"This run's time: {NOT_MEASURED} (the header cell did not run).")
    took = seconds_text(time.monotonic() - start)
    return _markdown(f"This run took **{took}** from its header cell to here, on {this_machine()}.")


def percent_text(value: float) -> str:
    return f"{value:+.3g} %"


def _markdown(text: str):
    from IPython.display import Markdown  # here: the text helpers need no IPython

    return Markdown(text)


def poster_records_gain_text() -> str:
    """The poster's TFRecords-over-raw-PNG gains, from :mod:`chexlib.core.reference`."""
    parts = [
        f"**{percent_text(v)}** for {model}" for model, v in sorted(POSTER_RECORDS_GAIN.items())
    ]
    return (
        "The poster's gain of TFRecords (full-size PNG bytes) over the raw PNG folder, in "
        f"training images/s on {POSTER_RECORDS_GAIN_SETUP}: {' and '.join(parts)} (theirs, from "
        "`chexlib.core.reference.POSTER_RECORDS_GAIN`)."
    )


def poster_records_gain():
    """:func:`poster_records_gain_text` as Markdown, for a notebook cell."""
    return _markdown(poster_records_gain_text())


def naive_vs_optimized_text(train) -> str:
    """Optimized / naive images/s per model, one unpinned rank on raw PNG, with the
    naive run's bound, from the summary's training table (``summary.training_table``)."""
    if train is None or getattr(train, "empty", True):
        return "No training runs: nothing to compare."
    one = train[(train["ranks"] == 1) & (train["input"] == "raw PNG") & (train["pin_cores"] == 0)]
    lines = []
    for model, rows in one.groupby("model", sort=False):
        by = {pipeline: r.iloc[0] for pipeline, r in rows.groupby("pipeline")}
        if not {"naive", "optimized"} <= set(by):
            continue
        naive, optimized = by["naive"], by["optimized"]
        ratio = optimized["images_per_sec"] / naive["images_per_sec"]
        lines.append(
            f"- **{model}**: optimized / naive = **{ratio:.2f}x** "
            f"({optimized['images_per_sec']:.1f} against {naive['images_per_sec']:.1f} images/s; "
            f"the naive run is {naive['bound']})"
        )
    if not lines:
        return "No model has both a naive and an optimized 1-rank raw-PNG run here."
    return "Measured in this study (one rank, raw PNG):\n\n" + "\n".join(lines)


def naive_vs_optimized(train):
    """:func:`naive_vs_optimized_text` as Markdown, for a notebook cell."""
    return _markdown(naive_vs_optimized_text(train))
