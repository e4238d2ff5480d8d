"""The scaling projection's figure: the ring-allreduce model's efficiency against ranks,
beside the poster's measured efficiency (theirs).

Drawn from :func:`chexlib.report.allreduce_model.projection`'s table; colours of
published numbers and thresholds from :mod:`chexlib.report.style`. Reporting
layer: pandas and matplotlib only, no TensorFlow.
"""

from __future__ import annotations

import textwrap

import pandas as pd

from chexlib.core.reference import POSTER_EFFICIENCY, POSTER_LINK, POSTER_NODE
from chexlib.report.allreduce_model import POSTER_CASE, TOLERANCE, case, poster_efficiency
from chexlib.report.style import TARGET_COLOR, THEIRS_COLOR

# (model, precision, allreduce dtype) drawn, with colour, line and marker: one colour per
# model, one line style per precision and gradient dtype; these lines mean "projected"
LINES = {
    POSTER_CASE: ("#0e7c86", "-", "s"),
    ("densenet121", "FP32", "float16"): ("#0e7c86", "--", "s"),
    ("densenet121", "AMP", "float16"): ("#0e7c86", "-.", "s"),
    ("resnet50", "FP32", "float32"): ("#8c8c2a", "-", "^"),
    ("resnet50", "AMP", "float16"): ("#8c8c2a", "-.", "^"),
}
MODEL_NAMES = {"densenet121": "DenseNet121", "resnet50": "ResNet50"}


def _label(key: tuple, rows: pd.DataFrame) -> str:
    model, precision, dtype = key
    return (
        f"projected: {MODEL_NAMES.get(model, model)} {precision} on V100s, {dtype} gradients "
        f"({rows['grad_mbytes'].iloc[0]:.0f} MB per step)"
    )


def _draw_theirs(ax) -> pd.DataFrame:
    """The poster's measured efficiency (its stated values written on), and the verdict's
    threshold among them; returns what was drawn."""
    theirs = poster_efficiency()
    ax.plot(theirs["ranks"], theirs["efficiency"], "o--", color=THEIRS_COLOR,
            label="measured: the poster, DenseNet121 FP32 on V100s (theirs)")  # fmt: skip
    for gpus, value in POSTER_EFFICIENCY.items():
        ax.annotate(f"{value:.1%}", (gpus, value), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8, color=THEIRS_COLOR)  # fmt: skip
    last = max(POSTER_EFFICIENCY)
    ax.plot([last], [POSTER_EFFICIENCY[last]], "*", ms=14, color=TARGET_COLOR, zorder=5,
            label=f"verdict threshold: the poster's {POSTER_EFFICIENCY[last]:.1%} at {last} "
            "GPUs (theirs)")  # fmt: skip
    return theirs


def plot_projection(table: pd.DataFrame, hardware: str = ""):
    """Efficiency against ranks (log2): the model's lines, the poster's measured points.

    Args:
        table: :func:`chexlib.report.allreduce_model.projection`'s table.
        hardware: where the study ran, named in the note (the projection is not of it).
    """
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6.5), layout="constrained")
    node = POSTER_NODE["gpus"]
    ax.axvspan(0.9, node, color="0.92", zorder=0,
               label=f"one node ({node} GPUs): the ring runs over NVLink/PCIe, faster than "
               "the modelled link")  # fmt: skip
    for key, (color, style, marker) in LINES.items():
        rows = case(table, *key)
        if rows.empty:
            continue
        ax.plot(rows["ranks"], rows["efficiency"], style, color=color, marker=marker, ms=4,
                label=_label(key, rows))  # fmt: skip
        if key == POSTER_CASE:
            ax.fill_between(rows["ranks"], rows["efficiency_low"], rows["efficiency_high"],
                            color=color, alpha=0.25, lw=0,
                            label=f"the poster's case with the allreduce {TOLERANCE:.0%} "
                            "slower or faster (the model's accuracy target)")  # fmt: skip
    theirs = _draw_theirs(ax)
    ranks = sorted(set(table["ranks"]) | set(theirs["ranks"]))
    ax.set_xscale("log", base=2)  # 1 to 512 ranks; efficiency stays linear from 0
    ax.set_xticks([r for r in ranks if r in (1, 2, 4, 8, 16, 64, 512) or r == max(ranks)])
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.set_xlim(0.9, max(ranks) * 1.1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("GPUs (Horovod ranks), log scale")
    ax.set_ylabel("weak-scaling efficiency: images/s(N) / (N x images/s(1))")
    latency = table["latency_us"].iloc[0] if len(table) else float("nan")
    fig.suptitle(
        "PROJECTION: ring-allreduce model of Horovod's scaling on the poster's hardware\n"
        f"({POSTER_LINK['name']} {table['gbit_per_s'].iloc[0]:.0f} Gbit/s, latency "
        f"{latency:.0f} us per ring step assumed; V100 images/s published, theirs; no overlap)",
        fontsize=10,
    )
    where = f"; the study ran on {hardware}, not this hardware" if hardware else ""
    note = (
        "Model: step = batch / published images/s + 2(p-1)/p x gradient bytes / link rate "
        f"+ 2(p-1) x latency (ring allreduce, Patarasuk & Yuan 2009){where}."
    )
    ax.text(0.98, 0.04, textwrap.fill(note, 70), transform=ax.transAxes, ha="right",
            va="bottom", fontsize=7)  # fmt: skip
    handles, labels = ax.get_legend_handles_labels()
    labels = [textwrap.fill(label, 60) for label in labels]
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=7)
    return fig
