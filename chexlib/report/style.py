"""The rules every figure of the study keeps, in one place (no TensorFlow here).

- One colour and one name per meaning, across every figure: a pipeline, an
  input, the synthetic ceiling, the CPU limit, a threshold, published numbers
  ("theirs"). A reader who learned "orange is naive" in one figure can read
  the next one without its legend. :func:`input_name` turns every spelling the
  layers use (``raw``, ``records-png``, ``png``) into the one name shown.
- Hatched bars are input-bound runs, in every figure (the ``bound`` column of
  :func:`chexlib.report.summary.training_table`, the same one the tables print).
- Error bars: 1.96 std over the run's timed windows, in the units of the axis
  (:data:`ERROR_BARS`). A ratio whose windows a record does not keep (real /
  synthetic) shows its paired windows' range instead, and says so.
- Throughput axes are linear from zero. Stated exceptions (:data:`LOG_AXES`):
  an axis that must show ours beside theirs over two decades is logarithmic,
  with plain-number ticks on 1-2-5 steps (:func:`readable_log_axis`).
- One legend per figure, outside the panels, holding every mark
  (:func:`finish`); titles and notes are laid out by matplotlib's constrained
  layout, so nothing is clipped or overlaps at the size written.
"""

from __future__ import annotations

import textwrap

PIPELINE_COLORS = {
    "naive": "#d95f02",
    "optimized": "#1b9e77",
    "keras-sequence": "#e6ab02",
    "keras-directory": "#a6761d",
}
INPUT_COLORS = {
    "raw PNG": "#7570b3",
    "png-records": "#e7298a",
    "compact-records": "#66a61e",
    "records": "#999933",
}
# every spelling of an input in the layers' tables -> its one name in figures
_INPUT_NAMES = {
    "raw": "raw PNG",
    "raw PNG": "raw PNG",
    "png": "png-records",
    "records-png": "png-records",
    "png-records": "png-records",
    "compact": "compact-records",
    "records-compact": "compact-records",
    "compact-records": "compact-records",
}
MODEL_MARKERS = {"standin": "o", "densenet121": "s", "resnet50": "^", "tiny": "D"}
SYNTHETIC_COLOR = "#666666"  # the synthetic-data ceiling
OURS_COLOR = "#b15928"  # our generated dataset beside a published one
THEIRS_COLOR = "#000000"  # published numbers (the poster, CheXNet, nodes), always "theirs"
TARGET_COLOR = "#e41a1c"  # thresholds of the verdicts
CPU_LIMIT_COLOR = "#386cb0"  # the CPU limit: cores x single-core rate (bench_plots.cpu_limits)
# the input pipeline's stages (chexlib.bench.stages.STAGES) and the accelerator's work
STAGE_COLORS = {
    "read file": "#fdb462",
    "decode + box-reduce": "#fb8072",
    "resize + draw flip": "#80b1d3",
    "batch + flips": "#bc80bd",
}
ACCELERATOR_COLOR = "#4d4d4d"
# Horovod ranks, in rank order (the shards-and-allreduce diagram)
RANK_COLORS = (
    "#1f78b4",
    "#fdbf6f",
    "#cab2d6",
    "#b2df8a",
    "#fb9a99",
    "#a6cee3",
    "#ffff99",
    "#8dd3c7",
)
NEUTRAL_COLOR = "#bbbbbb"  # reference lines that are neither ours nor theirs (0, 1.0)
INPUT_BOUND_HATCH = "//"  # input-bound: real below summary.INPUT_BOUND_BELOW of its ceiling
ERROR_BARS = "error bars: 1.96 std over timed windows"
# ylabels of the axes drawn logarithmic, and why (every other throughput axis starts at 0)
LOG_AXES = {
    "training images/s, all ranks (log)": "ours (10-200 images/s on a CPU) beside the "
    "poster's GPUs (200-2000) on one axis",
    "CPU cores per GPU for input alone (log)": "compact records need 0.1 core, raw PNG "
    "more than a node has",
}


def input_name(name: str) -> str:
    """The one name of an input in every figure (``raw`` -> ``raw PNG``, ...)."""
    return _INPUT_NAMES.get(name, name)


def color_of(name: str, default: str = "0.5") -> str:
    """The colour of a pipeline or an input, whatever its spelling."""
    return PIPELINE_COLORS.get(name) or INPUT_COLORS.get(input_name(name), default)


def readable_log_axis(axis) -> None:
    """Ticks on 1-2-5 steps written as plain numbers (0.2, 5, 50, 200), not 10^k."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def wrap(text: str, fig, fontsize: float, share: float = 1.0) -> str:
    """``text`` broken into lines that fit ``share`` of the figure's width."""
    chars = max(30, int(share * fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def new_figure(width: float, height: float, panels: int = 1, rows: int = 1, **kwargs):
    """A constrained-layout figure with ``rows`` x ``panels`` axes (in a flat list)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        rows, max(1, panels), figsize=(width, height), squeeze=False, layout="constrained", **kwargs
    )
    return fig, list(axes.flat)


_LEGEND_CHARS = 42  # characters in a line of a legend label


def finish(fig, axes, title: str, note: str = "", extra=()):
    """One legend for the whole figure (every labelled mark of every panel, once), outside
    the panels on the right; the title above and ``note`` below, wrapped to fit.

    Args:
        extra: ``(handle, label)`` pairs for marks no artist carries (a hatch's meaning).
    """
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    for handle, label in extra:
        handles.setdefault(label, handle)
    share = 1.0  # of the figure's width left of the legend: the titles are wrapped to it
    if handles:
        labels = [textwrap.fill(label, _LEGEND_CHARS) for label in handles]
        fig.legend(list(handles.values()), labels, loc="outside right upper", fontsize=7)
        longest = max(len(line) for label in labels for line in label.split("\n"))
        share = max(0.4, 1.0 - (longest * 7 * 0.6 / 72 + 0.9) / fig.get_figwidth())
    # wrapped by matplotlib at draw time, within the width left of the legend; the
    # text itself keeps no line breaks
    fig.suptitle(title, x=share / 2, fontsize=11, wrap=True)
    if note:
        fig.supxlabel(note, x=share / 2, fontsize=7, ha="center", wrap=True)
    return fig


def hatch_handle(below: float):
    """A legend entry for :data:`INPUT_BOUND_HATCH` (``below``: the input-bound share)."""
    from matplotlib.patches import Patch

    label = f"hatched: input-bound (real < {below:.0%} of its synthetic ceiling)"
    return Patch(facecolor="white", edgecolor="0.3", hatch=INPUT_BOUND_HATCH), label
