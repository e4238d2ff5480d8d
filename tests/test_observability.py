"""Seeing inside a run: TensorBoard scalars, the TF profiler trace, Horovod's timeline,
and notebook 04 resuming an interrupted run by itself.

Real ``chexlib train`` processes (and ``horovodrun`` with 2 ranks for the timeline);
the files are read back with TensorBoard's own event reader and as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

from chexlib.data.metadata import LABELS
from chexlib.train import config as train_config
from chexlib.train import process, recipe

CHEXLIB = str(Path(sys.executable).parent / "chexlib")


def tiny_config(data_dir, out, **changes) -> train_config.TrainConfig:
    base = dict(
        data=str(data_dir), out=str(out), model="tiny", image_size=32, batch_size=8, epochs=2,
        warmup_epochs=0, verbose=0, throughput_warmup_steps=2, throughput_window_steps=2,
    )  # fmt: skip
    return train_config.TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def tensorboard_run(synth_dir, tmp_path_factory):
    """One 2-epoch ``chexlib train --tensorboard DIR --profile-steps 3,5`` run."""
    root = tmp_path_factory.mktemp("tb")
    config = tiny_config(synth_dir, root / "run", tensorboard=str(root / "tb"), profile_steps="3,5")
    proc = subprocess.run(
        [CHEXLIB, "train", *train_config.config_to_argv(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "tb"


def test_profile_steps_are_checked():
    with pytest.raises(ValueError, match="pass --tensorboard DIR"):
        train_config.TrainConfig(data="d", profile_steps="3,5")
    for bad in ("3", "5,3", "0,2", "a,b"):
        with pytest.raises(ValueError, match="profile_steps"):
            train_config.TrainConfig(data="d", tensorboard="tb", profile_steps=bad)
    assert (
        train_config.parse_profile_steps("3,5") == (3, 5)
        and train_config.parse_profile_steps("") is None
    )


@pytest.mark.slow
def test_tensorboard_scalars_per_epoch(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(tensorboard_run), size_guidance={"tensors": 0}).Reload()
    tags = set(events.Tags()["tensors"])  # TF2 summaries are stored as tensors
    expected = {"loss", "learning_rate", "val_loss", "val_mean_auroc", "images_per_sec"}
    assert expected <= tags, tags
    defined = {t for t in tags if t.startswith("val_auroc/")}
    assert defined and defined <= {f"val_auroc/{label}" for label in LABELS}
    for tag in expected:
        steps = [e.step for e in events.Tensors(tag)]
        assert steps == [1, 2], (tag, steps)  # one value per epoch
    rates = [
        tensor_util.make_ndarray(e.tensor_proto).item() for e in events.Tensors("images_per_sec")
    ]
    assert all(r > 0 for r in rates)


@pytest.mark.slow
def test_profile_trace_is_written_for_the_profile_tab(tensorboard_run):
    traces = list((tensorboard_run / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    try:  # the profile tab's own converter (tensorboard-plugin-profile, a declared dependency)
        from tensorboard_plugin_profile.convert import raw_to_tool_data
    except ImportError as err:
        require(False, f"the profile tab's converter cannot be imported: {err}")
    data, _ = raw_to_tool_data.xspace_to_tool_data([str(traces[0])], "input_pipeline_analyzer^", {})
    assert data


@pytest.mark.slow
def test_two_rank_timeline_is_a_chrome_trace(synth_dir, tmp_path):
    """horovodrun --gloo -np 2 with --horovod-timeline: rank 0 writes a JSON trace."""
    from chexlib.launch.horovodrun import horovodrun_command

    timeline = tmp_path / "timeline.json"
    config = tiny_config(
        synth_dir, tmp_path / "run", epochs=1, batch_size=4, steps_per_epoch=4,
        evaluate=False, checkpoint=False, horovod_timeline=str(timeline),
    )  # fmt: skip
    proc = subprocess.run(
        horovodrun_command(config, np=2), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = process.read_timeline(timeline)  # tolerates the missing "]", as Chrome does
    assert isinstance(events, list) and events
    names = {str(e.get("name", "")) for e in events} | {str(e.get("args", "")) for e in events}
    assert any("allreduce" in n.lower() for n in names), sorted(names)[:20]
    assert {e.get("ph") for e in events} & {"B", "E", "X"}  # duration events of the trace format


def test_read_timeline_accepts_a_trace_without_its_closing_bracket(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n{"name": "a", "ph": "B", "ts": 1, "pid": 0},\n{"name": "a", "ph": "E"},\n')
    assert [e["ph"] for e in process.read_timeline(path)] == ["B", "E"]
    path.write_text('[{"name": "a", "ph": "X"}]\n')
    assert process.read_timeline(path) == [{"name": "a", "ph": "X"}]


@pytest.mark.slow
def test_notebook_04_rerun_resumes_an_interrupted_run(synth_dir, tmp_path):
    """The study's rerun: the first execution dies in epoch 2, the second, with the same
    parameters (no RESUME passed), continues after epoch 1 instead of failing."""
    from chexlib.study.notebook import run_notebook

    out = tmp_path / "nb04"
    params = {
        "DATA_DIR": str(synth_dir), "MODEL": "tiny", "IMAGE_SIZE": 32, "BATCH_SIZE": 8,
        "EPOCHS": 2, "RANKS": 1, "LAUNCH": "horovodrun", "WARMUP_EPOCHS": 0,
        "TIMING_WARMUP_STEPS": 1, "TIMING_WINDOW_STEPS": 2, "SYNTHETIC_STEPS": 0,
        "OUTPUT_DIR": str(out),
    }  # fmt: skip
    os.environ[recipe.FAULT_ENV] = "rank=0,epoch=1,step=2"  # the kernel, then the ranks, inherit it
    try:
        with pytest.raises(Exception, match="exit status"):
            run_notebook("04_distributed_training", out / "first.ipynb", params)
    finally:
        del os.environ[recipe.FAULT_ENV]
    assert json.loads((out / "run" / "checkpoints" / "latest.json").read_text())["epochs_done"] == 1
    run_notebook("04_distributed_training", out / "second.ipynb", params)
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 1 and len(metrics["history"]) == 2
    assert json.loads((out / "metrics.json").read_text())["resumed_from_epoch"] == 1
