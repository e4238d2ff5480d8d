"""The study summary: one tidy table of every run, the poster's figures, conclusions.

Everything here reads the run records a study wrote (``results.collect_runs``)
and nothing else, so the summary can be rebuilt from ``outputs/`` at any time.
The poster's own numbers are kept beside ours, always labelled as theirs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.data import LABELS
from chexlib.results import collect_runs

# Vasudev et al., SC'19 poster: DenseNet121, FP32, TFRecords, images/s in total
# on V100 GPUs (REFERENCE.md). Theirs, not ours.
POSTER_THROUGHPUT = {
    1: 185.12,
    2: 315.26,
    3: 421.85,
    4: 589.36,
    8: 1116.99,
    12: 1527.60,
    16: 1912.82,
}
# Poster: TFRecords (full-size PNG bytes) over raw PNG files, 4 GPUs.
POSTER_RECORDS_GAIN = {"resnet50": 8.39, "densenet121": 13.1}
POSTER_HARDWARE = "poster: PowerEdge C4140, 4x V100 per node, TF 1.12, Horovod 0.16.4"
INPUT_ORDER = ["raw PNG", "png-records", "compact-records", "synthetic"]


def _input_name(params: dict, metrics: dict) -> str:
    """raw PNG / png-records / compact-records, from the records manifest when there is one."""
    if metrics.get("source") != "records":
        return "raw PNG"
    records_dir = (params.get("train") or {}).get("records") or ""
    manifest = Path(records_dir) / "manifest.json"
    if manifest.is_file():
        from chexlib.results import read_json

        return f"{read_json(manifest).get('variant', 'png')}-records"
    return "records"


def training_table(records: list[dict]) -> pd.DataFrame:
    """One row per training run, with scaling efficiency against the 1-rank run."""
    rows = []
    for rec in records:
        m = rec["metrics"]
        if "images_per_sec" not in m or "ranks" not in m:
            continue
        row = {
            "run_id": rec["run_id"],
            "model": m.get("model"),
            "pipeline": m.get("pipeline"),
            "input": _input_name(rec["params"], m),
            "ranks": int(m["ranks"]),
            "images_per_sec": m.get("images_per_sec"),
            "images_per_sec_per_rank": m.get("images_per_sec_per_rank"),
            "synthetic_images_per_sec": m.get("synthetic_images_per_sec"),
            "fraction_of_synthetic": m.get("fraction_of_synthetic"),
            "synthetic_paired": m.get("paired_synthetic") is not None,
            "mean_auroc": m.get("mean_auroc"),
            "auroc_split": m.get("auroc_split"),
            "image_size": m.get("image_size"),
            "batch_size_per_rank": m.get("batch_size_per_rank"),
            "mixed_precision": bool(m.get("mixed_precision")),
            "xla": bool(m.get("xla")),
            "hardware": (m.get("environment") or {}).get("hardware"),
        }
        row.update({f"auroc.{k}": v for k, v in (m.get("auroc") or {}).items()})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    for col in (
        "images_per_sec",
        "images_per_sec_per_rank",
        "synthetic_images_per_sec",
        "fraction_of_synthetic",
        "mean_auroc",
    ):
        table[col] = pd.to_numeric(table[col], errors="coerce")
    # The synthetic ceiling depends on the model and its configuration, not on the
    # input: a study may measure it in one run per configuration and share it.
    same = ["model", "ranks", "image_size", "batch_size_per_rank", "mixed_precision", "xla"]
    shared = table.groupby(same, dropna=False)["synthetic_images_per_sec"].transform("median")
    missing = table["synthetic_images_per_sec"].isna() & shared.notna()
    table["synthetic_shared"] = missing
    table.loc[missing, "synthetic_images_per_sec"] = shared[missing]
    table.loc[missing, "fraction_of_synthetic"] = (
        table.loc[missing, "images_per_sec"] / shared[missing]
    )
    keys = ["model", "pipeline", "input"]
    one_rank = table[table["ranks"] == 1].set_index(keys)["images_per_sec"]
    base = table.set_index(keys).index.map(one_rank.to_dict().get)
    table["scaling_efficiency"] = table["images_per_sec"] / (table["ranks"] * pd.to_numeric(base))
    return table.sort_values(keys + ["ranks"]).reset_index(drop=True)


def records_gain(train: pd.DataFrame) -> pd.DataFrame:
    """% images/s of each records variant over raw PNG, same model, pipeline and ranks."""
    keys = ["model", "pipeline", "ranks"]
    raw = train[train["input"] == "raw PNG"].set_index(keys)["images_per_sec"]
    rows = []
    for _, r in train[train["input"] != "raw PNG"].iterrows():
        ref = raw.get(tuple(r[k] for k in keys))
        if ref and not np.isnan(ref):
            rows.append(
                {
                    **{k: r[k] for k in keys},
                    "input": r["input"],
                    "gain_percent": 100.0 * (r["images_per_sec"] / ref - 1.0),
                }
            )
    return pd.DataFrame(rows)


def poster_scaling() -> pd.DataFrame:
    """The poster's throughput and scaling efficiency against GPUs (theirs)."""
    one = POSTER_THROUGHPUT[1]
    return pd.DataFrame(
        [
            {
                "ranks": n,
                "images_per_sec": v,
                "scaling_efficiency": v / (n * one),
                "who": "poster (V100 GPUs)",
            }
            for n, v in POSTER_THROUGHPUT.items()
        ]
    )


