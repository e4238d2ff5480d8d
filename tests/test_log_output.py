"""Watching a run as it goes: ``chexlib study --log-output`` and ``LaunchConfig.log_output``.

The ranks are real (2 Horovod ranks: ``horovod.run`` processes, ipyparallel
engines, and horovodrun under a papermill kernel run by ``chexlib study``);
each line is stamped with the time it reached the parent, so "as it comes"
is checked, not only "in the end".
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest

from chexlib.launch import engines, horovodrun, launcher, rank_log
from chexlib.study import notebook
from chexlib.study.runner import SpecError, load_spec

# The ranks cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Stamped(io.TextIOBase):
    """A stdout stand-in: every line written, with the time it arrived."""

    def __init__(self):
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        self.lines.extend((time.monotonic(), line) for line in text.splitlines())
        return len(text)

    def first(self, text: str) -> float:
        return next(t for t, line in self.lines if line == text)


def _talk_then_sleep(seconds: float) -> int:
    """Each rank prints a line, waits, prints another (to stderr), and returns its rank."""
    import os
    import sys
    import time

    rank = int(os.environ["HOROVOD_RANK"])
    print(f"rank {rank} started")
    time.sleep(seconds)
    print(f"rank {rank} done", file=sys.stderr)
    return rank


def test_rank_log_shortens_prefixes_and_keeps_partial_lines_apart(tmp_path):
    out = Stamped()
    with rank_log.RankLog(tmp_path / "ranks.log", stream=out, header="unit") as log:
        log.write("[1]<stdout>:hal")
        other = threading.Thread(target=log.write, args=("[0]<stderr>:whole line\n",))
        other.start()
        other.join()
        log.write("f a line\nWed Jan  1 00:00:00 2025[12]<stdout>:stamped\r")
        log.write("tail without end")
    assert [line for _, line in out.lines] == [
        "[0] whole line",
        "[1] half a line",
        "[12] stamped",
        "tail without end",
    ]
    saved = (tmp_path / "ranks.log").read_text().splitlines()
    assert saved[0].startswith("# ") and saved[0].endswith(" unit")
    assert saved[1:] == ["[0] whole line", "[1] half a line", "[12] stamped", "tail without end"]


def test_log_output_is_a_notebook_parameter_and_the_spec_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEXLIB_LOG_OUTPUT", "1")  # the old variable: no longer read
    assert launcher.LaunchConfig().log_output is False
    assert launcher.LaunchConfig(log_output=True).to_dict()["log_output"] is True
    for name in ("04_distributed_training", "04b_interactive_horovod"):
        assert notebook.LOG_OUTPUT in notebook.declared_parameters(notebook.notebook_path(name))
    assert notebook.LOG_OUTPUT not in notebook.declared_parameters(
        notebook.notebook_path("01_data_prep")
    )
    spec = tmp_path / "s.yaml"
    spec.write_text("log_output: yes please\nstages: [{name: a, notebook: n}]\n")
    with pytest.raises(SpecError, match="log_output must be true or false, not str"):
        load_spec(spec)
    spec.write_text("log_output: true\nstages: [{name: a, notebook: n}]\n")
    assert load_spec(spec)["log_output"] is True


@pytest.mark.slow
def test_horovod_run_ranks_lines_reach_stdout_as_they_come(tmp_path):
    out = Stamped()
    with rank_log.RankLog(tmp_path / "ranks.log", stream=out) as log:
        results = horovodrun.run_function(_talk_then_sleep, args=(3.0,), np=2, timeout=120, log=log)
        returned = time.monotonic()
    assert results == [0, 1]
    for rank in (0, 1):
        started, done = (
            out.first(f"[{rank}] rank {rank} started"),
            out.first(f"[{rank}] rank {rank} done"),
        )
        assert done - started > 2.0 and returned - started > 2.0  # shown while the rank slept
    saved = (tmp_path / "ranks.log").read_text().splitlines()
    assert {"[0] rank 0 started", "[1] rank 1 started", "[1] rank 1 done"} <= set(saved)


# ipyparallel sends a function by reference to its module, which engines cannot
# import: the engines run this code with the built-in exec instead.
ENGINE_TALK = """
import os, sys, time
rank = os.environ["HOROVOD_RANK"]
print(f"engine rank {rank} started", flush=True)
time.sleep(3)
print(f"engine rank {rank} done", file=sys.stderr)
"""


@pytest.mark.slow
def test_ipyparallel_engines_lines_reach_stdout_as_they_come(tmp_path):
    out = Stamped()
    with (
        engines.HorovodCluster(n=2) as cluster,
        rank_log.RankLog(tmp_path / "r.log", stream=out) as log,
    ):
        assert cluster.run(exec, ENGINE_TALK, timeout=120, log=log) == {0: None, 1: None}
        returned = time.monotonic()
    for rank in (0, 1):
        assert returned - out.first(f"[{rank}] engine rank {rank} started") > 2.0
        assert f"[{rank}] engine rank {rank} done" in (tmp_path / "r.log").read_text()


@pytest.mark.slow
def test_study_log_output_streams_cells_and_horovodrun_ranks(synth_dir, tmp_path):
    """`chexlib study --log-output` on notebook 04 with 2 horovodrun ranks, read line by line."""
    spec = tmp_path / "watch.yaml"
    params = {
        "DATA_DIR": str(synth_dir), "MODEL": "tiny", "IMAGE_SIZE": 32, "BATCH_SIZE": 8,
        "EPOCHS": 2, "RANKS": 2, "LAUNCH": "horovodrun", "WARMUP_EPOCHS": 0,
        "TIMING_WARMUP_STEPS": 1, "TIMING_WINDOW_STEPS": 1, "SYNTHETIC_STEPS": 0,
        "EVALUATE": False, "LAUNCH_TIMEOUT": 240,
    }  # fmt: skip
    stage = {"name": "train", "notebook": "04_distributed_training", "parameters": params}
    spec.write_text(json.dumps({"name": "watch", "timeout": 300, "stages": [stage]}))  # no hang
    chexlib, out = Path(sys.executable).parent / "chexlib", tmp_path / "out"
    command = [str(chexlib), "study", str(spec), "--outputs", str(out), "--log-output", "--no-html"]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines = [(time.monotonic(), line.rstrip("\n")) for line in proc.stdout]
    assert proc.wait(timeout=60) == 0, "\n".join(line for _, line in lines[-30:])
    text = [line for _, line in lines]
    ranks = [(t, line) for t, line in lines if line.startswith("[0] ")]
    assert any("Epoch 2/2" in line for _, line in ranks), text[-30:]
    # streamed, not handed over at the end: rank 0's lines span its training
    assert ranks[-1][0] - ranks[0][0] > 1.0
    # the notebook's own cell output came too, after the ranks' lines
    wrote = next(t for t, line in lines if line.startswith("wrote ") and "params.json" in line)
    assert wrote > ranks[-1][0]
    (run_dir,) = (out / "watch" / "train").iterdir()
    saved = (run_dir / "run" / launcher.RANK_LOG).read_text().splitlines()
    assert saved[0].startswith("# ") and "horovodrun, 2 rank(s)" in saved[0]
    assert [line for _, line in ranks] == [line for line in saved if line.startswith("[0] ")]
    assert json.loads((run_dir / "params.json").read_text())["launch"]["log_output"] is True
