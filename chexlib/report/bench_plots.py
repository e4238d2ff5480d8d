"""Figures of the pipeline-alone measurements (profiling notebook, study summary).

The CPU limit (cores x the single-core rate, :func:`cpu_limits`) is decided
here once per input, and every figure that draws one draws that one. The rules
of every figure are :mod:`chexlib.report.style`'s.
Reporting layer: pandas and matplotlib only, never TensorFlow, so the summary
can draw them without starting TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from chexlib.report.style import (
    CPU_LIMIT_COLOR,
    ERROR_BARS,
    INPUT_COLORS,
    PIPELINE_COLORS,
    TARGET_COLOR,
    color_of,
    finish,
    input_name,
    new_figure,
)

# the order pipelines are drawn in (chexlib.bench.config.BENCH_PIPELINES)
PIPELINE_ORDER = ("naive", "optimized", "keras-sequence", "keras-directory")
CPU_LIMIT_LABEL = "CPU limit: cores x single-core rate"


def _suffix(hardware: str | None) -> str:
    return f" ({hardware})" if hardware else ""


def _inputs(df: pd.DataFrame) -> pd.Series:
    """Each row's input under its one name (``raw`` -> ``raw PNG``)."""
    column = "source_variant" if "source_variant" in df else "source_name"
    return df[column].map(input_name)


def cpu_limits(throughput: pd.DataFrame) -> dict[str, float]:
    """The CPU limit of each input, in images/s: the profiling run's single-core rate x
    cores, measured once per source beside the tf.data pipelines (the peers have their own).

    The one CPU limit of the study: the throughput and the utilization figures
    both draw it from here, never from a sweep's own measurement.
    """
    if throughput is None or throughput.empty or "limit_images_per_sec" not in throughput:
        return {}
    rows = throughput[throughput["pipeline"].isin(("naive", "optimized"))]
    limits = rows.assign(input=_inputs(rows)).dropna(subset=["limit_images_per_sec"])
    return limits.groupby("input", sort=False)["limit_images_per_sec"].median().to_dict()


def window_ci95(windows) -> float:
    """1.96 std of one measurement's timed windows (images/s); 0 for fewer than two."""
    values = np.asarray(list(windows) if windows is not None else [], dtype=float)
    return float(1.96 * values.std(ddof=1)) if len(values) > 1 else 0.0


def plot_throughput(df, hardware: str | None = None):
    """Images/s per pipeline, one panel per input, each linear from zero, with the input's
    CPU limit (:func:`cpu_limits`); error bars 1.96 std over the timed windows."""
    data = df.assign(input=_inputs(df))
    inputs = list(dict.fromkeys(data["input"]))
    limits = cpu_limits(df)
    sizes = [data.loc[data["input"] == i, "pipeline"].nunique() for i in inputs]
    fig, axes = new_figure(sum(max(2.6, 0.9 * n + 1.0) for n in sizes) + 2.6, 4.4, len(inputs),
                           width_ratios=sizes or None)  # fmt: skip
    for ax, name in zip(axes, inputs, strict=True):
        part = data[data["input"] == name].drop_duplicates("pipeline", keep="last")
        drawn = [p for p in PIPELINE_ORDER if p in set(part["pipeline"])]
        part = part.set_index("pipeline").reindex(drawn)
        for i, (pipeline, r) in enumerate(part.iterrows()):
            ax.bar(i, r["images_per_sec"], 0.7, yerr=window_ci95(r.get("windows")), capsize=3,
                   color=PIPELINE_COLORS.get(pipeline, "0.5"), label=pipeline)  # fmt: skip
        if name in limits:
            ax.axhline(limits[name], color=CPU_LIMIT_COLOR, ls="--", lw=1.5, label=CPU_LIMIT_LABEL,
                       gid=f"cpu-limit:{name}")  # fmt: skip
        ax.set_xticks(range(len(part)), part.index, fontsize=7, rotation=20, ha="right")
        ax.set_ylim(bottom=0, top=1.12 * max(limits.get(name, 0), ax.get_ylim()[1]))
        ax.set_title(name, fontsize=9, color=INPUT_COLORS.get(name, "black"))
    axes[0].set_ylabel("images/s (median window)")
    return finish(fig, axes, "Input pipeline throughput, no model" + _suffix(hardware),
                  ERROR_BARS + "; each input on its own axis, from zero.")  # fmt: skip


def plot_ablation(df, steps=(), hardware: str | None = None):
    """Throughput of optimized minus one step, relative to optimized with every step.

    Args:
        steps: the optimized recipe's step names in order (``chexlib.pipeline.config.OPTIMIZED_STEPS``);
            empty: the order found in ``df``.
    """
    data = df.assign(input=_inputs(df))
    present = list(dict.fromkeys(data["variant"]))
    minus = [f"minus {s}" for s in steps] or [v for v in present if v.startswith("minus ")]
    order = [v for v in ["optimized (all steps)", *minus, "naive (no steps)"] if v in present]
    inputs = list(dict.fromkeys(data["input"]))
    fig, (ax,) = new_figure(9, 1.2 + 0.3 * len(order) * len(inputs))
    height = 0.8 / max(1, len(inputs))
    for k, name in enumerate(inputs):
        part = data[data["input"] == name].drop_duplicates("variant").set_index("variant")
        part = part.reindex(order)
        pos = np.arange(len(order)) + (k - (len(inputs) - 1) / 2) * height
        ax.barh(pos, part["relative"], height, color=color_of(name), label=name)
    ax.axvline(1.0, color=TARGET_COLOR, linestyle="--", linewidth=1,
               label="optimized with all steps (1.0)")  # fmt: skip
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(left=0)
    ax.set_xlabel("throughput relative to optimized with all steps")
    return finish(fig, [ax], "Ablation: which step buys what" + _suffix(hardware))


def plot_utilization(df, throughput=None, hardware: str | None = None):
    """SIMULATED accelerator utilization against device speed, per pipeline, with the CPU
    limit of the sweep's input from ``throughput`` (:func:`cpu_limits`, the one limit)."""
    fig, (ax,) = new_figure(9.5, 4.6)
    for pipeline in [p for p in PIPELINE_ORDER if p in set(df["pipeline"])]:
        part = df[df["pipeline"] == pipeline].sort_values("device_rate")
        ax.plot(part["device_rate"], part["utilization"], "-o", color=PIPELINE_COLORS[pipeline],
                label=pipeline)  # fmt: skip
    ax.axhline(0.95, color=TARGET_COLOR, linestyle=":", label="95 % utilization")
    name = _inputs(df).iloc[0] if len(df) else None
    limit = cpu_limits(throughput).get(name) if throughput is not None else None
    if limit:
        ax.axvline(limit, color=CPU_LIMIT_COLOR, ls="--", lw=1.5,
                   label=f"{CPU_LIMIT_LABEL} ({name})", gid=f"cpu-limit:{name}")  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlim(0, 1.05 * max(df["device_rate"].max(), limit or 0))
    ax.set_xlabel(f"simulated device speed (images/s), input: {name}")
    ax.set_ylabel("utilization (busy / wall)")
    return finish(
        fig, [ax], "SIMULATED accelerator utilization: naive vs optimized" + _suffix(hardware)
    )