def profiling_tables(records: list[dict]) -> dict[str, pd.DataFrame]:
    """The pipeline-profiling stage's throughput, ablation and utilization tables."""
    tables: dict[str, list] = {"throughput": [], "ablation": [], "utilization": []}
    for rec in records:
        for name in tables:
            rows = rec["metrics"].get(name)
            if isinstance(rows, list):
                tables[name].extend({**row, "run_id": rec["run_id"]} for row in rows)
    return {name: pd.DataFrame(rows) for name, rows in tables.items()}


def load_study(study_dir: str | Path) -> dict:
    """Every table the summary needs, from the run records under ``study_dir``."""
    records = collect_runs(study_dir)
    by_stage: dict[str, list] = {}
    for rec in records:
        by_stage.setdefault(rec["stage"], []).append(rec)
    train = training_table(records)
    return {
        "records": records,
        "stages": {k: len(v) for k, v in by_stage.items()},
        "train": train,
        "gain": records_gain(train) if not train.empty else pd.DataFrame(),
        **profiling_tables(records),
    }


def auroc_comparison(train: pd.DataFrame) -> pd.DataFrame:
    """Per-class AUROC of our best-scoring run beside CheXNet's and the poster's."""
    from chexlib.train import CHEXNET_TEST_AUROC, POSTER_VAL_AUROC

    scored = train.dropna(subset=["mean_auroc"])
    if scored.empty:
        return pd.DataFrame()
    best = scored.loc[scored["mean_auroc"].idxmax()]
    ours = f"ours: {best['model']} {best['pipeline']} {best['input']} ({best['auroc_split']})"
    table = pd.DataFrame(
        {
            ours: [best.get(f"auroc.{label}") for label in LABELS],
            "CheXNet (test, theirs)": [CHEXNET_TEST_AUROC[label] for label in LABELS],
            "poster (val, theirs)": [POSTER_VAL_AUROC[label] for label in LABELS],
        },
        index=list(LABELS),
    ).astype(float)
    table.loc["mean"] = [best["mean_auroc"], 0.841, 0.804]
    return table


# --- figures -----------------------------------------------------------------


def _facet(data: pd.DataFrame, y: str, hue: str, title: str, ylabel: str, style=None):
    import seaborn as sns

    grid = sns.relplot(
        data=data,
        x="ranks",
        y=y,
        hue=hue,
        style=style,
        col="model",
        kind="line",
        marker="o",
        height=3.6,
        aspect=1.2,
        facet_kws={"sharey": False},
    )
    grid.set_axis_labels("Horovod ranks", ylabel)
    for ax in grid.axes.flat:
        ax.set_xticks(sorted(data["ranks"].unique()))
    grid.figure.suptitle(title, y=1.04)
    return grid.figure


