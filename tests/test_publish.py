"""chexlib publish-results: figures copied, the README block rewritten, nothing else touched."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from chexlib import publish
from chexlib.results import write_json, write_run_record

README = f"""# project

intro stays

{publish.BEGIN}
old results
{publish.END}

## after stays
"""


@pytest.fixture()
def summary_dir(tmp_path):
    out = tmp_path / "outputs" / "demo" / "summary"
    out.mkdir(parents=True)
    (out / "fig1_2_naive_vs_optimized.png").write_bytes(b"\x89PNG fake figure")
    pd.DataFrame(
        [
            {
                "model": "resnet50",
                "input": "raw PNG",
                "pipeline": p,
                "ranks": r,
                "images_per_sec": v,
            }
            for p, r, v in [("naive", 1, 10.0), ("optimized", 1, 20.0), ("optimized", 2, 30.5)]
        ]
    ).to_csv(out / "training.csv", index=False)
    conclusions = "- Training, optimized over naive pipeline: 2.00x."
    write_run_record(
        out,
        {"study_dir": "outputs/demo"},
        {
            "runs": 3,
            "training_runs": 3,
            "conclusions": conclusions,
            "environment": {"hardware": "CPU only: 2x test"},
        },
    )
    return out


def test_block_is_rewritten_and_figures_copied(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    (docs / "stale.png").write_bytes(b"from an older study")
    files = publish.publish(summary_dir, readme, docs)

    text = readme.read_text()
    assert "old results" not in text and "intro stays" in text and "## after stays" in text
    assert "optimized over naive pipeline: 2.00x" in text
    assert "| resnet50 | raw PNG | optimized | 20.0 | 30.5 |" in text
    assert "![Poster figures 1-2" in text and "(docs/results/fig1_2_naive_vs_optimized.png)" in text
    assert "CPU only: 2x test" in text
    assert (docs / "fig1_2_naive_vs_optimized.png").read_bytes() == b"\x89PNG fake figure"
    assert not (docs / "stale.png").exists()
    assert readme in files

    publish.publish(summary_dir, readme, docs)  # idempotent: same block, once
    assert readme.read_text() == text


def test_block_states_how_long_the_runs_took(tmp_path, summary_dir):
    study = summary_dir.parent
    runs = [("train/a", "complete", 120), ("train/b", "complete", 60), ("train/c", "failed", 9)]
    for i, (name, status, seconds) in enumerate([*runs, ("summary", "complete", 18)]):
        marker = study / name / "run.json"
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"stage": name.split("/")[0], "status": status, "seconds": seconds})
        os.utime(marker, (1000 + i, 1000 + i))  # the order runs finished in
    block = publish.results_block(summary_dir, tmp_path / "docs", tmp_path)
    assert (
        "- Time of the study's runs on this machine: 3.3 min in all "
        "(train 3.0 for 2 runs, summary 0.3; minutes" in block
    )


def test_missing_markers_or_summary_is_a_clear_error(tmp_path, summary_dir):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(publish.PublishError, match="needs exactly one"):
        publish.publish(summary_dir, readme, tmp_path / "docs")
    readme.write_text(README)
    with pytest.raises(publish.PublishError, match="run the study's summary stage first"):
        publish.publish(tmp_path / "nowhere", readme, tmp_path / "docs")
    assert "old results" in readme.read_text()  # untouched after an error
