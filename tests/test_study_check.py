"""The README's real-data command, `make study SPEC=... DATA=...`, on a dataset in the NIH layout.

papermill_runs/check.yaml is the paper's path in miniature on the user's data
(GENERATE false: nothing is generated); here the "user's data" is a generated
set in its own folder, and the test checks the study read THAT folder.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from chexlib.synth.generate import generate

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_make_study_with_data_reads_the_given_folder(tmp_path):
    data = tmp_path / "my nih download"  # a space: the Makefile must quote it
    generate(data, n_images=48, size=96, seed=3, workers=1, progress=False)
    outputs = tmp_path / "out"
    done = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "study",
            "SPEC=papermill_runs/check.yaml",
            f"DATA={data}",
            f"STUDY_ARGS=--outputs '{outputs}' --no-html",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "study check: 4 ran, 0 skipped, 0 failed" in done.stdout, done.stdout[-2000:]
    data_runs = list((outputs / "check" / "data").glob("*/params.json"))
    assert len(data_runs) == 1
    params = json.loads(data_runs[0].read_text())
    assert Path(params["data_dir"]) == data and params["generate"] is False
    train = list((outputs / "check" / "train").glob("*/metrics.json"))
    assert len(train) == 1 and json.loads(train[0].read_text())["images_per_sec"] > 0
    assert (outputs / "check" / "summary" / "verdicts.json").exists()