def plot_pipelines(train: pd.DataFrame):
    """Poster figures 1 and 2: images/s of naive vs optimized against ranks, per model."""
    return _facet(
        train,
        "images_per_sec",
        "pipeline",
        "Naive vs optimized tf.data pipeline (poster figures 1-2)",
        "images/s (all ranks)",
        style="input",
    )


def plot_sources(train: pd.DataFrame):
    """Poster figure 3: raw PNG vs TFRecords (both variants) against ranks, optimized pipeline."""
    optimized = train[train["pipeline"] == "optimized"]
    return _facet(
        optimized,
        "images_per_sec",
        "input",
        "Raw PNG vs TFRecords, optimized pipeline (poster figure 3)",
        "images/s (all ranks)",
    )


def plot_records_gain(gain: pd.DataFrame):
    """Poster figure 4: % improvement of records over raw, with the poster's values marked."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    models = sorted(gain["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        part = gain[(gain["model"] == model) & (gain["pipeline"] == "optimized")]
        sns.barplot(data=part, x="ranks", y="gain_percent", hue="input", ax=ax)
        ax.axhline(0, color="0.3", lw=1)
        theirs = POSTER_RECORDS_GAIN.get(model)
        if theirs is not None:
            ax.axhline(
                theirs, color="C3", ls="--", lw=1.2, label=f"poster, 4 V100s (theirs): +{theirs} %"
            )
        ax.set_title(model)
        ax.set_xlabel("Horovod ranks")
        ax.set_ylabel("images/s gain over raw PNG (%)")
        ax.legend(fontsize=8)
    fig.suptitle("TFRecords over raw PNG, optimized pipeline (poster figure 4)", y=1.03)
    fig.tight_layout()
    return fig


def plot_scaling(train: pd.DataFrame):
    """Scaling efficiency against ranks: ours (per model/pipeline/input) and the poster's."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    ours = train.dropna(subset=["scaling_efficiency"]).copy()
    ours["who"] = "ours: " + ours["model"] + " " + ours["pipeline"] + " " + ours["input"]
    fig, ax = plt.subplots(figsize=(8, 4))
    sns.lineplot(data=ours, x="ranks", y="scaling_efficiency", hue="who", marker="o", ax=ax)
    theirs = poster_scaling()
    ax.plot(
        theirs["ranks"],
        theirs["scaling_efficiency"],
        "k--o",
        label="poster DenseNet121 (theirs, V100)",
    )
    ax.axhline(1.0, color="0.6", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(theirs["ranks"]) | set(ours["ranks"])))
    ax.get_xaxis().set_major_formatter(plt.ScalarFormatter())
    ax.set_xlabel("Horovod ranks (ours) / GPUs (poster)")
    ax.set_ylabel("scaling efficiency")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title("Scaling efficiency: throughput(N) / (N x throughput(1))")
    fig.tight_layout()
    return fig


def plot_ceiling(train: pd.DataFrame):
    """Real-data throughput as a fraction of the synthetic-data ceiling, same configuration."""
    import seaborn as sns

    data = train.dropna(subset=["fraction_of_synthetic"])
    grid = sns.catplot(
        data=data,
        x="input",
        y="fraction_of_synthetic",
        hue="pipeline",
        col="model",
        row="ranks",
        kind="bar",
        height=3.0,
        aspect=1.4,
        order=[i for i in INPUT_ORDER if i in set(data["input"])],
    )
    for ax in grid.axes.flat:
        ax.axhline(1.0, color="0.3", lw=1)
        ax.axhline(0.97, color="C3", ls="--", lw=1)
    grid.set_axis_labels("", "real / synthetic images/s")
    grid.figure.suptitle("Real data against the synthetic-data ceiling (red: 97 % target)", y=1.03)
    paired = data.get("synthetic_paired", pd.Series(False, index=data.index)).fillna(False)
    shared = data.get("synthetic_shared", pd.Series(False, index=data.index)).fillna(False)
    kinds = pd.Series(
        [
            "paired" if p else ("shared" if s else "separate run")
            for p, s in zip(paired, shared, strict=True)
        ]
    )
    meaning = {  # how each bar's ceiling was measured
        "paired": "paired: ceiling from alternating windows of the same run",
        "shared": "shared: ceiling from another run of the same model and ranks "
        "(separate runs differ by 10-15 % on a busy CPU)",
    }
    notes = [text for kind, text in meaning.items() if (kinds == kind).any()]
    if notes:
        counts = kinds.value_counts()
        grid.figure.text(
            0.01,
            -0.04,
            "; ".join(notes) + ". Bars: " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".",
            fontsize=8,
            ha="left",
        )
    return grid.figure


