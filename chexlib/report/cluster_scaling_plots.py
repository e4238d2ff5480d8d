"""The cluster weak-scaling figure: efficiency against link rate, Horovod against the
two baselines (:mod:`chexlib.report.cluster_scaling`'s table).

One panel per model. Shaped rates are points on a linear Gbit/s axis from zero; the
unshaped link has no rate to place, so its values are horizontal dotted lines in the
same colours. Reporting layer: pandas and matplotlib only, no TensorFlow.
"""

from __future__ import annotations

import pandas as pd

from chexlib.report.allreduce_model import POSTER_CASE, TOLERANCE, efficiency
from chexlib.report.allreduce_plots import LINES
from chexlib.report.cluster_scaling import TARGET_VS_CONCURRENT as TARGET
from chexlib.report.style import NEUTRAL_COLOR, RANK_COLORS, TARGET_COLOR, finish, new_figure

# (configuration, efficiency column) -> colour and label: what each ratio separates
SERIES = {
    ("horovod", "efficiency_vs_concurrent"): (
        RANK_COLORS[0],
        "Horovod, 2 nodes / two independent jobs at once: what Horovod costs",
    ),
    ("horovod", "efficiency_vs_alone"): (
        RANK_COLORS[3],
        "Horovod, 2 nodes / one node alone: Horovod and sharing the machine",
    ),
    ("concurrent", "efficiency_vs_alone"): (
        RANK_COLORS[1],
        "two independent jobs / one node alone: what sharing the machine costs",
    ),
}
MODEL_COLOR = LINES[POSTER_CASE][0]  # the projection figure's colour of a projected line


def _model_efficiency(rows: pd.DataFrame) -> pd.DataFrame:
    """The ring model's efficiency against the concurrent jobs' step at each shaped rate."""
    shaped = rows[(rows["configuration"] == "horovod") & rows["model_predicted_ms"].notna()]
    concurrent = rows[rows["configuration"] == "concurrent"].set_index("link_rate")["step_ms"]
    return pd.DataFrame(
        {
            "gbit_per_s": shaped["gbit_per_s"].to_numpy(),
            "efficiency": [
                efficiency(concurrent[r], p)
                for r, p in zip(shaped["link_rate"], shaped["model_predicted_ms"], strict=True)
            ],
        }
    ).sort_values("gbit_per_s")


def _panel(ax, rows: pd.DataFrame) -> None:
    for (config, column), (color, label) in SERIES.items():
        part = rows[rows["configuration"] == config]
        shaped = part[part["gbit_per_s"].notna()].sort_values("gbit_per_s")
        ax.plot(shaped["gbit_per_s"], shaped[column], "o-", color=color, label=label)
        for value in part.loc[part["gbit_per_s"].isna(), column]:
            ax.axhline(value, color=color, ls=":", lw=1.5)
    model = _model_efficiency(rows)
    if not model.empty:
        ax.plot(model["gbit_per_s"], model["efficiency"], "s--", color=MODEL_COLOR, mfc="none",
                label="ring-allreduce model over the two independent jobs' step "
                f"(PROJECTION, no overlap; checked within {TOLERANCE:.0%})")  # fmt: skip
    ax.axhline(1.0, color=NEUTRAL_COLOR, lw=1, label="1.0: no loss")
    ax.axhline(TARGET, color=TARGET_COLOR, ls="--", lw=1,
               label=f"target: {TARGET:.2f} of the two independent jobs (DenseNet121)")  # fmt: skip
    top = max(1.1, float(rows[[c for _, c in SERIES]].max().max()) * 1.1)
    ax.set_ylim(0, top)
    ax.set_xlim(0, max(1.0, float(rows["gbit_per_s"].max(skipna=True) or 1.0)) * 1.1)
    ax.set_xlabel("link rate of each node (Gbit/s, tc tbf)")
    ax.set_ylabel("efficiency (images/s per rank)")


def plot_cluster_scaling(table: pd.DataFrame, hardware: str = ""):
    """Efficiency against link rate, one panel per model (rows of ``scaling_table``)."""
    models = list(dict.fromkeys(table["model"]))
    fig, axes = new_figure(5.0 * len(models) + 3.5, 4.6, panels=len(models))
    for ax, model in zip(axes, models, strict=True):
        _panel(ax, table[table["model"] == model])
        ax.set_title(f"{model}, batch {int(table['batch_size_per_rank'].iloc[0])} per rank",
                     fontsize=9)  # fmt: skip
    axes[0].plot([], [], ":", color="0.3", label="dotted line: the same ratio, link unshaped")
    note = (
        "One rank per node, each node its own core (LOCAL EMULATION: network namespaces on "
        f"one machine{'; ' + hardware if hardware else ''}). Two independent one-rank jobs "
        "and the Horovod job share the machine alike, so their ratio is Horovod's own cost."
    )
    return finish(fig, axes, "Weak scaling across 2 nodes: Horovod against the hardware", note)
