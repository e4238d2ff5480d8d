"""notebooks/01_data_prep.ipynb under papermill with tiny parameters."""

from __future__ import annotations

import json

import pytest

from chexlib.study.notebook import run_notebook


@pytest.mark.slow
def test_data_prep_notebook_generates_validates_and_records(tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "run"
    params = {
        "DATA_DIR": str(data_dir),
        "OUTPUT_DIR": str(out),
        "N_IMAGES": 40,
        "IMAGE_SIZE": 64,
        "SEED": 1,
        "WORKERS": 2,
    }
    run_notebook("01_data_prep", out / "01_data_prep.ipynb", params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 40
    assert metrics["validation"]["passed"] and metrics["validation"]["ok"] == 40
    assert metrics["patients_in_two_splits"] == 0
    assert sum(metrics["split_images"].values()) == 40
    assert (out / "prevalence.png").stat().st_size > 0 and (out / "samples.png").stat().st_size > 0
    assert json.loads((out / "params.json").read_text())["n_images"] == 40
