"""papermill_runs/smoke.yaml end to end: every notebook, real Horovod ranks, the summary."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chexlib.study import REPO, run_study

FIGURES = {
    "fig1_2_naive_vs_optimized.png", "fig3_raw_vs_records.png", "fig4_records_gain.png",
    "scaling_efficiency.png", "real_vs_synthetic.png", "pipeline_vs_limit.png",
    "simulated_utilization.png",
}  # fmt: skip


@pytest.mark.slow
def test_smoke_study_end_to_end_then_skips_everything(tmp_path):
    spec = REPO / "papermill_runs" / "smoke.yaml"
    first = run_study(spec, outputs=tmp_path, log=print)
    assert first.ok, first.failed
    summary = tmp_path / "smoke" / "summary"
    assert FIGURES <= {p.name for p in summary.glob("*.png")}
    assert (summary / "summary.html").stat().st_size > 10_000
    training = pd.read_csv(summary / "training.csv")
    assert len(training) == 4
    assert set(training["pipeline"]) == {"naive", "optimized"}
    assert set(training["input"]) == {"raw PNG", "compact-records"}
    assert training["images_per_sec"].gt(0).all()
    assert set(training["ranks"]) == {1, 2}
    metrics = json.loads((summary / "metrics.json").read_text())
    assert metrics["training_runs"] == 4 and "optimized over naive" in metrics["conclusions"]
    # Every training run checked its ranks ended with the same weights.
    for run_dir in (tmp_path / "smoke" / "train").iterdir():
        assert json.loads((run_dir / "metrics.json").read_text())["weights_in_sync"] is True

    again = run_study(spec, outputs=tmp_path, log=print)
    assert not again.ran and len(again.skipped) == len(first.ran)
