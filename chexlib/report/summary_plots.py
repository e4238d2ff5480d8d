"""The study's figures, drawn from the summary's tables (:mod:`chexlib.report.summary`).

Conventions every figure keeps: the hardware is in the title; throughput axes
start at zero; error bars are 1.96 std over the run's timed windows; the
synthetic-data ceiling is a grey tick over its bar; published numbers are
black and say "theirs"; colours mean the same in every figure
(:mod:`chexlib.report.style`); a difference inside the run-to-run noise says so.
Reporting layer: matplotlib and pandas only, never TensorFlow.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from chexlib.core.reference import POSTER_RECORDS_GAIN
from chexlib.report.style import (
    INPUT_COLORS,
    PIPELINE_COLORS,
    SYNTHETIC_COLOR,
    TARGET_COLOR,
    THEIRS_COLOR,
)
from chexlib.report.summary import CONFIG as CONFIG_KEYS
from chexlib.report.summary import INPUT_ORDER, poster_scaling, ratio_with_noise, throughput_rows

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
    """Model name and precision, whether its raw-PNG runs are input- or compute-bound, and
    the two costs."""
    name = panel_title(model, part)
    # the model's bound is that of its best feeding: the optimized pipeline on raw PNG
    raw = part[part["input"] == "raw PNG"]
    bound = raw.loc[raw["pipeline"] == "optimized", "bound"].dropna()
    bound = bound if len(bound) else raw["bound"].dropna()
    label = bound.iloc[0] if len(bound) else None
    ms = part["model_ms_per_image"].dropna()
    costs = []
    if len(ms):
        costs.append(f"model {ms.median():.1f} ms/img")
    if input_ms:
        costs.append(f"raw-PNG input {input_ms:.1f} CPU-ms/img")
    return "\n".join(line for line in (name, label or "", ", ".join(costs)) if line)


def _bar_group(ax, rows: pd.DataFrame, x: str, hue: str, hue_order, colors) -> None:
    """Bars of images/s with 1.96-std error bars and the synthetic ceiling as a tick."""
    rows = rows.drop_duplicates([x, hue], keep="last")  # other sizes or batches: the newest
    xs = list(dict.fromkeys(rows[x]))
    width = 0.8 / max(1, len(hue_order))
    for k, h in enumerate(hue_order):
        part = rows[rows[hue] == h].set_index(x).reindex(xs)
        pos = np.arange(len(xs)) + (k - (len(hue_order) - 1) / 2) * width
        ax.bar(pos, part["images_per_sec"], width, yerr=part["images_per_sec_ci95"], capsize=3,
               color=colors.get(h, "0.5"), label=h)  # fmt: skip
        ceiling = part["synthetic_images_per_sec"]
        ax.hlines(ceiling, pos - width / 2, pos + width / 2, colors=SYNTHETIC_COLOR, lw=2.5,
                  label="synthetic ceiling (same config)" if k == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(xs)), xs, fontsize=8)
    ax.set_ylim(bottom=0)


_CEILING_NOTE = (
    "Grey ticks: the synthetic ceiling from alternating windows of the same run (1.96-std error "
    "bars over timed windows). On a CPU the optimized pipeline keeps decoding during the "
    "synthetic windows\n(its buffers refill), so the ceiling measured beside it is lower than "
    "beside the naive pipeline, which does no work while it is not read. A GPU would not share "
    "the cores."
)


def _facets(n: int, width: float = 5.2, height: float = 4.2):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(n, 1), figsize=(width * max(n, 1), height), squeeze=False)
    return fig, list(axes[0])


def _models(data: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(data["model"]))


def _throughput_facets(data, hue: str, order, colors, title: str, input_ms, annotate=None):
    """One panel per model: bars of images/s per run configuration, ``hue`` within each."""
    fig, axes = _facets(len(_models(data)))
    for ax, model in zip(axes, _models(data), strict=False):
        part = data[data["model"] == model]
        _bar_group(ax, part, "config", hue, [h for h in order if h in set(part[hue])], colors)
        if annotate:
            annotate(ax, part)
        ax.set_title(model_title(model, part, input_ms), fontsize=8)
        ax.set_ylabel("training images/s, all ranks")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(title, y=1.04)
    fig.text(0.01, -0.05, _CEILING_NOTE, fontsize=7, ha="left")
    fig.tight_layout()
    return fig


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
            top = np.nanmax(group[["images_per_sec", "synthetic_images_per_sec"]].to_numpy(float))
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


def plot_records_gain(gain: pd.DataFrame, hardware: str = ""):
    """Poster figure 4: % gain of records over raw PNG; noise as error bars; the poster's (theirs)."""
    data = gain[gain["pipeline"] == "optimized"].copy()
    data["config"] = data.apply(config_label, axis=1)
    fig, axes = _facets(len(_models(data)), width=4.2)
    for ax, model in zip(axes, _models(data), strict=False):
        part = data[data["model"] == model].reset_index(drop=True)
        labels = part["input"] + "\n" + part["config"]
        colors = [INPUT_COLORS.get(i, "0.5") for i in part["input"]]
        ax.bar(range(len(part)), part["gain_percent"], yerr=part["noise_percent"].fillna(0),
               capsize=3, color=colors)  # fmt: skip
        for i, r in part.iterrows():
            if r["within_noise"]:
                ax.text(i, 0, "within\nnoise", ha="center", va="bottom", fontsize=7)
        for (name, theirs), style in zip(POSTER_RECORDS_GAIN.items(), ("--", ":"), strict=False):
            ax.axhline(theirs, color=THEIRS_COLOR, ls=style, lw=1.2,
                       label=f"poster, {MODEL_NAMES.get(name, name)}, 4 V100s (theirs): +{theirs} %")  # fmt: skip
        ax.legend(fontsize=7)
        ax.axhline(0, color="0.3", lw=1)
        ax.set_xticks(range(len(part)), labels, fontsize=7)
        ax.set_title(panel_title(model, part), fontsize=9)
        ax.set_ylabel("images/s gain over raw PNG (%)")
    fig.suptitle(f"Poster figure 4: TFRecords over raw PNG, end-to-end ({hardware})", y=1.02)
    fig.tight_layout()
    return fig


