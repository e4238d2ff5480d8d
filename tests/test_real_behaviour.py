"""Behaviour that names and shapes cannot show: each test would fail on a broken implementation.

* every ablation switch changes the graph tf.data is given (not only ``element_spec``);
* a file cache is read on the second pass (the source images are gone by then);
* a tf.data service pipeline runs on the service's worker (which alone can open the files);
* a ``chexlib train`` killed while writing a checkpoint resumes from the previous one;
* a ``chexlib study`` killed during a run resumes: the finished run is skipped, the killed one reruns.

Real files, real processes, real kills (SIGSTOP / SIGKILL); nothing is mocked.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import dataset_options_pb2, graph_pb2

from chexlib.pipeline import builders, config, sources

CHEXLIB = str(Path(sys.executable).parent / "chexlib")
SIZE = 32
BATCH = 8


@pytest.fixture(scope="module")
def compact_records(synth_dir, tmp_path_factory):
    from chexlib.records import convert

    out = tmp_path_factory.mktemp("records") / "compact"
    convert.convert(
        synth_dir, out, variant="compact", size=48, images_per_shard=16, workers=2, progress=False
    )
    return out


def collect(ds, batches=None):
    """(names, images) of a dataset built with ``return_names=True``."""
    names, images = [], []
    for i, (x, _, n) in enumerate(ds):
        if batches is not None and i >= batches:
            break
        names += [s.decode() for s in n.numpy()]
        images.append(x.numpy())
    return names, np.concatenate(images)


# --- 1. every ablation switch changes the built graph -------------------------------------


def graph_of(ds: tf.data.Dataset) -> tuple[collections.Counter, list, dataset_options_pb2.Options]:
    """(count of each top-level dataset op, the parallel maps' ``deterministic`` attrs, options)."""
    graph = graph_pb2.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    ops = collections.Counter(node.op for node in graph.node if "Dataset" in node.op)
    determinism = [
        node.attr["deterministic"].s.decode()
        for node in graph.node
        if node.op in ("ParallelMapDatasetV2", "ParallelInterleaveDatasetV4")
    ]
    options = dataset_options_pb2.Options()
    for node in graph.node:  # with_options nodes: later ones hold the merged options
        if node.op == "OptionsDataset":
            options.MergeFromString(node.attr["serialized_options"].s)
    return ops, determinism, options


def _ops_removed(on: collections.Counter, off: collections.Counter) -> dict[str, int]:
    return {op: n - off.get(op, 0) for op, n in on.items() if n > off.get(op, 0)}


@pytest.mark.parametrize(
    "source,step",
    [("records", s) for s in config.steps_for("records")]
    + [("raw", s) for s in config.steps_for("raw")],
)
def test_each_ablation_switch_changes_the_built_graph(
    source, step, synth_metadata, compact_records
):
    """Turning one step off removes exactly what that step adds to the graph."""

    def build(**switches):
        return builders.build_dataset(
            source,
            "train",
            metadata=synth_metadata,
            records_dir=compact_records,
            batch_size=BATCH,
            image_size=SIZE,
            **switches,
        )

    on_ops, on_det, on_opts = graph_of(build())
    off_ops, off_det, off_opts = graph_of(build(**config.without_steps(step)))
    removed = _ops_removed(on_ops, off_ops)
    if step == "parallel-interleave":
        assert (
            on_ops["ParallelInterleaveDatasetV4"] == 1
            and "ParallelInterleaveDatasetV4" not in off_ops
        )
        assert off_ops["FlatMapDataset"] == 1  # read one file after another instead
    elif step == "read-prefetch":
        assert removed == {"PrefetchDataset": 1}, (on_ops, off_ops)
    elif step == "final-prefetch":
        assert removed == {"PrefetchDataset": 1}, (on_ops, off_ops)
        # the prefetch that goes is the last op: the output of the pipeline
        assert _last_dataset_op(build()) == "PrefetchDataset"
        assert _last_dataset_op(build(**config.without_steps(step))) != "PrefetchDataset"
        assert on_opts.optimization_options.inject_prefetch is True
        assert off_opts.optimization_options.inject_prefetch is False  # TF adds none back
    elif step == "parallel-map":
        assert "MapDataset" not in on_ops and on_ops["ParallelMapDatasetV2"] >= 1
        assert "ParallelMapDatasetV2" not in off_ops and off_ops["MapDataset"] >= 1
        assert off_opts.optimization_options.map_parallelization is False  # nor TF behind it
    elif step == "vectorized-normalize":
        # one map per element plus one per batch, against one map per element
        assert removed == {"ParallelMapDatasetV2": 1}, (on_ops, off_ops)
    elif step == "single-thread-ops":
        assert on_ops == off_ops
        assert on_opts.threading_options.max_intra_op_parallelism == 1
        assert not off_opts.threading_options.HasField("max_intra_op_parallelism")
    elif step == "slack":
        assert on_ops == off_ops
        assert on_opts.slack is True and off_opts.slack is False
    elif step == "nondeterminism":
        assert on_ops == off_ops
        assert on_opts.deterministic is False and off_opts.deterministic is True
        assert on_det and set(on_det) == {"false"} and set(off_det) == {"true"}
    else:
        pytest.fail(f"no graph expectation for step {step!r}: add one")
    assert on_ops != off_ops or on_opts != off_opts  # every switch changes what TF is given


def _last_dataset_op(ds: tf.data.Dataset) -> str:
    """The op of the dataset node the graph returns (the input of its ``_Retval``/identity)."""
    graph = graph_pb2.GraphDef()
    graph.ParseFromString(ds._as_serialized_graph().numpy())
    nodes = {n.name: n for n in graph.node}
    consumed = {i.split(":")[0].lstrip("^") for n in graph.node for i in n.input}
    sinks = [n for n in graph.node if n.name not in consumed]
    (sink,) = sinks
    while sink.op in ("Identity", "_Retval"):
        sink = nodes[sink.input[0].split(":")[0]]
    return sink.op


# --- 2. the cache is read on the second pass ----------------------------------------------


def test_file_cache_serves_the_second_pass_after_the_images_are_gone(synth_dir, tmp_path):
    from chexlib.data.metadata import load_metadata

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)  # a copy of our own to destroy
    md, cache = load_metadata(data), tmp_path / "cache"
    settings = dict(batch_size=BATCH, image_size=SIZE, cache=str(cache), return_names=True)

    val = builders.build_dataset("raw", "val", metadata=md, **settings)
    train = iter(builders.build_dataset("raw", "train", metadata=md, **settings))
    first = collect(val)
    for _ in range(40):  # until the training cache is complete (its index is written)
        next(train)
        if len(list(cache.glob("raw-train-*.index"))) == 1:
            break
    assert len(list(cache.glob("raw-val-*.index"))) == 1
    assert len(list(cache.glob("raw-train-*.index"))) == 1

    shutil.rmtree(data / "images")  # every source image gone
    with pytest.raises(tf.errors.NotFoundError):  # without a cache nothing can be read now
        next(
            iter(
                builders.build_dataset("raw", "val", metadata=md, batch_size=BATCH, image_size=SIZE)
            )
        )

    second = collect(val)  # the same dataset, a second pass: from the cache only
    assert second[0] == first[0]
    np.testing.assert_array_equal(second[1], first[1])
    steps = -(-sources.count_examples("raw", "train", metadata=md) // BATCH)
    for _ in range(2 * steps):  # two more training epochs, all from the cache
        x, _, _ = next(train)
        assert x.shape == (BATCH, SIZE, SIZE, 1)


# --- 3. data really flows through the tf.data service -------------------------------------


def _serve(role: str, args: list[str], cwd: Path, procs: list) -> str:
    """Start one tf.data service server (``chexlib data-service ROLE``) in ``cwd``."""
    from chexlib.pipeline.dataservice import READY, _read_line

    proc = subprocess.Popen(
        [sys.executable, "-m", "chexlib.cli.main", "data-service", role, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=cwd,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    procs.append(proc)
    line = _read_line(proc, 120)
    assert line.startswith(READY), f"{role} did not start (exit {proc.poll()})"
    return line.split()[1]


@pytest.mark.slow
def test_tf_data_service_elements_come_from_its_worker(
    synth_dir, synth_metadata, tmp_path, monkeypatch
):
    """The pipeline names images by RELATIVE paths that exist only in the worker's folder.

    The trainer (this process) cannot open them, so every element it reads was
    decoded by the service worker: a local bypass would fail with NotFoundError.
    """
    worker_dir, trainer_dir = tmp_path / "worker", tmp_path / "trainer"
    trainer_dir.mkdir()
    shutil.copytree(synth_dir / "images", worker_dir / "images")
    md = synth_metadata.copy()
    md["path"] = [f"images/{Path(p).name}" for p in md["path"].astype(str)]
    settings = dict(batch_size=BATCH, image_size=SIZE, return_names=True)

    monkeypatch.chdir(trainer_dir)  # where the relative paths lead nowhere
    procs: list[subprocess.Popen] = []
    try:
        with pytest.raises(tf.errors.NotFoundError):  # not readable here
            next(iter(builders.build_dataset("raw", "train", metadata=md, **settings)))
        dispatcher = _serve("dispatcher", ["--port", "0"], tmp_path, procs)
        _serve("worker", ["--dispatcher", dispatcher.removeprefix("grpc://")], worker_dir, procs)
        ds = builders.build_dataset(
            "raw", "train", metadata=md, data_service=dispatcher, **settings
        )
        steps = sources.count_examples("raw", "train", metadata=md) // BATCH
        names, images = collect(ds, batches=steps)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()

    # the images are the right ones: each is its evaluation image, up to the training flip
    expected_names, expected = collect(
        builders.build_dataset("raw", "train", metadata=synth_metadata, training=False, **settings)
    )
    by_name = dict(zip(expected_names, expected, strict=True))
    assert len(names) == steps * BATCH and set(names) <= set(by_name)
    for name, image in zip(names, images, strict=True):
        ref = by_name[name]
        assert np.array_equal(image, ref) or np.array_equal(image, ref[:, ::-1]), name


# --- 4. a crash while a checkpoint is being written ---------------------------------------


# `chexlib train` as its console script runs it (chexlib.cli.main.main), with one hook:
# save_checkpoint writes the model and optimizer into .tmp-epoch-NNNN, then state.json
# (through checkpoints.write_json), then renames the folder and moves latest.json. Just
# before the state.json of epoch KILL_EPOCH the process stops itself (SIGSTOP): frozen
# inside the write, every time, for the test to kill. The write itself is chexlib's.
KILL_EPOCH = 2
_TRAIN_STOPPING_IN_A_WRITE = f"""
import os, signal, sys
from pathlib import Path
from chexlib.train import checkpoints
write_json = checkpoints.write_json
def stopping(path, obj):
    if Path(path).parent.name == ".tmp-epoch-{KILL_EPOCH:04d}" and Path(path).name == "state.json":
        os.kill(os.getpid(), signal.SIGSTOP)
    return write_json(path, obj)
checkpoints.write_json = stopping
from chexlib.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_while_writing_a_checkpoint_leaves_the_previous_one_usable(synth_dir, tmp_path):
    """SIGKILL ``chexlib train`` inside ``save_checkpoint``; ``--resume`` continues and finishes.

    The process stops itself half-way through writing epoch 2's checkpoint (see
    ``_TRAIN_STOPPING_IN_A_WRITE``); the test checks it is frozen there (the temporary
    folder holds the weights but no state.json, ``latest.json`` is at epoch 1) and kills it.
    """
    import psutil

    from chexlib.train import checkpoints
    from chexlib.train import config as train_config
    from chexlib.train.models import build_model

    out, epochs = tmp_path / "run", 4
    config = train_config.TrainConfig(
        data=str(synth_dir),
        out=str(out),
        model="tiny",
        image_size=SIZE,
        batch_size=BATCH,
        epochs=epochs,
        warmup_epochs=0,
        verbose=0,
        throughput_warmup_steps=2,
        throughput_window_steps=2,
    )
    root = out / checkpoints.CHECKPOINTS
    tmp = root / f".tmp-epoch-{KILL_EPOCH:04d}"
    log = open(tmp_path / "train.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-c", _TRAIN_STOPPING_IN_A_WRITE, "train"]
        + train_config.config_to_argv(config),
        stdout=log,
        stderr=log,
    )
    killed_at, deadline = None, time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                stopped = psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED
            except psutil.NoSuchProcess:
                break
            if stopped:
                # frozen inside the write: weights written, state.json and rename not yet
                assert (tmp / "ckpt.index").is_file() and not (tmp / "state.json").exists()
                assert json.loads((root / "latest.json").read_text())["epochs_done"] == 1
                assert not (root / f"epoch-{KILL_EPOCH:04d}").exists()
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = KILL_EPOCH
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            proc.kill()
        proc.wait(timeout=60)
        log.close()
    assert killed_at is not None, (
        "training never stopped in the checkpoint write: "
        + (tmp_path / "train.log").read_text()[-2000:]
    )
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()
    latest = json.loads((root / "latest.json").read_text())
    assert latest == {"dir": f"epoch-{killed_at - 1:04d}", "epochs_done": killed_at - 1}
    assert (tmp / "ckpt.index").is_file()  # the half-written checkpoint is still there

    # the previous checkpoint is whole: it loads variable for variable
    build_model("tiny", image_size=SIZE, weights=str(out))

    resumed = subprocess.run(
        [CHEXLIB, "train", *train_config.config_to_argv(dataclasses.replace(config, resume=True))],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed after epoch {killed_at - 1}" in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == killed_at - 1
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, epochs + 1))
    assert json.loads((root / "latest.json").read_text())["epochs_done"] == epochs
    assert sorted(os.listdir(root)) == [
        f"epoch-{epochs:04d}",
        "latest.json",
    ]  # no half checkpoint left


# --- 5. a real kill of `chexlib study` ----------------------------------------------------

SPEC = """\
name: killed
stages:
  - name: data
    notebook: 01_data_prep
    parameters: {GENERATE: true, N_IMAGES: 300, IMAGE_SIZE: 64, WORKERS: 1}
    cases:
      - {DATA_DIR: "{outputs}/data-a", SEED: 1, _label: a}
      - {DATA_DIR: "{outputs}/data-b", SEED: 2, _label: b}
"""


def _status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "run.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def _study(spec: Path, outputs: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [CHEXLIB, "study", str(spec), "--outputs", str(outputs), "--no-html"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a process group of its own, to kill as a whole
    )


@pytest.mark.slow
def test_a_killed_study_resumes_skipping_the_finished_run(tmp_path):
    """SIGKILL ``chexlib study`` and its kernel during the second run (its dataset half
    written), rerun: the first run is skipped untouched, the second runs again and completes."""
    import psutil

    from chexlib.study.runner import expand, load_spec

    spec, outputs = tmp_path / "killed.yaml", tmp_path / "outputs"
    spec.write_text(SPEC)
    first, second = (r.run_dir for r in expand(load_spec(spec), outputs))
    data_b = outputs / "data-b"

    proc = _study(spec, outputs)
    deadline, killed = time.monotonic() + 120, False
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            # the moment run b's kernel has begun writing its dataset
            if _status(second) == "running" and (data_b / "Data_Entry_2017.csv").exists():
                tree = psutil.Process(proc.pid).children(recursive=True)  # its kernel too
                os.killpg(proc.pid, signal.SIGKILL)
                for child in tree:
                    try:
                        child.kill()
                    except psutil.NoSuchProcess:
                        pass
                psutil.wait_procs(tree, timeout=10)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if not killed and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
    assert killed, out[-3000:]
    assert _status(first) == "complete" and _status(second) == "running"
    kept = {p: p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()}
    kept_mtime = (first / "run.json").stat().st_mtime_ns

    again = _study(spec, outputs)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out[-3000:]
    assert "2 runs, 1 already complete, 1 to run" in out
    assert _status(second) == "complete"
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["images"] == 300 and metrics["validation"]["passed"] is True
    assert len(list((data_b / "images").glob("*.png"))) == 300
    # nothing of the finished run was lost or redone
    assert {p: p.read_bytes() for p in sorted(first.rglob("*")) if p.is_file()} == kept
    assert (first / "run.json").stat().st_mtime_ns == kept_mtime
