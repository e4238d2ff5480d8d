"""notebooks/04b_interactive_horovod.ipynb under papermill: 2 ipyparallel engines, one Horovod job.

The engines are found afterwards by a marker in their environment (they inherit
the kernel's, which inherits this process's), so a run that leaves an engine,
its nanny or the controller behind fails, also when a cell of the notebook fails.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid

import pandas as pd
import papermill as pm
import psutil
import pytest

from chexlib.study.notebook import run_notebook
from chexlib.train.recipe import FAULT_ENV

MARKER = "CHEXLIB_TEST_04B"


def tiny_parameters(data_dir, out) -> dict:
    return {
        "DATA_DIR": str(data_dir),
        "OUTPUT_DIR": str(out),
        "ENGINES": 2,
        "MODEL": "tiny",
        "IMAGE_SIZE": 32,
        "BATCH_SIZE": 8,
        "EPOCHS": 2,
    }


def marked_processes(marker: str) -> list[psutil.Process]:
    """Live processes (not this one) whose environment holds ``MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(MARKER) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def assert_all_stopped(marker: str, wait: float = 20.0) -> None:
    end = time.monotonic() + wait  # engines and nannies exit within moments of the stop
    while (left := marked_processes(marker)) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline()[:4]) for p in left]


@pytest.fixture
def marker(monkeypatch):
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    return value


def test_rank_table_one_row_per_rank():
    from test_run_record import train_metrics

    from chexlib.core.run_record import RunRecord
    from chexlib.launch.interactive import rank_table

    shared = {
        **train_metrics(),
        "ranks": 2,
        "history": [{"loss": 0.7}, {"loss": 0.5, "val_loss": 0.6}],
        "throughput": {"per_rank": [{"median": 10.0}, {"median": 12.0}]},
        "images_per_sec": 22.0,
        "test_loss": None,
        "weights_sha256_per_rank": ["ab" * 32, "ab" * 32],
        "weights_in_sync": True,
    }
    by_rank = {rank: RunRecord.from_dict({**shared, "rank": rank}) for rank in (1, 0)}
    table = rank_table(by_rank)
    assert table["rank"].tolist() == [0, 1] and table["loss"].tolist() == [0.5, 0.5]
    assert table["images_per_sec_rank"].tolist() == [10.0, 12.0]
    assert table["weights_sha256"].tolist() == ["ab" * 6] * 2 and table["test_loss"].isna().all()


@pytest.mark.slow
def test_two_engines_train_as_one_job_and_stop(synth_dir, tmp_path, marker):
    out = tmp_path / "nb04b"
    run_notebook("04b_interactive_horovod", out / "04b.ipynb", tiny_parameters(synth_dir, out))
    table = pd.read_csv(out / "ranks.csv")
    assert table["rank"].tolist() == [0, 1] and (table["ranks"] == 2).all()
    assert all(math.isfinite(x) for x in table["loss"]) and table["loss"].nunique() == 1
    assert (table["images_per_sec_rank"] > 0).all()
    assert table["weights_in_sync"].all() and table["weights_sha256"].nunique() == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ranks"] == 2 and len(metrics["rank_table"]) == 2
    assert (out / "run" / "metrics.json").is_file()  # rank 0 wrote the training run
    assert_all_stopped(marker)


@pytest.mark.slow
def test_a_failing_px_cell_stops_the_engines(synth_dir, tmp_path, marker, monkeypatch):
    """Rank 1 dies mid-epoch: the %%px cell fails on rank 0 too, and the engines are stopped."""
    monkeypatch.setenv(FAULT_ENV, "rank=1,epoch=0,step=2")  # inherited by the engines
    out = tmp_path / "nb04b"
    with pytest.raises(pm.PapermillExecutionError):
        run_notebook("04b_interactive_horovod", out / "04b.ipynb", tiny_parameters(synth_dir, out))
    executed = json.loads((out / "04b.ipynb").read_text())
    failed = next(
        c
        for c in executed["cells"]
        if any(o["output_type"] == "error" for o in c.get("outputs", []))
    )
    assert "train(config)" in "".join(failed["source"])
    stderr = "".join("".join(o.get("text", "")) for o in failed["outputs"])
    assert "a cell failed, so the Horovod engines are stopped" in stderr
    assert not (out / "ranks.csv").exists()
    assert_all_stopped(marker)
