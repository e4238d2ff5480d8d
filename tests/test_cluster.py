"""chexlib.cluster: a LOCAL EMULATION of a 2-node cluster, with the real engines.

One module-scoped cluster (2 nodes of 1 core; root and Debian's slurm-wlm, munge,
openssh-server, which ``make test`` installs): up and down timed and idempotent,
``ssh node1``, ``srun -N2``, a Horovod job across both nodes, a node's link cut in
the middle of one, and nothing left behind by ``down``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import require

from chexlib.cluster import cli, commands, nodes, slurm_conf
from chexlib.cluster.state import HOSTS_FILE, HOSTS_MARK, ClusterState, start_time
from chexlib.train.config import TrainConfig

NODES = ("node1", "node2")
HOSTS = "node1:1,node2:1"


def tiny_config(out, **changes) -> TrainConfig:
    """The stand-in model at tiny sizes, as tests/test_launch.py trains it."""
    base = dict(
        out=str(out), model="tiny", image_size=32, batch_size=8, epochs=2, warmup_epochs=1,
        verbose=0, throughput_warmup_steps=1, throughput_window_steps=2,
    )  # fmt: skip
    return TrainConfig(**{**base, **changes})


def sh(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """A fresh 2-node cluster for this module; down at its end whatever happened."""
    missing = commands.missing_prerequisite()
    require(missing is None, f"the cluster tests need: {missing}")
    require(ClusterState.load() is None, "a cluster is already up: chexlib cluster down first")
    started = time.monotonic()
    try:
        assert cli.up(2, 1) == 0
        yield {"up_seconds": time.monotonic() - started, "state": ClusterState.load()}
    finally:
        cli.down()


def test_a_missing_package_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(commands, "which", lambda p: None if p == "slurmd" else "/bin/true")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    message = commands.missing_prerequisite()
    assert message.startswith("missing Debian packages slurm-wlm") and "\n" not in message
    assert "make cluster-packages" in message


def test_up_is_fast_and_a_second_up_only_checks(cluster, capsys):
    assert cluster["up_seconds"] < 60
    before = cluster["state"].items("daemon")
    assert cli.up(2, 1) == 0
    assert "already up" in capsys.readouterr().out
    assert ClusterState.load().items("daemon") == before  # nothing new started
    assert cli.status() == 0
    assert "LOCAL EMULATION" in capsys.readouterr().out


def test_each_node_has_its_hostname_cores_and_ssh(cluster):
    for k, name in enumerate(NODES):
        done = sh("ssh", name, "hostname; grep Cpus_allowed_list /proc/self/status")
        assert done.returncode == 0, done.stderr
        host, cores = done.stdout.split("\n")[:2]
        assert host == name and cores.split()[-1] == str(k % len(os.sched_getaffinity(0)))


def test_srun_runs_on_both_nodes(cluster):
    done = sh("srun", "-N2", "hostname", timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == list(NODES)


@pytest.mark.slow
def test_horovodrun_trains_across_two_nodes(cluster, synth_dir, tmp_path):
    """Rank 0 on node1, rank 1 on node2 (ssh), Gloo over each node's eth0."""
    from chexlib.launch.horovodrun import run_horovodrun

    config = tiny_config(tmp_path / "run", data=str(synth_dir), epochs=1)
    record = run_horovodrun(config, np=2, hosts=HOSTS, timeout=300, network_interface="eth0")
    assert record.ranks == 2 and record.hosts_per_rank == list(NODES)
    digests = record.weights_sha256_per_rank
    assert len(digests) == 2 and digests[0] == digests[1] and record.weights_in_sync
    assert record.val_images and record.mean_auroc is not None  # gathered from both ranks


