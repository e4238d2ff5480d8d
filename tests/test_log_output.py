"""Watching a run as it goes: ``chexlib study --log-output`` and ``LaunchConfig.log_output``.

The ranks are real (2 Horovod ranks: ``horovod.run`` processes, ipyparallel
engines, and horovodrun under a papermill kernel run by ``chexlib study``);
each line is stamped with the time it reached the parent, so "as it comes"
is checked, not only "in the end".
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pytest
from conftest import OutputLines, kill_tree

from chexlib.launch import engines, horovodrun, launcher, rank_log
from chexlib.study import notebook
from chexlib.study.runner import SpecError, load_spec

# The ranks cannot import this test module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Stamped(io.TextIOBase):
    """A stdout stand-in: every line written, with the time it arrived. With
    ``shown_dir``, a line ``[R] ... started`` creates ``shown_dir/rankR`` as it arrives:
    the ranks wait for it, so "shown while the rank ran" is an order, not a time margin."""

    def __init__(self, shown_dir: Path | None = None):
        self.lines: list[tuple[float, str]] = []
        self.shown_dir = shown_dir

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.append((time.monotonic(), line))
            started = re.fullmatch(r"\[(\d+)\] .*started", line)
            if self.shown_dir is not None and started:
                (self.shown_dir / f"rank{started[1]}").touch()
        return len(text)


def _talk_then_wait(shown_dir: str) -> tuple[int, bool]:
    """Each rank prints a line, waits (60 s at most) until the parent has shown it
    (:class:`Stamped` creates ``shown_dir/rankR``), prints another (to stderr), and
    returns its rank and whether its first line was shown while it ran."""
    import os
    import sys
    import time
    from pathlib import Path

    rank = int(os.environ["HOROVOD_RANK"])
    print(f"rank {rank} started")
    shown = Path(shown_dir) / f"rank{rank}"
    deadline = time.monotonic() + 60
    while not shown.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"rank {rank} done", file=sys.stderr)
    return rank, shown.exists()


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
    shown = tmp_path / "shown"
    shown.mkdir()
    out = Stamped(shown_dir=shown)
    with rank_log.RankLog(tmp_path / "ranks.log", stream=out) as log:
        results = horovodrun.run_function(
            _talk_then_wait, args=(str(shown),), np=2, timeout=120, log=log
        )
    assert results == [(0, True), (1, True)]  # each rank's line was shown while it waited
    assert {"[0] rank 0 done", "[1] rank 1 done"} <= {line for _, line in out.lines}
    saved = (tmp_path / "ranks.log").read_text().splitlines()
    assert {"[0] rank 0 started", "[1] rank 1 started", "[1] rank 1 done"} <= set(saved)


# ipyparallel sends a function by reference to its module, which engines cannot
# import: the engines run this code with the built-in exec instead.
# SHOWN_DIR is defined by the test (see _talk_then_wait).
ENGINE_TALK = """
import os, sys, time
from pathlib import Path
rank = os.environ["HOROVOD_RANK"]
print(f"engine rank {rank} started", flush=True)
shown = Path(SHOWN_DIR) / f"rank{rank}"
deadline = time.monotonic() + 60
while not shown.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print(f"engine rank {rank} done, shown while it ran: {shown.exists()}", file=sys.stderr)
"""


@pytest.mark.slow
def test_ipyparallel_engines_lines_reach_stdout_as_they_come(tmp_path):
    shown = tmp_path / "shown"
    shown.mkdir()
    out = Stamped(shown_dir=shown)
    code = f"SHOWN_DIR = {str(shown)!r}\n{ENGINE_TALK}"
    with (
        engines.HorovodCluster(n=2) as cluster,
        rank_log.RankLog(tmp_path / "r.log", stream=out) as log,
    ):
        assert cluster.run(exec, code, timeout=120, log=log) == {0: None, 1: None}
    saved = (tmp_path / "r.log").read_text()
    for rank in (0, 1):
        assert f"[{rank}] engine rank {rank} done, shown while it ran: True" in saved, saved


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
    output = OutputLines(proc, name="chexlib study --log-output")
    try:  # the stage's own timeout (300 s) ends a hung notebook; then the study reports it
        text = output.to_end(480, "the end of the study's output (stage timeout 300 s)")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    assert proc.returncode == 0, "\n".join(text[-30:])
    ranks = [(i, line) for i, line in enumerate(text) if line.startswith("[0] ")]
    assert any("Epoch 2/2" in line for _, line in ranks), text[-30:]
    (run_dir,) = (out / "watch" / "train").iterdir()
    # Streamed, not handed over at the end: rank 0's "Epoch 1/2" reached the study's
    # stdout before rank 0 wrote run/metrics.json at the end of its training. An order,
    # not a time margin (file times and line stamps are both the wall clock; a run here
    # had 10 s between the two, the first epoch's tracing alone takes seconds).
    epoch_1 = next(wall for _, wall, line in output.lines if line == "[0] Epoch 1/2")
    assert epoch_1 < (run_dir / "run" / "metrics.json").stat().st_mtime, (
        "rank 0's lines reached stdout after its training ended: handed over, not streamed"
    )
    # the notebook's own cell output came too, after the ranks' lines
    wrote = next(
        i for i, line in enumerate(text) if line.startswith("wrote ") and "params.json" in line
    )
    assert wrote > ranks[-1][0]
    saved = (run_dir / "run" / launcher.RANK_LOG).read_text().splitlines()
    assert saved[0].startswith("# ") and "horovodrun, 2 rank(s)" in saved[0]
    assert [line for _, line in ranks] == [line for line in saved if line.startswith("[0] ")]
    assert json.loads((run_dir / "params.json").read_text())["launch"]["log_output"] is True