# --- conclusions computed from the table ------------------------------------


def _ratio_text(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "n/a"
    return (
        f"{values.median():.2f}x (range {values.min():.2f}-{values.max():.2f}, {len(values)} pairs)"
    )


def conclusions(tables: dict) -> str:
    """A short Markdown list of what the numbers say; every figure computed here."""
    train, lines = tables["train"], []
    if not train.empty:
        keys = ["model", "input", "ranks"]
        piv = train.pivot_table(index=keys, columns="pipeline", values="images_per_sec")
        if {"naive", "optimized"} <= set(piv.columns):
            lines.append(
                f"- Training, optimized over naive pipeline: {_ratio_text(piv['optimized'] / piv['naive'])}."
            )
        gain = tables["gain"]
        for variant in sorted(gain["input"].unique()) if not gain.empty else []:
            g = gain[(gain["input"] == variant) & (gain["pipeline"] == "optimized")]["gain_percent"]
            if len(g):
                lines.append(
                    f"- {variant} over raw PNG (optimized): median {g.median():+.1f} % "
                    f"(range {g.min():+.1f} to {g.max():+.1f} %); the poster (theirs) measured "
                    f"+8.4 % (ResNet50) and +13.1 % (DenseNet121) on 4 V100s."
                )
        eff = train[train["ranks"] > 1]["scaling_efficiency"].dropna()
        if len(eff):
            lines.append(
                f"- Scaling efficiency at {int(train['ranks'].max())} ranks: median {eff.median():.0%} "
                f"(poster, theirs: 79.6 % at 4 GPUs, 64.6 % at 16)."
            )
        frac = train.loc[train["pipeline"] == "optimized", "fraction_of_synthetic"].dropna()
        if len(frac):
            lines.append(
                f"- Optimized real-data throughput is a median {frac.median():.0%} of the "
                f"synthetic ceiling ({(frac >= 0.97).sum()} of {len(frac)} runs reach 97 %)."
            )
        if "synthetic_paired" in train:
            paired = train.loc[
                train["synthetic_paired"].fillna(False).astype(bool), "fraction_of_synthetic"
            ].dropna()
            if len(paired):
                lines.append(
                    f"- Measured paired (real and synthetic windows alternating in one run): "
                    f"real = median {paired.median():.0%} of synthetic "
                    f"(range {paired.min():.0%}-{paired.max():.0%}, {len(paired)} runs)."
                )
        best = train["mean_auroc"].dropna()
        if len(best):
            lines.append(
                f"- Best mean AUROC {best.max():.3f} (CheXNet, theirs: 0.841 on the NIH test set)."
            )
    thr = tables.get("throughput")
    if thr is not None and not thr.empty and "fraction_of_limit" in thr:
        opt = thr[thr["pipeline"] == "optimized"].dropna(subset=["fraction_of_limit"])
        for _, r in opt.iterrows():
            lines.append(
                f"- Pipeline alone, optimized on {r.get('source_variant', r['source'])}: "
                f"{r['images_per_sec']:.0f} images/s, {r['fraction_of_limit']:.0%} of the CPU limit."
            )
    hardware = sorted(set(train["hardware"].dropna())) if not train.empty else []
    lines.append(
        f"- Hardware of our numbers: {'; '.join(hardware) or 'see the run records'}. "
        f"{POSTER_HARDWARE}."
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class SummaryConfig:
    """Parameters of ``notebooks/05_summary.ipynb``, validated."""

    study_dir: str
    output_dir: str

    def __post_init__(self):
        if not Path(self.study_dir).is_dir():
            raise ValueError(f"study_dir {self.study_dir} does not exist: run the study first")

    def to_dict(self) -> dict:
        return asdict(self)
