"""chexlib.launch.launcher: real multi-rank Horovod (Gloo) jobs, a dying rank, ipyparallel, notebook 04.

Every job here runs 2 real ranks on this machine's cores: horovodrun processes,
horovod.run from a papermill kernel, or ipyparallel engines.
"""

from __future__ import annotations

import json
import time

import pytest

from chexlib.launch import engines, horovodrun, launcher, processes
from chexlib.train.config import TrainConfig
from chexlib.train.recipe import FAULT_ENV, FAULT_EXIT_CODE


def tiny_config(out, **changes) -> TrainConfig:
    base = dict(
        out=str(out),
        model="tiny",
        image_size=32,
        batch_size=8,
        epochs=2,
        warmup_epochs=1,
        verbose=2,
        throughput_warmup_steps=1,
        throughput_window_steps=2,
    )
    return TrainConfig(**{**base, **changes})


def test_launch_config_validates():
    assert (
        launcher.LaunchConfig(mode="horovodrun", ranks=4, hosts="a:2,b:2").to_dict()["ranks"] == 4
    )
    with pytest.raises(ValueError, match="mode must be one of"):
        launcher.LaunchConfig(mode="slurm")
    with pytest.raises(ValueError, match="offer 2 slots for 3 ranks"):
        launcher.LaunchConfig(ranks=3, hosts="a:1,b:1")


def test_commands():
    config = tiny_config("/runs/x", data="/data", pipeline="naive")
    cmd = horovodrun.horovodrun_command(config, np=4, hosts="n1:2,n2:2")
    assert cmd[0].endswith("horovodrun") and cmd[1:6] == ["-np", "4", "-H", "n1:2,n2:2", "--gloo"]
    assert cmd[6].endswith("chexlib") and cmd[7] == "train"
    assert cmd[cmd.index("--pipeline") + 1] == "naive" and cmd[cmd.index("--out") + 1] == "/runs/x"
    assert horovodrun.horovodrun_command(config, np=2)[4] == "localhost:2"
    mpi = horovodrun.mpirun_command(config, np=8, hosts="n1:4,n2:4")
    assert mpi[:5] == ["mpirun", "-np", "8", "-H", "n1:4,n2:4"] and "train" in mpi


def test_slot_env_matches_horovodrun_variables():
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    plan = get_host_assignments(parse_hosts("a:2,b:2"), 4)
    env = engines.slot_env(plan[3], "10.0.0.1", 1234, "eth0")
    assert env["HOROVOD_RANK"] == "3" and env["HOROVOD_SIZE"] == "4"
    assert (env["HOROVOD_LOCAL_RANK"], env["HOROVOD_LOCAL_SIZE"]) == ("1", "2")
    assert (env["HOROVOD_CROSS_RANK"], env["HOROVOD_CROSS_SIZE"]) == ("1", "2")
    assert env["HOROVOD_HOSTNAME"] == "b" and env["HOROVOD_GLOO_IFACE"] == "eth0"
    assert (
        env["HOROVOD_GLOO_RENDEZVOUS_ADDR"] == "10.0.0.1"
        and env["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "1234"
    )
    assert env["HOROVOD_CONTROLLER"] == env["HOROVOD_CPU_OPERATIONS"] == "gloo"


@pytest.fixture(scope="module")
def records_dir(synth_dir, tmp_path_factory):
    """Compact records: the val split has fewer shard files than ranks (record-level sharding)."""
    from chexlib.records.convert import convert

    out = tmp_path_factory.mktemp("records") / "compact"
    convert(
        synth_dir, out, variant="compact", size=64, images_per_shard=32, workers=2, progress=False
    )
    return out


@pytest.mark.slow
def test_two_ranks_end_with_identical_weights(records_dir, tmp_path):
    """Real horovodrun, 2 Gloo ranks: same weights on both, every val/test image counted once."""
    from chexlib.records.manifest import read_manifest

    config = tiny_config(tmp_path / "run", source="records", records=str(records_dir))
    record = horovodrun.run_horovodrun(config, np=2, timeout=400)
    assert record.ranks == 2 and record.global_batch_size == 16
    digests = record.weights_sha256_per_rank
    assert len(digests) == 2 and digests[0] == digests[1] and record.weights_in_sync
    splits = read_manifest(records_dir)["splits"]
    assert splits["val"]["shards"] < 2  # fewer files than ranks
    assert record.val_images == splits["val"]["records"]
    assert record.test_images == splits["test"]["records"]
    assert len(record.throughput["per_rank"]) == 2 and record.images_per_sec > 0
    assert record.learning_rate == pytest.approx(2e-3)  # scaled by 2 ranks


@pytest.mark.slow
def test_a_dying_rank_fails_the_job_without_hanging(synth_dir, tmp_path):
    config = tiny_config(tmp_path / "run", data=str(synth_dir), epochs=3)
    start = time.monotonic()
    with pytest.raises(processes.LaunchError) as err:
        horovodrun.run_horovodrun(
            config, np=2, timeout=300, env={FAULT_ENV: "rank=1,epoch=1,step=2"}
        )
    assert time.monotonic() - start < 300
    message = str(err.value)
    assert "exit status" in message and "exit status 0" not in message
    assert f"Exit code: {FAULT_EXIT_CODE}" in message  # horovodrun names the rank that died
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_ipyparallel_engines_form_one_horovod_job(synth_dir, tmp_path):
    config = tiny_config(tmp_path / "run", data=str(synth_dir), verbose=0)
    start = time.monotonic()
    with engines.HorovodCluster(n=2) as cluster:
        ranks = cluster.check()
        # an engine that dies mid-training: the other one errors out instead of hanging
        engine = next(e for e, r in cluster.ranks.items() if r == 1)
        cluster.client[engine].apply_sync(
            engines.set_engine_env, {FAULT_ENV: "rank=1,epoch=0,step=2"}
        )
        with pytest.raises(processes.LaunchError, match="a rank raised or died"):
            cluster.train(config)
    assert time.monotonic() - start < 300
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["size"] == 2 and r["rank_sum"] == 1.0 for r in ranks)  # allreduce(0 + 1)
    assert ranks[0]["pid"] != ranks[1]["pid"]


@pytest.mark.slow
def test_notebook_04_trains_two_ranks_under_papermill(synth_dir, tmp_path):
    from chexlib.study.notebook import run_notebook

    out = tmp_path / "nb04"
    params = {
        "DATA_DIR": str(synth_dir),
        "MODEL": "tiny",
        "IMAGE_SIZE": 32,
        "BATCH_SIZE": 8,
        "EPOCHS": 2,
        "RANKS": 2,
        "LAUNCH": "horovod.run",
        "WARMUP_EPOCHS": 1,
        "TIMING_WARMUP_STEPS": 1,
        "TIMING_WINDOW_STEPS": 2,
        "SYNTHETIC_STEPS": 8,
        "OUTPUT_DIR": str(out),
    }
    run_notebook("04_distributed_training", out / "04_distributed_training.ipynb", params)
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["ranks"] == 2 and metrics["weights_in_sync"] and metrics["launch"] == "horovod.run"
    )
    assert len(metrics["auroc"]) == 14 and len(metrics["history"]) == 2
    assert metrics["synthetic_images_per_sec"] > 0 and metrics["fraction_of_synthetic"] > 0
    params_saved = json.loads((out / "params.json").read_text())
    assert params_saved["train"]["model"] == "tiny" and params_saved["launch"]["ranks"] == 2
    for name in (
        "learning_curves.png",
        "auroc_comparison.png",
        "throughput.png",
        "auroc_comparison.csv",
    ):
        assert (out / name).stat().st_size > 0
