"""The study's summary figures, each defined once: its file, its caption and how it
is drawn from the summary's tables.

Notebook 05 draws them (:func:`save_figure`), ``chexlib publish-results``
copies and captions them, and the tests check the study wrote them, all from
:data:`SUMMARY_FIGURES`, in reading order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chexlib.report import (
    allreduce_plots,
    bench_plots,
    cluster_scaling_plots,
    feeding,
    gradcam_plots,
    summary,
    summary_plots,
)

DPI = 120


@dataclass(frozen=True)
class SummaryFigure:
    """One figure of the summary.

    Attributes:
        file: its PNG's name in the summary folder (and in ``docs/results``).
        caption: what the README and the docs write under it.
        table: the table of :func:`chexlib.report.summary.load_study` it draws;
            an empty table means the study did not measure it, and the figure
            is skipped.
        draw: ``tables -> matplotlib Figure``, or None when there is nothing to draw.
    """

    file: str
    caption: str
    table: str
    draw: Callable


def _raw_ms(tables: dict):
    return summary.cpu_ms(tables, "raw PNG")


SUMMARY_FIGURES: tuple[SummaryFigure, ...] = (
    SummaryFigure(
        "fig1_2_naive_vs_optimized.png",
        "Poster figures 1-2: naive vs optimized pipeline, end-to-end training",
        "train",
        lambda t: summary_plots.plot_pipelines(t["train"], t["hardware"], _raw_ms(t)),
    ),
    SummaryFigure(
        "fig3_raw_vs_records.png",
        "Poster figure 3: raw PNG vs TFRecords (both variants), end-to-end training",
        "train",
        lambda t: summary_plots.plot_sources(t["train"], t["hardware"], _raw_ms(t)),
    ),
    SummaryFigure(
        "fig4_records_gain.png",
        "Poster figure 4: % gain of records over raw PNG, with the run-to-run noise",
        "gain",
        lambda t: summary_plots.plot_records_gain(t["gain"], t["hardware"]),
    ),
    SummaryFigure(
        "scaling_efficiency.png",
        "Scaling with Horovod ranks, each rank on its own cores (the poster's, theirs, marked)",
        "train",
        lambda t: summary_plots.plot_scaling(t["train"], t["hardware"]),
    ),
    SummaryFigure(
        "cluster_scaling.png",
        "Weak scaling across 2 nodes (LOCAL EMULATION): Horovod against two independent jobs "
        "and one node alone, per link rate",
        "cluster_scaling",
        lambda t: cluster_scaling_plots.plot_cluster_scaling(t["cluster_scaling"], t["hardware"]),
    ),
    SummaryFigure(
        "real_vs_synthetic.png",
        "Real data against the synthetic-data ceiling, measured in the same run",
        "train",
        lambda t: summary_plots.plot_ceiling(t["train"], t["hardware"]),
    ),
    SummaryFigure(
        "feeding_projection.png",
        "PROJECTION: CPU cores one GPU needs to be fed, per input",
        "feeding",
        lambda t: feeding.plot_projection(t["feeding"], t["hardware"]),
    ),
    SummaryFigure(
        "scaling_projection.png",
        "PROJECTION: ring-allreduce model of the poster's scaling beside its measured efficiency",
        "scaling_projection",
        lambda t: allreduce_plots.plot_projection(t["scaling_projection"], t["hardware"]),
    ),
    SummaryFigure(
        "pipeline_vs_limit.png",
        "Pipeline alone against the CPU limit",
        "throughput",
        lambda t: bench_plots.plot_throughput(t["throughput"], hardware=t["hardware"]),
    ),
    SummaryFigure(
        "simulated_utilization.png",
        "SIMULATED accelerator utilization, naive vs optimized",
        "utilization",
        lambda t: bench_plots.plot_utilization(
            t["utilization"], t["throughput"], hardware=t["hardware"]
        ),
    ),
    SummaryFigure(
        "gradcam_overlays.png",
        "Grad-CAM: where the trained model looks, its top finding per test image",
        "localization",
        lambda t: gradcam_plots.plot_overlays(
            gradcam_plots.overlay_table(t["records"]), t["hardware"]
        ),
    ),
)
BY_FILE = {figure.file: figure for figure in SUMMARY_FIGURES}


def save_figure(file: str, tables: dict, out_dir) -> Path | None:
    """Draw the summary figure ``file`` from ``tables`` into ``out_dir``; None (and
    nothing written) when the study did not measure what it shows."""
    figure = BY_FILE[file]
    if len(tables.get(figure.table, ())) == 0:  # a table, or a list (localization)
        return None
    drawn = figure.draw(tables)
    if drawn is None:  # measured, but what it shows was not kept (no overlay files)
        return None
    path = Path(out_dir) / figure.file
    drawn.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
