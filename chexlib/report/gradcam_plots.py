"""The Grad-CAM overlays of a study's explain run, as one figure of the results block.

``chexlib explain`` (notebook 06) writes ``heatmaps.csv`` (image, finding,
probability, rank, boxed, overlay) and one overlay PNG per row beside its run
record; this module finds them from the study's records and tiles the overlays,
images with a finding box first, under one legend for the heat scale, the box
and the peak mark. Reporting layer: pandas, PIL and matplotlib only, never
TensorFlow: the overlays are read, not computed.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from chexlib.report.style import NEUTRAL_COLOR, finish, new_figure

HEATMAPS_CSV = "heatmaps.csv"  # as chexlib.explain.gradcam.HEATMAPS_CSV writes it
BOX_COLOR = "#00ff00"  # the overlays' box outline (chexlib.explain.gradcam.overlay)


def run_overlays(run_dir, top: int = 8, model: str = "") -> pd.DataFrame:
    """Up to ``top`` overlays an explain run wrote into ``run_dir``, each image's top
    finding, boxed images first, then by probability; ``path``: each PNG's full path.
    Empty when the folder holds no ``heatmaps.csv``."""
    csv = Path(run_dir) / HEATMAPS_CSV
    if not csv.is_file():
        return pd.DataFrame()
    table = pd.read_csv(csv)
    table["path"] = [str(Path(run_dir) / p) for p in table["overlay"]]
    table = table[[Path(p).is_file() for p in table["path"]]]
    table = table[table["rank"] == 1] if "rank" in table else table
    table = table.sort_values(["boxed", "probability"], ascending=False).head(top)
    return table.assign(model=model)


def overlay_table(records: list[dict], top: int = 8) -> pd.DataFrame:
    """:func:`run_overlays` of the newest explain run among ``records`` (``collect_runs``
    shape) that left its overlays; empty when none did."""
    runs = [r for r in records if "hit_rate" in r["metrics"] and r.get("run_dir")]
    for rec in sorted(runs, key=lambda r: Path(r["run_dir"]).stat().st_mtime, reverse=True):
        table = run_overlays(rec["run_dir"], top, rec["metrics"].get("model") or "")
        if not table.empty:
            return table
    return pd.DataFrame()


def plot_overlays(table: pd.DataFrame, hardware: str = "", columns: int = 4):
    """The overlays of :func:`overlay_table` in a grid, each titled with its image, finding
    and probability; None when there are none."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from PIL import Image

    if table.empty:
        return None
    columns = min(columns, len(table))
    rows = -(-len(table) // columns)
    fig, axes = new_figure(2.6 * columns + 2.8, 2.9 * rows + 1.2, columns, rows=rows)
    for ax in axes:
        ax.axis("off")
    for ax, row in zip(axes, table.itertuples(), strict=False):
        with Image.open(row.path) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(f"{row.image}\n{row.finding} p={row.probability:.2f}", fontsize=8)
    legend = [
        (Patch(facecolor="none", edgecolor=BOX_COLOR, lw=2), "the finding's box (the dataset's BBox_List_2017.csv)"),
        (Line2D([], [], marker="+", color=NEUTRAL_COLOR, mew=2, ms=9, ls=""),
         "peak of the heatmap (white cross)"),
    ]  # fmt: skip
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap="jet"), ax=axes, shrink=0.5, pad=0.02)
    bar.set_label("Grad-CAM heat (0: none, 1: the map's maximum)", fontsize=8)
    model = table["model"].iloc[0] if "model" in table else ""
    return finish(
        fig,
        axes,
        f"Grad-CAM: where the trained {model} looks, its top finding per image ({hardware})",
        "Overlays written by chexlib explain (notebook 06); the heatmap of each image's "
        "most probable finding over the model's input.",
        legend,
    )
