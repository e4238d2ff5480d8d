"""papermill_runs/smoke.yaml end to end: every notebook, real Horovod ranks, the summary."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from chexlib.report.figures import SUMMARY_FIGURES
from chexlib.study.notebook import REPO
from chexlib.study.runner import run_study

# the smoke study draws every one but the cross-node figure (it needs the local cluster)
FIGURES = {figure.file for figure in SUMMARY_FIGURES if figure.table != "cluster_scaling"}
CLAIMS = [
    "pipeline",
    "records",
    "png-records",
    "scaling",
    "ceiling",
    "learning",
    "localization",
    "feeding",
    "cross-node",
    "allreduce-model",
    "scaling-projection",
]


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
    verdicts = json.loads((summary / "verdicts.json").read_text())
    assert [c["id"] for c in verdicts["claims"]] == CLAIMS
    assert "CPU cores" in verdicts["hardware"] or "GPU" in verdicts["hardware"]
    # the conclusions are written from the verdicts
    assert metrics["training_runs"] == 4 and metrics["verdicts"] == verdicts
    assert all(
        f"**{c['id']}: {c['verdict']}**" in metrics["conclusions"] for c in verdicts["claims"]
    )
    pipeline = verdicts["claims"][0]
    assert pipeline["measured"] > 0 and len(pipeline["runs"]) == 2
    # the pinned 2-rank run: each rank on its own single core
    pinned = [
        json.loads((d / "metrics.json").read_text())
        for d in (tmp_path / "smoke" / "train").iterdir()
    ]
    cores = [m["cores_per_rank"] for m in pinned if m["pin_cores"] == 1]
    assert len(cores) == 1 and all(len(c) == 1 for c in cores[0]) and cores[0][0] != cores[0][1]
    # Every training run checked its ranks ended with the same weights.
    for run_dir in (tmp_path / "smoke" / "train").iterdir():
        assert json.loads((run_dir / "metrics.json").read_text())["weights_in_sync"] is True

    again = run_study(spec, outputs=tmp_path, log=print)
    assert not again.ran and len(again.skipped) == len(first.ran)