def plot_scaling(train: pd.DataFrame, hardware: str = "", target: float = 0.85):
    """Scaling efficiency (left) and images/s (right) against ranks; the poster's, theirs."""
    import matplotlib.pyplot as plt

    ours = throughput_rows(train).dropna(subset=["scaling_efficiency"]).copy()
    ours = ours[
        ours.groupby(CONFIG_KEYS, dropna=False)["ranks"].transform("nunique") > 1
    ]  # lines, not dots
    ours["who"] = (ours["model"].map(lambda m: MODEL_NAMES.get(m, m)) + ", " + ours["input"]
                   + " " + ours["pipeline"] + ", " + ours["precision"]
                   + " (" + ours["scaling_kind"] + ")")  # fmt: skip
    theirs = poster_scaling()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for who, part in ours.groupby("who", sort=False):
        style = "-o" if (part["pin_cores"] > 0).all() else ":o"
        left.plot(part["ranks"], part["scaling_efficiency"], style, label=f"ours: {who}")
        right.errorbar(part["ranks"], part["images_per_sec"], yerr=part["images_per_sec_ci95"],
                       fmt=style, capsize=3, label=f"ours: {who}")  # fmt: skip
    for ax, col in ((left, "scaling_efficiency"), (right, "images_per_sec")):
        ax.plot(theirs["ranks"], theirs[col], "--s", color=THEIRS_COLOR,
                label="poster DenseNet121 on V100s (theirs)")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(set(theirs["ranks"]) | set(ours["ranks"])))
        ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
        ax.set_xlabel("Horovod ranks (ours) / GPUs (poster)")
    left.axhline(
        target, color=TARGET_COLOR, ls="--", lw=1, label=f"target {target:.0%} (weak scaling)"
    )
    left.set_ylim(0, 1.15)
    left.set_ylabel("scaling efficiency: images/s(N) / (N x images/s(1))")
    right.set_yscale("log")
    right.set_ylabel("training images/s, all ranks (log)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(
        f"Scaling with Horovod ranks ({hardware}); solid: each rank on its own cores", y=1.02
    )
    fig.tight_layout()
    return fig


_CEILING_MEANING = {  # how each bar's ceiling was measured
    "paired": "paired: ceiling from alternating windows of the same run",
    "shared": "shared: ceiling from another run of the same model and ranks "
    "(separate runs differ by 10-15 % on a busy CPU)",
}


def plot_ceiling(train: pd.DataFrame, hardware: str = "", target: float = 0.9):
    """Real-data throughput as a fraction of the synthetic ceiling, per run."""
    data = throughput_rows(train).dropna(subset=["fraction_of_synthetic"]).copy()
    if data.empty:  # e.g. a study whose runs measured no synthetic ceiling
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no run of this study measured its synthetic-data ceiling",
                ha="center", va="center")  # fmt: skip
        return fig
    data["label"] = (
        data["input"] + "\n" + data["pipeline"] + "\n" + data.apply(config_label, axis=1)
    )
    fig, axes = _facets(
        len(_models(data)), width=max(4.0, 1.0 * data.groupby("model").size().max())
    )
    for ax, model in zip(axes, _models(data), strict=False):
        part = data[data["model"] == model].reset_index(drop=True)
        low = (part["fraction_of_synthetic"] - part["fraction_min"]).clip(lower=0).fillna(0)
        high = (part["fraction_max"] - part["fraction_of_synthetic"]).clip(lower=0).fillna(0)
        colors = [INPUT_COLORS.get(i, "0.5") for i in part["input"]]
        hatches = ["//" if p == "naive" else "" for p in part["pipeline"]]
        bars = ax.bar(range(len(part)), part["fraction_of_synthetic"], yerr=[low, high], capsize=3,
                      color=colors)  # fmt: skip
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax.axhline(1.0, color="0.3", lw=1)
        ax.axhline(target, color=TARGET_COLOR, ls="--", lw=1)
        ax.set_xticks(range(len(part)), part["label"], fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_title(panel_title(model, part), fontsize=9)
        ax.set_ylabel("real / synthetic images/s")
    fig.suptitle(
        f"Real data against the synthetic-data ceiling ({hardware}); red: {target:.0%}; "
        "hatched: naive; error bars: paired windows' range",
        y=1.03,
    )
    _ceiling_caption(fig, data)
    fig.tight_layout()
    return fig


def _ceiling_caption(fig, data: pd.DataFrame) -> None:
    paired = data.get("synthetic_paired", pd.Series(False, index=data.index)).fillna(False)
    shared = data.get("synthetic_shared", pd.Series(False, index=data.index)).fillna(False)
    kinds = pd.Series(
        ["paired" if p else ("shared" if s else "separate run")
         for p, s in zip(paired, shared, strict=True)]
    )  # fmt: skip
    notes = [text for kind, text in _CEILING_MEANING.items() if (kinds == kind).any()]
    if notes:
        counts = kinds.value_counts()
        fig.text(
            0.01,
            -0.04,
            "; ".join(notes) + ". Bars: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".",
            fontsize=8,
            ha="left",
        )
