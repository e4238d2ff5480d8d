"""Figures of the dataset itself (the data-prep notebook)."""

from __future__ import annotations

import pandas as pd

from chexlib.data.metadata import LABELS
from chexlib.data.png import read_grayscale


def plot_prevalence(table: pd.DataFrame, ax=None):
    """Bar chart of label prevalence, ours beside NIH's (``data.prevalence_table``)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 4))
    sns.barplot(data=table, x="label", y="prevalence", hue="source", ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("fraction of images")
    ax.tick_params(axis="x", rotation=60)
    ax.set_title("Label prevalence: generated set vs NIH ChestX-ray14")
    return ax.figure


def plot_samples(df: pd.DataFrame, n: int = 8, seed: int = 0, columns: int = 4):
    """A grid of ``n`` images (with at least one finding where possible) and their labels."""
    import matplotlib.pyplot as plt

    sick = df[df[list(LABELS)].sum(axis=1) > 0]
    pool = sick if len(sick) >= n else df
    picks = pool.sample(n=min(n, len(pool)), random_state=seed)
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, picks.iterrows(), strict=False):
        ax.imshow(read_grayscale(row["path"]), cmap="gray")
        findings = [label for label in LABELS if row[label]] or ["No Finding"]
        ax.set_title(f"{row['image']}\n" + ", ".join(findings), fontsize=8)
    fig.tight_layout()
    return fig
