"""Figures of the pipeline-alone measurements (profiling notebook, study summary).

Reporting layer: pandas, matplotlib and seaborn only, never TensorFlow, so the
summary can draw them without starting TensorFlow.
"""

from __future__ import annotations

from chexlib.report.style import PIPELINE_COLORS

# the order pipelines are drawn in (chexlib.bench.config.BENCH_PIPELINES)
PIPELINE_ORDER = ("naive", "optimized", "keras-sequence")
_PALETTE = {**PIPELINE_COLORS, "keras-sequence": "#7570b3"}


def _windows_long(df):
    """One row per timed window (seaborn draws the spread from them)."""
    long = df.explode("windows").rename(columns={"windows": "window_images_per_sec"})
    long["window_images_per_sec"] = long["window_images_per_sec"].astype(float)
    return long


def _suffix(hardware: str | None) -> str:
    return f" ({hardware})" if hardware else ""


def plot_throughput(df, ax=None, hardware: str | None = None):
    """Images/s per source and pipeline (median, min-max bars) with each source's CPU limit drawn.

    The limit is the profiling run's own single-core measurement x cores: one
    measurement per source, the same one every figure of the study uses.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 4.5))
    order = list(dict.fromkeys(df["source_name"]))
    hue_order = [p for p in PIPELINE_ORDER if p in set(df["pipeline"])]
    sns.barplot(
        data=_windows_long(df),
        x="source_name",
        y="window_images_per_sec",
        hue="pipeline",
        order=order,
        hue_order=hue_order,
        palette=_PALETTE,
        estimator="median",
        errorbar=("pi", 100),
        ax=ax,
    )
    tf_rows = df[df["pipeline"] != "keras-sequence"]
    for i, name in enumerate(order):
        limit = tf_rows.loc[tf_rows["source_name"] == name, "limit_images_per_sec"].dropna()
        if len(limit):
            ax.hlines(
                limit.iloc[0],
                i - 0.45,
                i + 0.45,
                colors="black",
                linestyles="--",
                label="CPU limit (cores x single core)" if i == 0 else None,
            )
    if df["images_per_sec"].max() > 20 * df["images_per_sec"].min():
        ax.set_yscale("log")  # compact records are 10x and more: a linear axis hides raw PNG
    else:
        ax.set_ylim(bottom=0)
    ax.set_xlabel("source")
    ax.set_ylabel("images/s (median window; bars: min-max)")
    ax.set_title("Input pipeline throughput, no model" + _suffix(hardware))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax.figure


def plot_ablation(df, ax=None, steps=(), hardware: str | None = None):
    """Throughput of optimized minus one step, relative to optimized with every step.

    Args:
        steps: the optimized recipe's step names in order (``chexlib.pipeline.config.OPTIMIZED_STEPS``);
            empty: the order found in ``df``.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    hue = "source_name" if "source_name" in df else "source"
    if ax is None:
        bars = df["variant"].nunique() * df[hue].nunique()
        _, ax = plt.subplots(figsize=(8, 1 + 0.35 * bars))
    present = list(dict.fromkeys(df["variant"]))
    minus = [f"minus {s}" for s in steps] or [v for v in present if v.startswith("minus ")]
    order = ["optimized (all steps)", *minus, "naive (no steps)"]
    sns.barplot(
        data=df, y="variant", x="relative", hue=hue, order=[v for v in order if v in present], ax=ax
    )
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("throughput relative to optimized with all steps")
    ax.set_ylabel("")
    ax.set_title("Ablation: which step buys what" + _suffix(hardware))
    return ax.figure


def plot_utilization(df, ax=None, hardware: str | None = None):
    """SIMULATED accelerator utilization against device speed, per pipeline."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4.5))
    sns.lineplot(
        data=df,
        x="device_rate",
        y="utilization",
        hue="pipeline",
        palette=_PALETTE,
        marker="o",
        ax=ax,
    )
    ax.axhline(0.95, color="grey", linestyle=":", label="95 % utilization")
    limit = df["limit_images_per_sec"].dropna()
    if len(limit):
        ax.axvline(limit.iloc[0], color="black", linestyle="--", label="CPU limit")
    ax.set_ylim(0, 1.05)
    ax.set_xlim(left=0)
    ax.set_xlabel("simulated device speed (images/s)")
    ax.set_ylabel("utilization (busy / wall)")
    ax.set_title("SIMULATED accelerator utilization: naive vs optimized" + _suffix(hardware))
    ax.legend(fontsize=8, loc="lower left")
    return ax.figure
