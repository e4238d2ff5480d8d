"""The study's figures, drawn from the summary's tables (:mod:`chexlib.report.summary`).

The rules every figure keeps (one legend, colours and names, error bars, axes
from zero, the hatch of input-bound runs) are in :mod:`chexlib.report.style`;
the hardware is in every title and a difference inside the run-to-run noise
says so. Reporting layer: matplotlib and pandas only, never TensorFlow.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from chexlib.core.reference import POSTER_RECORDS_GAIN
from chexlib.report.style import (
    ERROR_BARS,
    INPUT_BOUND_HATCH,
    INPUT_COLORS,
    MODEL_MARKERS,
    NEUTRAL_COLOR,
    PIPELINE_COLORS,
    SYNTHETIC_COLOR,
    TARGET_COLOR,
    THEIRS_COLOR,
    finish,
    hatch_handle,
    new_figure,
    readable_log_axis,
)
from chexlib.report.summary import CONFIG as CONFIG_KEYS
from chexlib.report.summary import (
    INPUT_BOUND_BELOW,
    INPUT_ORDER,
    poster_scaling,
    ratio_with_noise,
    throughput_rows,
)

MODEL_NAMES = {
    "standin": "stand-in for a fast accelerator",
    "densenet121": "DenseNet121",
    "resnet50": "ResNet50",
    "tiny": "tiny test CNN",
}


def config_label(row) -> str:
    """ "1 rank, all cores" / "2 ranks, 1 core each": the resources of a run."""
    many = row["ranks"] > 1
    ranks = f"{int(row['ranks'])} rank{'s' if many else ''}"
    pin = row.get("pin_cores")
    pin = int(pin) if pd.notna(pin) else 0
    if not pin:
        return f"{ranks}, all cores"
    return f"{ranks}, {pin} core{'s' if pin > 1 else ''}" + (" each" if many else "")


def panel_title(model: str, part: pd.DataFrame) -> str:
    """The model's name and the compute precision of its runs (every rate depends on it)."""
    name = MODEL_NAMES.get(model, model)
    if "precision" not in part:
        return name
    precisions = sorted(part["precision"].dropna().unique())
    return f"{name}, {'/'.join(precisions)}" if precisions else name


def model_title(model: str, part: pd.DataFrame, input_ms: float | None = None) -> str:
    """Model name and precision, and the two costs. Whether a run is input- or
    compute-bound is each bar's (its hatch), from the same column the tables print."""
    name = panel_title(model, part)
    ms = part["model_ms_per_image"].dropna()
    costs = []
    if len(ms):
        costs.append(f"model {ms.median():.1f} ms/img")
    if input_ms:
        costs.append(f"raw-PNG input {input_ms:.1f} CPU-ms/img")
    return "\n".join(line for line in (name, ", ".join(costs)) if line)


def _input_bound(rows: pd.DataFrame) -> list[bool]:
    return [b == "input-bound" for b in rows.get("bound", pd.Series(index=rows.index))]