@pytest.mark.slow
def test_a_cut_link_ends_the_job_naming_the_run_and_the_node(cluster, tmp_path):
    from chexlib.launch.horovodrun import run_horovodrun
    from chexlib.launch.processes import LaunchError

    out = tmp_path / "run"
    config = tiny_config(out, synthetic=True, steps_per_epoch=20, epochs=10_000)
    failure: dict = {}

    def train():
        try:
            run_horovodrun(config, np=2, hosts=HOSTS, timeout=400, network_interface="eth0")
        except LaunchError as err:
            failure["message"] = str(err)
        failure["ended"] = time.monotonic()

    job = threading.Thread(target=train, daemon=True)
    job.start()
    deadline = time.monotonic() + 180
    while not out.exists() and time.monotonic() < deadline and job.is_alive():
        time.sleep(0.5)  # rank 0 makes the run folder when training starts
    assert out.exists() and job.is_alive(), failure.get("message", "training did not start")
    time.sleep(3)
    cut = time.monotonic()
    subprocess.run(["ip", "-n", "node2", "link", "set", "eth0", "down"], check=True, timeout=10)
    try:
        job.join(timeout=150)
        assert not job.is_alive(), "the job outlived the cut by 150 s"
    finally:
        subprocess.run(["ip", "-n", "node2", "link", "set", "eth0", "up"], timeout=10)
        ctl = nodes.controller_address()
        subprocess.run(["ip", "-n", "node2", "route", "replace", "default", "via", ctl], timeout=10)
    assert failure["ended"] - cut < 120
    first = failure["message"].splitlines()[0]
    assert f"training run {out} failed" in first and "lost node(s) node2:" in first, first
    assert "node1" not in first.split("lost node(s)")[1]


def test_a_killed_slurmd_is_named_and_up_restarts_it(cluster, capsys):
    """A node's slurmd dies (SIGKILL): status names it and fails; up restarts it (and only
    it), Slurm has the node back and a 2-node job runs again."""
    state = ClusterState.load()
    slurmd = [d for d in state.items("daemon") if d["name"] == "slurmd-node2"][-1]
    os.kill(slurmd["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while start_time(slurmd["pid"]) == slurmd["started"] and time.monotonic() < deadline:
        time.sleep(0.1)
    capsys.readouterr()
    assert cli.status() == 1
    assert "problem: slurmd-node2 is not running" in capsys.readouterr().out
    assert cli.up(2, 1) == 0
    out = capsys.readouterr().out
    assert "node2: restarted its dead daemons" in out and "node1: restarted" not in out
    after = ClusterState.load().items("daemon")
    assert [d["name"] for d in after[len(state.items("daemon")) :]] == ["slurmd-node2"]
    done = sh("srun", "-N2", "hostname", timeout=60)
    assert done.returncode == 0 and sorted(done.stdout.split()) == list(NODES), done.stderr


def test_crash_refuses_a_node_it_does_not_have(cluster):
    with pytest.raises(commands.ClusterError, match=r"no node 'node9'.*node1, node2"):
        cli.crash("node9")


def test_down_is_fast_idempotent_and_leaves_nothing(cluster, capsys):
    state = ClusterState.load()
    daemons = state.items("daemon")
    # munged, slurmctld; sshd and slurmd per node (a restarted one is recorded again)
    assert len({d["name"] for d in daemons}) == 2 + 2 * len(NODES)
    started = time.monotonic()
    assert cli.down() == 0
    assert time.monotonic() - started < 10
    _assert_nothing_left(daemons)
    assert cli.down() == 0 and "nothing to do" in capsys.readouterr().out
    # --link-rate: both directions of each node's link shaped, then gone with the rest
    assert cli.up(2, 1, link_rate="100mbit") == 0
    shaped = ClusterState.load()
    node = nodes.Node.from_dict(shaped.data["nodes"][1])
    assert nodes.link_rate_now(node) == "100Mbit"
    inside = sh("tc", "-n", node.name, "qdisc", "show", "dev", "eth0").stdout
    assert "tbf" in inside and "rate 100Mbit" in inside
    assert cli.down() == 0
    _assert_nothing_left(shaped.items("daemon"))


def _assert_nothing_left(daemons: list[dict]) -> None:
    assert not [n for n in sh("ip", "netns", "list").stdout.split() if n in NODES]
    links = sh("ip", "-o", "link", "show").stdout
    assert nodes.BRIDGE not in links and "chex-node" not in links
    alive = [d["name"] for d in daemons if start_time(d["pid"]) == d["started"]]
    assert not alive, f"still running after down: {alive}"
    assert HOSTS_MARK not in HOSTS_FILE.read_text()
    assert (
        not slurm_conf.CONF.exists()
        and not Path("/etc/ssh/ssh_config.d/chexlib-cluster.conf").exists()
    )
    assert ClusterState.load() is None
