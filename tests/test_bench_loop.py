"""``chexlib bench-loop`` (chexlib's training loop against a plain Keras fit) and the
one-rank Horovod settings it checks.

The speed itself is measured by ``make bench-train`` on a quiet machine, not
here: these tests check that the benchmark alternates its sides, computes its
ratios from what each process measured, names a failing process's log, and
that the precision comparison says when it cannot run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chexlib.bench import loop
from chexlib.report.benchmarks import train_report
from chexlib.train import process

CHEXLIB = str(Path(sys.executable).with_name("chexlib"))
TINY = ["--model", "standin", "--image-size", "32", "--batch-size", "4", "--warmup-steps", "2",
        "--window-steps", "3", "--windows", "2", "--verbose", "0"]  # fmt: skip


def test_alternates_sides_and_divides_neighbours(tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [CHEXLIB, "bench-loop", "--rounds", "2", "--out", str(out), *TINY],
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "loop.json").read_text())
    assert (record["a"], record["b"]) == ("plain Keras fit", "chexlib train")
    assert len(record["rounds"]) == 2
    for row in record["rounds"]:
        assert row["a"] > 0 and row["b"] > 0
        assert row["ratio"] == pytest.approx(row["b"] / row["a"])
    ratios = sorted(row["ratio"] for row in record["rounds"])
    assert record["ratio_median"] == pytest.approx(sum(ratios) / 2)
    assert record["meets_target"] == (record["ratio_median"] >= 0.99)
    # the order flips each round (A B, then B A): the log files were written in that order
    logs = [out / "loop" / f"round{r}-{s}.log" for r, s in ((0, "a"), (0, "b"), (1, "b"), (1, "a"))]
    times = [p.stat().st_mtime_ns for p in logs]
    assert times == sorted(times), "rounds did not alternate A B, B A"
    # each side is what it says: the plain fit never starts Horovod, chexlib train does
    assert "chexlib.bench.plain_fit" in logs[0].read_text()
    assert "chexlib train" in done.stdout and "target >= 0.99" in done.stdout
    assert "chexlib train: float32 compute" in logs[1].read_text()
    # make bench-train's closing report shows it first, with its verdict
    report = train_report(out, [])
    assert report.startswith("chexlib train / plain Keras fit") and "target >= 0.99" in report


def test_a_failing_side_is_named(tmp_path):
    bad = [*TINY]
    bad[bad.index("standin")] = "no-such-model"
    done = subprocess.run(
        [CHEXLIB, "bench-loop", "--rounds", "1", "--out", str(tmp_path), *bad],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "round0-a.log" in lines[0], done.stderr[-2000:]
    assert "no-such-model" in (tmp_path / "loop" / "round0-a.log").read_text()


def test_precision_comparison_only_where_auto_is_not_float32(monkeypatch):
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx2", "avx512f"})
    reason = loop.not_testable("precision")
    assert reason and "float32" in reason and "avx512_bf16" in reason
    monkeypatch.setattr(loop, "cpu_flags", lambda: {"avx512f", "avx512_bf16"})
    assert loop.not_testable("precision") is None
    assert loop.not_testable("loop") is None


@pytest.mark.parametrize(
    ("env", "quieted"),
    [
        ({}, True),  # a lone process: a job of one rank
        ({"HOROVOD_SIZE": "1"}, True),  # horovodrun -np 1
        ({"HOROVOD_SIZE": "2"}, False),
        ({"OMPI_COMM_WORLD_SIZE": "4"}, False),
        ({"PMI_SIZE": "8"}, False),
        ({"PMIX_RANK": "0"}, False),  # size unknown: leave Horovod's default
        ({"HOROVOD_CYCLE_TIME": "3"}, False),  # the user's value wins
    ],
)
def test_one_rank_jobs_slow_horovods_idle_cycle(monkeypatch, env, quieted):
    for name in (*process.LAUNCHER_SIZE_ENV, "PMIX_RANK", "HOROVOD_CYCLE_TIME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    process.quiet_single_rank_env()
    expected = process.SINGLE_RANK_CYCLE_MS if quieted else env.get("HOROVOD_CYCLE_TIME")
    assert os.environ.get("HOROVOD_CYCLE_TIME") == expected
    process.after_horovod_init()  # jobs launched next get Horovod's defaults back
    assert os.environ.get("HOROVOD_CYCLE_TIME") == env.get("HOROVOD_CYCLE_TIME")