def _bar_group(ax, rows: pd.DataFrame, x: str, hue: str, hue_order, colors) -> None:
    """Bars of images/s with 1.96-std error bars, the synthetic ceiling as a tick over each
    bar, and input-bound runs hatched."""
    rows = rows.drop_duplicates([x, hue], keep="last")  # other sizes or batches: the newest
    xs = list(dict.fromkeys(rows[x]))
    width = 0.8 / max(1, len(hue_order))
    for k, h in enumerate(hue_order):
        part = rows[rows[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (k - (len(hue_order) - 1) / 2) * width
        bars = ax.bar(pos, part["images_per_sec"], width, yerr=part["images_per_sec_ci95"],
                      capsize=3, color=colors.get(h, "0.5"), label=h)  # fmt: skip
        for bar, bound in zip(bars, _input_bound(part), strict=True):
            bar.set_hatch(INPUT_BOUND_HATCH if bound else "")
        ax.hlines(part["synthetic_images_per_sec"], pos - width / 2, pos + width / 2,
                  colors=SYNTHETIC_COLOR, lw=2.5,
                  label="synthetic ceiling (same configuration)")  # fmt: skip
    ax.set_xticks(range(len(xs)), xs, fontsize=8)
    ax.set_ylim(bottom=0)


_CEILING_NOTE = (
    "Grey ticks: the synthetic ceiling from alternating windows of the same run; "
    f"{ERROR_BARS}. On a CPU the optimized pipeline keeps decoding during the synthetic "
    "windows (its buffers refill), so the ceiling measured beside it is lower than beside "
    "the naive pipeline, which does no work while it is not read. A GPU would not share "
    "the cores."
)


def _models(data: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(data["model"]))


def _panel_width(bars: int) -> float:
    """Inches for a panel of ``bars`` bars: room for its title and tick labels."""
    return max(4.2, 1.2 + 0.8 * bars)


def _panel_title(ax, text: str, width: float, fontsize: float = 8) -> None:
    """``text`` wrapped to a panel ``width`` inches wide."""
    chars = max(24, int(width * 72 / (0.6 * fontsize)))
    ax.set_title("\n".join(textwrap.fill(line, chars) for line in text.split("\n")),
                 fontsize=fontsize)  # fmt: skip


def _throughput_facets(data, hue: str, order, colors, title: str, input_ms, annotate=None):
    """One panel per model: bars of images/s per run configuration, ``hue`` within each."""
    models = _models(data)
    bars = [len(data[data["model"] == m].drop_duplicates(["config", hue])) for m in models]
    widths = [_panel_width(b) for b in bars]
    fig, axes = new_figure(sum(widths) + 2.8, 4.6, len(models), width_ratios=widths or None)
    for ax, model, width in zip(axes, models, widths, strict=False):
        part = data[data["model"] == model]
        _bar_group(ax, part, "config", hue, [h for h in order if h in set(part[hue])], colors)
        if annotate:
            annotate(ax, part)
        _panel_title(ax, model_title(model, part, input_ms), width - 0.6)
    axes[0].set_ylabel("training images/s, all ranks")
    extra = [hatch_handle(INPUT_BOUND_BELOW)] if any(_input_bound(data)) else []
    return finish(fig, axes, title, _CEILING_NOTE, extra)


def plot_pipelines(train: pd.DataFrame, hardware: str = "", input_ms: float | None = None):
    """Poster figures 1-2: naive vs optimized on raw PNG, end-to-end training, per model."""
    data = throughput_rows(train)
    data = data[data["input"] == "raw PNG"].copy()
    data["config"] = data.apply(config_label, axis=1)
    title = f"Poster figures 1-2: naive vs optimized tf.data, end-to-end training on raw PNG ({hardware})"
    return _throughput_facets(
        data, "pipeline", list(PIPELINE_COLORS), PIPELINE_COLORS, title, input_ms, _annotate_ratio
    )


def _annotate_ratio(ax, part: pd.DataFrame) -> None:
    """Optimized / naive above each pair, or "within noise" when it is."""
    for i, (_, group) in enumerate(part.groupby("config", sort=False)):
        rows = group.set_index("pipeline")
        if {"naive", "optimized"} <= set(rows.index):
            cmp = ratio_with_noise(rows.loc["optimized"], rows.loc["naive"])
            text = "within noise" if cmp["within_noise"] else f"{cmp['ratio']:.2f}x naive"
            tops = group[["images_per_sec", "synthetic_images_per_sec"]].to_numpy(float)
            top = np.nanmax(tops + np.nan_to_num(group[["images_per_sec_ci95"]].to_numpy(float)))
            ax.text(i, top * 1.04, text, ha="center", fontsize=8)
            ax.set_ylim(top=max(ax.get_ylim()[1], top * 1.15))


def plot_sources(train: pd.DataFrame, hardware: str = "", input_ms: float | None = None):
    """Poster figure 3: raw PNG vs TFRecords (both variants), optimized pipeline, per model."""
    data = throughput_rows(train)
    data = data[data["pipeline"] == "optimized"].copy()
    data["config"] = data.apply(config_label, axis=1)
    data = data[data.groupby(["model", "config"])["input"].transform("nunique") > 1]
    title = f"Poster figure 3: raw PNG vs TFRecords, optimized pipeline, end-to-end ({hardware})"
    return _throughput_facets(data, "input", INPUT_ORDER, INPUT_COLORS, title, input_ms)


def gain_error_points(gain: pd.DataFrame) -> pd.Series:
    """The noise of each gain in percentage points, the plotted units: the ratio's relative
    noise times the ratio (3.03x +- 25 % is +- 76 points, not +- 25)."""
    ratio = 1.0 + gain["gain_percent"] / 100.0
    return (ratio * gain["noise_percent"]).fillna(0.0)


def plot_records_gain(gain: pd.DataFrame, hardware: str = ""):
    """Poster figure 4: % gain of records over raw PNG; noise as error bars; the poster's (theirs)."""
    data = gain[gain["pipeline"] == "optimized"].copy()
    data["config"] = data.apply(config_label, axis=1)
    models = _models(data)
    widths = [_panel_width(int((data["model"] == m).sum())) for m in models]
    fig, axes = new_figure(sum(widths) + 2.8, 4.4, len(models), width_ratios=widths or None)
    for ax, model, width in zip(axes, models, widths, strict=False):
        part = data[data["model"] == model].reset_index(drop=True)
        for i, r in part.iterrows():
            ax.bar(i, r["gain_percent"], yerr=gain_error_points(part).iloc[i], capsize=3,
                   color=INPUT_COLORS.get(r["input"], "0.5"), label=r["input"])  # fmt: skip
            if r["within_noise"]:
                ax.text(i, 0, "within\nnoise", ha="center", va="bottom", fontsize=7)
        for (name, theirs), style in zip(POSTER_RECORDS_GAIN.items(), ("--", ":"), strict=False):
            ax.axhline(theirs, color=THEIRS_COLOR, ls=style, lw=1.2,
                       label=f"poster, {MODEL_NAMES.get(name, name)}, 4 V100s (theirs): +{theirs} %")  # fmt: skip
        ax.axhline(0, color=NEUTRAL_COLOR, lw=1)
        ax.set_xticks(range(len(part)), part["config"], fontsize=7)
        _panel_title(ax, panel_title(model, part), width - 0.6, 9)
    axes[0].set_ylabel("images/s gain over raw PNG (%)")
    return finish(fig, axes, f"Poster figure 4: TFRecords over raw PNG, end-to-end ({hardware})",
                  f"{ERROR_BARS} of both runs, in percentage points of the gain.")  # fmt: skip


def _scaling_lines(ours: pd.DataFrame):
    """(label, rows, colour, marker, line style) of each of our scaling lines."""
    for who, part in ours.groupby("who", sort=False):
        color = INPUT_COLORS.get(part["input"].iloc[0], "0.5")
        marker = MODEL_MARKERS.get(part["model"].iloc[0], "o")
        style = "-" if (part["pin_cores"] > 0).all() else ":"
        yield f"ours: {who}", part.sort_values("ranks"), color, marker, style


def plot_scaling(train: pd.DataFrame, hardware: str = "", target: float = 0.85):
    """Scaling efficiency (left) and images/s (right) against ranks; the poster's, theirs."""
    import matplotlib.pyplot as plt

    ours = throughput_rows(train).dropna(subset=["scaling_efficiency"]).copy()
    ours = ours[
        ours.groupby(CONFIG_KEYS, dropna=False)["ranks"].transform("nunique") > 1
    ]  # lines, not dots
    ours["who"] = (ours["model"].map(lambda m: MODEL_NAMES.get(m, m)) + ", " + ours["input"]
                   + " " + ours["pipeline"] + ", " + ours["precision"].fillna("")
                   + " (" + ours["scaling_kind"] + ")")  # fmt: skip
    theirs = poster_scaling()
    fig, (left, right) = new_figure(14, 4.8, 2)
    for label, part, color, marker, style in _scaling_lines(ours):
        left.plot(part["ranks"], part["scaling_efficiency"], style, marker=marker, color=color,
                  label=label)  # fmt: skip
        right.errorbar(part["ranks"], part["images_per_sec"], yerr=part["images_per_sec_ci95"],
                       fmt=style, marker=marker, color=color, capsize=3, label=label)  # fmt: skip
    for ax, col in ((left, "scaling_efficiency"), (right, "images_per_sec")):
        ax.plot(theirs["ranks"], theirs[col], "--s", color=THEIRS_COLOR,
                label="poster DenseNet121 on V100s (theirs)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(theirs["ranks"]) | set(ours["ranks"])))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("Horovod ranks (ours) / GPUs (poster)")
    left.axhline(target, color=TARGET_COLOR, ls="--", lw=1,
                 label=f"target: scaling efficiency {target:.0%} (weak scaling)")  # fmt: skip
    left.set_ylim(0, 1.15)
    left.set_ylabel("scaling efficiency: images/s(N) / (N x images/s(1))")
    right.set_yscale("log")  # a stated exception (style.LOG_AXES): ours beside theirs
    readable_log_axis(right.yaxis)
    right.set_ylabel("training images/s, all ranks (log)")
    return finish(fig, [left, right],
                  f"Scaling with Horovod ranks ({hardware}); solid: each rank on its own cores",
                  f"{ERROR_BARS}. Right: logarithmic, ours beside the poster's GPUs.")  # fmt: skip


_CEILING_MEANING = {  # how each bar's ceiling was measured
    "paired": "paired: ceiling from alternating windows of the same run",
    "shared": "shared: ceiling from another run of the same model and ranks "
    "(separate runs differ by 10-15 % on a busy CPU)",
}


def plot_ceiling(train: pd.DataFrame, hardware: str = "", target: float = INPUT_BOUND_BELOW):
    """Real-data throughput as a fraction of the synthetic ceiling, per run."""
    data = throughput_rows(train).dropna(subset=["fraction_of_synthetic"]).copy()
    if data.empty:  # e.g. a study whose runs measured no synthetic ceiling
        fig, (ax,) = new_figure(6, 2)
        ax.axis("off")
        ax.text(0.5, 0.5, "no run of this study measured its synthetic-data ceiling",
                ha="center", va="center")  # fmt: skip
        return fig
    data["label"] = data["pipeline"] + "\n" + data.apply(config_label, axis=1)
    models = _models(data)
    widths = [_panel_width(int((data["model"] == m).sum())) for m in models]
    fig, axes = new_figure(sum(widths) + 2.8, 4.6, len(models), width_ratios=widths)
    for ax, model, width in zip(axes, models, widths, strict=False):
        part = data[data["model"] == model].reset_index(drop=True)
        low = (part["fraction_of_synthetic"] - part["fraction_min"]).clip(lower=0).fillna(0)
        high = (part["fraction_max"] - part["fraction_of_synthetic"]).clip(lower=0).fillna(0)
        for i, r in part.iterrows():
            bar = ax.bar(i, r["fraction_of_synthetic"], yerr=[[low[i]], [high[i]]], capsize=3,
                         color=INPUT_COLORS.get(r["input"], "0.5"), label=r["input"])  # fmt: skip
            bar[0].set_hatch(INPUT_BOUND_HATCH if r.get("bound") == "input-bound" else "")
        ax.axhline(
            1.0, color=SYNTHETIC_COLOR, lw=2.5, label="synthetic ceiling (same configuration)"
        )
        ax.axhline(target, color=TARGET_COLOR, ls="--", lw=1,
                   label=f"threshold: input-bound below {target:.0%} of the ceiling")  # fmt: skip
        ax.set_xticks(range(len(part)), part["label"], fontsize=7)
        ax.set_ylim(0, 1.2)
        _panel_title(ax, panel_title(model, part), width - 0.6, 9)
    axes[0].set_ylabel("real / synthetic images/s")
    extra = [hatch_handle(INPUT_BOUND_BELOW)] if (data["bound"] == "input-bound").any() else []
    return finish(fig, axes,
                  f"Real data against the synthetic-data ceiling ({hardware})",
                  "Error bars: the paired windows' range of real / synthetic. "
                  + _ceiling_caption(data), extra)  # fmt: skip


def _ceiling_caption(data: pd.DataFrame) -> str:
    paired = data.get("synthetic_paired", pd.Series(False, index=data.index)).fillna(False)
    shared = data.get("synthetic_shared", pd.Series(False, index=data.index)).fillna(False)
    kinds = pd.Series(
        ["paired" if p else ("shared" if s else "separate run")
         for p, s in zip(paired, shared, strict=True)]
    )  # fmt: skip
    notes = [text for kind, text in _CEILING_MEANING.items() if (kinds == kind).any()]
    if not notes:
        return ""
    counts = kinds.value_counts()
    return "; ".join(notes) + ". Bars: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + "."
