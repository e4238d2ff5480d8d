"""chexlib.summary on hand-made run records: the tidy table, shared ceilings, gains, conclusions."""

from __future__ import annotations

import pytest

from chexlib import summary


def record(run_id, pipeline, ranks, rate, synthetic=None, source="raw", records="", paired=False):
    metrics = {
        "model": "resnet50", "pipeline": pipeline, "source": source, "ranks": ranks,
        "images_per_sec": rate, "images_per_sec_per_rank": rate / ranks,
        "synthetic_images_per_sec": synthetic,
        "fraction_of_synthetic": rate / synthetic if synthetic else None,
        "image_size": 128, "batch_size_per_rank": 8, "mean_auroc": 0.6,
        "environment": {"hardware": "CPU only: 2x test"},
        "paired_synthetic": [{"pairs": 3}] if paired else None,
    }  # fmt: skip
    return {"run_id": run_id, "metrics": metrics, "params": {"train": {"records": records}}}


def test_training_table_shares_the_synthetic_ceiling_and_computes_efficiency():
    table = summary.training_table(
        [
            record("a", "naive", 1, 8.0, synthetic=10.0, paired=True),
            record("b", "optimized", 1, 9.0),
            record("c", "optimized", 2, 12.0, synthetic=16.0),
            record("d", "naive", 2, 10.0),
        ]
    )
    row = table.set_index("run_id")
    assert row.loc["b", "synthetic_images_per_sec"] == 10.0 and row.loc["b", "synthetic_shared"]
    assert row.loc["b", "fraction_of_synthetic"] == pytest.approx(0.9)
    assert row.loc["d", "fraction_of_synthetic"] == pytest.approx(10.0 / 16.0)
    assert not row.loc["a", "synthetic_shared"]
    assert row.loc["c", "scaling_efficiency"] == pytest.approx(12.0 / (2 * 9.0))
    assert row.loc["d", "scaling_efficiency"] == pytest.approx(10.0 / (2 * 8.0))
    text = summary.conclusions({"train": table, "gain": summary.records_gain(table)})
    assert "optimized over naive pipeline: 1.16x" in text  # median of 9/8 and 12/10
    assert "CPU only: 2x test" in text
    assert "Measured paired (real and synthetic windows alternating in one run): " \
        "real = median 80% of synthetic (range 80%-80%, 1 runs)" in text  # fmt: skip
    assert table.set_index("run_id")["synthetic_paired"].to_dict() == {
        "a": True, "b": False, "c": False, "d": False,
    }  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    fig = summary.plot_ceiling(table)
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "paired: ceiling from alternating windows" in caption
    assert "1 paired" in caption and "2 shared" in caption and "1 separate run" in caption
