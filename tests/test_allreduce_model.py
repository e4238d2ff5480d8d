"""The ring-allreduce cost model: its closed form, the projection for the poster's
hardware, the check against a measured 2-host overhead (fixture run records), and the
figure (labelled PROJECTION, every mark in its legend, registered with the summary's)."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
from test_summary import training_record

from chexlib.core.reference import POSTER_EFFICIENCY, POSTER_THROUGHPUT
from chexlib.report import allreduce_model as model
from chexlib.report import allreduce_plots, figures, summary

matplotlib.use("Agg")

DENSENET_PARAMS = 6_968_206  # counted with tf.keras: DenseNet121 notop + Dense(14), trainable


@pytest.mark.parametrize(("ranks", "latency", "seconds"), [
    (1, 1e-3, 0.0),  # nothing to reduce
    (2, 0.0, 1.0),  # 2(p-1)/p = 1: each rank sends and receives G once
    (4, 0.0, 1.5),
    (4, 1e-3, 1.5 + 6e-3),  # + 2(p-1) ring steps of latency
    (512, 0.0, 2 * 511 / 512),
])  # fmt: skip
def test_ring_allreduce_closed_form(ranks, latency, seconds):
    # 1 GB of gradients over 8 Gbit/s = 1 GB/s
    assert model.ring_allreduce_seconds(1e9, ranks, 8.0, latency) == pytest.approx(seconds)


def test_gradient_bytes_from_the_parameter_count():
    assert model.gradient_bytes("densenet121") == DENSENET_PARAMS * 4
    assert model.gradient_bytes("densenet121", "float16") == DENSENET_PARAMS * 2
    assert model.gradient_bytes("resnet50") == pytest.approx(23.56e6 * 4, rel=1e-3)
    assert model.gradient_bytes("standin", params=99_486) == 99_486 * 4
    with pytest.raises(ValueError, match="no parameter count for model 'standin'"):
        model.gradient_bytes("standin")
    with pytest.raises(ValueError, match="bfloat8"):
        model.gradient_bytes("densenet121", "bfloat8")
    assert model.efficiency(3.0, 1.0) == 0.75


def test_the_projection_of_the_poster_case_is_the_closed_form():
    table = model.projection()
    assert set(table["ranks"]) == {*range(1, 17), 64, 512}
    rows = model.case(table, *model.POSTER_CASE).set_index("ranks")
    compute = 64 / POSTER_THROUGHPUT[1]  # the poster's batch per GPU at its 1-GPU rate
    comm = 2 * 15 / 16 * DENSENET_PARAMS * 4 / (100e9 / 8) + 2 * 15 * model.LATENCY_S
    assert rows.loc[16, "compute_ms"] == pytest.approx(1e3 * compute)
    assert rows.loc[16, "allreduce_ms"] == pytest.approx(1e3 * comm)
    assert rows.loc[16, "efficiency"] == pytest.approx(compute / (compute + comm))
    assert rows.loc[1, "efficiency"] == 1.0
    low, high = rows.loc[16, ["efficiency_low", "efficiency_high"]]
    assert low == pytest.approx(compute / (compute + 1.25 * comm))
    assert low < rows.loc[16, "efficiency"] < high
    # fp16 gradients halve the bandwidth term
    half = model.case(table, "densenet121", "FP32", "float16").set_index("ranks")
    assert half.loc[16, "allreduce_ms"] == pytest.approx(
        1e3 * (comm / 2 + 2 * 15 * model.LATENCY_S / 2)
    )
    # the poster's measured efficiency, theirs, as they state it
    theirs = model.poster_efficiency().set_index("ranks")["efficiency"]
    for gpus, stated in POSTER_EFFICIENCY.items():
        assert theirs[gpus] == pytest.approx(stated, abs=5e-4)


def _run(ranks, step_seconds, model_name="densenet121", batch=8, **extra):
    """A training run's record (metrics.json) whose steps take ``step_seconds``."""
    rate = batch / step_seconds
    rec = training_record(model=model_name, ranks=ranks, batch_size_per_rank=batch,
                          images_per_sec=rate * ranks, images_per_sec_per_rank=rate).to_dict()  # fmt: skip
    return {**rec, "run_id": f"np{ranks}", **extra}


