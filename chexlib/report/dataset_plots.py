"""Figures of the dataset itself (the data-prep notebook), by :mod:`chexlib.report.style`'s rules."""

from __future__ import annotations

import pandas as pd

from chexlib.data.metadata import LABELS
from chexlib.data.png import read_grayscale
from chexlib.report.style import OURS_COLOR, THEIRS_COLOR, finish, new_figure, wrap


def plot_prevalence(table: pd.DataFrame):
    """Bar chart of label prevalence, ours beside NIH's (theirs, black), from
    ``metadata.prevalence_table``."""
    import numpy as np

    labels = list(dict.fromkeys(table["label"]))
    sources = list(dict.fromkeys(table["source"]))
    fig, (ax,) = new_figure(12, 4.6)
    width = 0.8 / max(1, len(sources))
    for k, source in enumerate(sources):
        part = table[table["source"] == source].set_index("label").reindex(labels)
        theirs = source != "this dataset"
        pos = np.arange(len(labels)) + (k - (len(sources) - 1) / 2) * width
        ax.bar(pos, part["prevalence"], width, color=THEIRS_COLOR if theirs else OURS_COLOR,
               label=f"{source} (theirs)" if theirs else source)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels, rotation=90,
                  fontsize=8)  # fmt: skip
    ax.set_ylim(bottom=0)
    ax.set_ylabel("fraction of images")
    return finish(fig, [ax], "Label prevalence: generated set vs NIH ChestX-ray14")


def plot_samples(df: pd.DataFrame, n: int = 8, seed: int = 0, columns: int = 4):
    """A grid of ``n`` images (with at least one finding where possible) and their labels."""
    import matplotlib.pyplot as plt

    sick = df[df[list(LABELS)].sum(axis=1) > 0]
    pool = sick if len(sick) >= n else df
    picks = pool.sample(n=min(n, len(pool)), random_state=seed)
    rows = -(-len(picks) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(3 * columns, 3.4 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, row) in zip(axes.flat, picks.iterrows(), strict=False):
        ax.imshow(read_grayscale(row["path"]), cmap="gray")
        findings = [label for label in LABELS if row[label]] or ["No Finding"]
        ax.set_title(wrap(f"{row['image']}\n" + ", ".join(findings), fig, 8, 1 / columns),
                     fontsize=8)  # fmt: skip
    return fig