# a measured 2-host overhead at 1 Gbit/s: the model's DenseNet121 allreduce (0.223 s) plus
# 15 % (fixture numbers, shaped as the cluster study's records will be)
MEASURED_1GBIT = 1.15 * model.ring_allreduce_seconds(DENSENET_PARAMS * 4, 2, 1.0)


@pytest.mark.parametrize("as_table_rows", [False, True], ids=["records", "table-rows"])
def test_the_model_predicts_a_measured_two_host_overhead_within_25_percent(as_table_rows):
    alone = _run(1, 0.6)
    together = _run(2, 0.6 + MEASURED_1GBIT, hosts=["node1", "node2"])
    if as_table_rows:  # rows of the summary's training table: numpy numbers
        rows = summary.training_table([
            {"run_id": r["run_id"], "metrics": {k: v for k, v in r.items()
                                                if k not in ("run_id", "hosts")}, "params": {}}
            for r in (alone, together)
        ])  # fmt: skip
        alone, together = (rows[rows["ranks"] == n].iloc[0] for n in (1, 2))
    check = model.check_overhead(alone, together, gbit_per_s=1.0)
    assert check["measured_ms"] == pytest.approx(1e3 * MEASURED_1GBIT)
    assert check["relative_error"] == pytest.approx(1 / 1.15 - 1)
    assert check["within"]
    # the same measurement read with a wrong link rate is not explained
    for wrong in (10.0, 0.5):
        assert not model.check_overhead(alone, together, gbit_per_s=wrong)["within"]


def test_the_check_refuses_runs_that_do_not_measure_a_two_host_overhead():
    alone = _run(1, 0.6)
    with pytest.raises(ValueError, match="run np2: its 2 ranks ran on hosts"):
        model.check_overhead(alone, _run(2, 0.8, hosts=["node1", "node1"]), 1.0)
    with pytest.raises(ValueError, match="need a 1-rank and a 2-rank run, not 1 and 4"):
        model.check_overhead(alone, _run(4, 0.8), 1.0)
    with pytest.raises(ValueError, match="model 'resnet50' differs"):
        model.check_overhead(alone, _run(2, 0.8, model_name="resnet50"), 1.0)
    with pytest.raises(ValueError, match="images_per_sec_per_rank None"):
        model.check_overhead(alone, {**_run(2, 0.8), "images_per_sec_per_rank": None}, 1.0)


def _marks(ax):
    """Every drawn mark of the axes: lines, filled areas, spans."""
    return [*ax.lines, *ax.collections, *ax.patches]


def test_the_figure_is_a_labelled_projection_with_every_mark_in_its_legend():
    fig = allreduce_plots.plot_projection(model.projection(), "2 CPU cores, no GPU")
    ax = fig.axes[0]
    assert fig._suptitle.get_text().startswith("PROJECTION")
    legend = " ".join(t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts())
    marks = _marks(ax)
    assert len(marks) >= len(allreduce_plots.LINES) + 4  # + band, span, theirs, threshold
    for mark in marks:
        label = mark.get_label()
        assert not label.startswith("_"), f"{mark} has no label"
        assert label in legend, label
    assert "(theirs)" in legend and "verdict threshold" in legend
    assert ax.get_ylim()[0] == 0  # efficiency from zero
    matplotlib.pyplot.close(fig)


def test_the_projection_is_a_summary_figure_drawn_from_the_summarys_tables(tmp_path):
    tables = summary.load_study("")  # no runs: the projection needs published numbers only
    assert not tables["scaling_projection"].empty
    path = figures.save_figure("scaling_projection.png", tables, tmp_path)
    assert path == tmp_path / "scaling_projection.png" and path.stat().st_size > 10_000
    assert figures.BY_FILE["scaling_projection.png"].caption.startswith("PROJECTION")
    assert isinstance(tables["scaling_projection"], pd.DataFrame)
