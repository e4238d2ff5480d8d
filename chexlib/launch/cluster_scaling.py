"""Weak scaling across the local cluster's nodes, measured so that Horovod's cost and
the hardware's cost come apart (issue 23, item 5).

For one training configuration and at each link rate, :func:`measure` runs on the
running cluster (``chexlib cluster up``), each with the same steps and batch per rank:

1. ``alone``: one rank on node1 (``ssh node1 chexlib train ...``), nothing else running;
2. ``concurrent``: two independent one-rank jobs at once, one per node, each started
   over ssh and each with its own run folder;
3. ``horovod``: ``horovodrun -np 2 -H node1:1,node2:1`` with rank 0's Horovod
   timeline, from which the allreduce time per step is read.

Link rates are set by re-shaping the running cluster's links
(:func:`chexlib.cluster.cli.shape`); the rate found before is set back at the end.
The table (:mod:`chexlib.report.cluster_scaling`) goes to ``cluster_scaling.csv`` and
``.json`` in the output folder; each run's folder keeps its ``metrics.json``, the
Horovod job's ``allreduce.json`` its timeline's numbers. A configuration whose record
is already there is not run again (a study's rerun resumes).
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

from chexlib.cluster import cli as cluster_cli
from chexlib.cluster import nodes as cluster_nodes
from chexlib.cluster.state import ClusterState
from chexlib.core.files import read_json, write_json
from chexlib.core.runs import table_records
from chexlib.launch.horovodrun import run_horovodrun
from chexlib.launch.processes import LaunchError
from chexlib.report import cluster_scaling as table
from chexlib.train.config import TrainConfig, config_to_argv
from chexlib.train.process import read_timeline

NODES = ("node1", "node2")
NETWORK_INTERFACE = "eth0"  # each emulated node's interface (chexlib.cluster.nodes.NODE_IFACE)


def _chexlib() -> str:
    return str(Path(sys.executable).parent / "chexlib")


def ssh_train_command(node: str, config: TrainConfig, gate: Path | None = None) -> list[str]:
    """``ssh NODE 'cd HERE && chexlib train ...'``: one rank, no Horovod launcher. The
    nodes share this machine's file system, so every path is the same there.

    Args:
        gate: a folder: the remote shell writes ``<gate>/<node>.ready`` and waits for
            ``<gate>/go`` before it starts training, so that jobs started over several
            ssh connections start together (:func:`run_on_nodes`).
    """
    remote = " ".join(shlex.quote(a) for a in [_chexlib(), "train", *config_to_argv(config)])
    if gate is not None:
        ready, go = shlex.quote(str(gate / f"{node}.ready")), shlex.quote(str(gate / "go"))
        remote = f"touch {ready} && while [ ! -e {go} ]; do sleep 0.02; done && exec {remote}"
    return ["ssh", "-o", "BatchMode=yes", node, f"cd {shlex.quote(os.getcwd())} && {remote}"]


def _open_gate(gate: Path, nodes: list[str], procs: dict, timeout: float = 60) -> None:
    """Wait until every node's shell is ready (or its ssh ended), then let all start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((gate / f"{n}.ready").exists() or procs[n].poll() is not None for n in nodes):
            break
        time.sleep(0.02)
    (gate / "go").touch()


def _record(run_dir: Path) -> dict:
    """The run's ``metrics.json``, its training span (end = the file's time, start = end
    minus its wall seconds) and its folder."""
    path = run_dir / "metrics.json"
    rec = read_json(path)
    end = path.stat().st_mtime
    return {**rec, "run_id": str(run_dir), "span": (end - rec["wall_seconds"], end)}


def run_on_nodes(jobs: dict[str, TrainConfig], timeout: float) -> dict[str, dict]:
    """Start one ``chexlib train`` per node at the same time; wait for all; their records.

    Raises:
        LaunchError: a job exited non-zero or outlived ``timeout`` (all are stopped);
            the message names the node, the run folder and the end of its output.
    """
    procs = {}
    gate = Path(tempfile.mkdtemp(prefix="chexlib-gate-"))
    try:
        for node, config in jobs.items():
            shutil.rmtree(config.out, ignore_errors=True)  # an unfinished earlier try
            procs[node] = subprocess.Popen(
                ssh_train_command(node, config, gate), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True, errors="replace",
            )  # fmt: skip
        _open_gate(gate, list(jobs), procs)
        _wait_all(jobs, procs, timeout)
    finally:
        (gate / "go").touch()  # no shell waits forever
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(gate, ignore_errors=True)
    return {node: _record(Path(config.out)) for node, config in jobs.items()}


def _wait_all(jobs: dict[str, TrainConfig], procs: dict, timeout: float) -> None:
    """Wait for every job; one failed or late: :class:`LaunchError` (the others are
    killed by the caller)."""
    deadline, failed, outputs = time.monotonic() + timeout, [], {}
    for node, proc in procs.items():
        try:
            outputs[node] = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            raise LaunchError(f"chexlib train on {node} ({jobs[node].out}) still running after "
                              f"{timeout:g} s; every job of this measurement was stopped") from None  # fmt: skip
        if proc.returncode != 0:
            failed.append(node)
    if failed:
        node = failed[0]
        tail = "\n".join(outputs[node].strip().splitlines()[-15:])
        raise LaunchError(f"chexlib train on {node} ({jobs[node].out}) failed with exit status "
                          f"{procs[node].returncode}:\n{tail}")  # fmt: skip


def _horovod(config: TrainConfig, run_dir: Path, timeout: float) -> tuple[dict, dict]:
    """The 2-node Horovod job (or its earlier record): record and allreduce numbers."""
    numbers = run_dir.parent / f"{run_dir.name}-allreduce.json"
    if not (run_dir / "metrics.json").exists() or not numbers.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        timeline = run_dir.parent / f"{run_dir.name}-timeline.json"
        job = dataclasses.replace(config, out=str(run_dir), horovod_timeline=str(timeline))
        hosts = ",".join(f"{n}:1" for n in NODES)
        run_horovodrun(job, np=2, hosts=hosts, timeout=timeout,
                       network_interface=NETWORK_INTERFACE)  # fmt: skip
        write_json(numbers, table.allreduce_per_step(read_timeline(timeline)))
    return _record(run_dir), read_json(numbers)


def _one_rate(config: TrainConfig, folder: Path, rate: str | None, timeout: float) -> list[dict]:
    """The three configurations at the link rate the cluster has now."""
    runs = {name: folder / name for name in ("alone", "concurrent-node1", "concurrent-node2")}

    def job(name: str) -> TrainConfig:
        return dataclasses.replace(config, out=str(runs[name]), horovod_timeline=None)

    if (runs["alone"] / "metrics.json").exists():
        alone = _record(runs["alone"])
    else:
        alone = run_on_nodes({NODES[0]: job("alone")}, timeout)[NODES[0]]
    pair = [runs[f"concurrent-{n}"] for n in NODES]
    if all((p / "metrics.json").exists() for p in pair):
        concurrent = [_record(p) for p in pair]
    else:
        done = run_on_nodes({n: job(f"concurrent-{n}") for n in NODES}, timeout)
        concurrent = [done[n] for n in NODES]
    horovod, allreduce = _horovod(config, folder / "horovod", timeout)
    spans = [r["span"] for r in concurrent]
    return table.link_rows(rate, alone, concurrent, horovod, allreduce, spans)


def _cluster_nodes() -> list:
    state = ClusterState.load()
    if state is None:
        raise LaunchError("no local cluster is up: chexlib cluster up --nodes 2 first")
    found = [cluster_nodes.Node.from_dict(d) for d in state.data.get("nodes", [])]
    missing = [n for n in NODES if n not in {node.name for node in found}]
    if missing:
        raise LaunchError(f"the cluster has no {', '.join(missing)}: bring up 2 nodes")
    return found


def measure(
    config: TrainConfig,
    out: str | Path,
    link_rates=(None, "10gbit", "1gbit"),
    timeout: float = 900,
) -> dict:
    """Run the three configurations at each link rate; write and return the table.

    Args:
        config: the training of every run (model, input, batch, steps, throughput
            windows); its ``out`` and ``horovod_timeline`` are set per run.
        out: the folder of the runs (``<rate>/<configuration>/``) and the table.
        link_rates: ``tc`` rates; None (or ``"unshaped"``): the links unshaped.
        timeout: seconds each job may take.

    Returns:
        ``{"rows": [...], "allreduce_checks": [...], "table": csv path}``.
    """
    known = _cluster_nodes()
    before = {n.name: cluster_nodes.link_rate_now(n) for n in known}
    out = Path(out)
    rows: list[dict] = []
    try:
        for rate in tqdm(list(link_rates), desc="link rates", unit="rate"):
            rate = None if rate in (None, "", "none", table.UNSHAPED) else rate
            table.gbit_per_s(rate)  # a bad rate fails before anything runs
            cluster_cli.shape(rate)
            folder = out / f"{config.model}-{rate or table.UNSHAPED}"
            rows += _one_rate(config, folder, rate, timeout)
    finally:
        _restore(known, before)
    frame = table.scaling_table(rows)
    frame.to_csv(out / "cluster_scaling.csv", index=False)
    result = {"rows": table_records(frame), "allreduce_checks": table.allreduce_checks(rows)}
    write_json(out / "cluster_scaling.json", result)
    return {**result, "table": str(out / "cluster_scaling.csv")}


def _restore(known: list, before: dict) -> None:
    """Each node's link back to the rate it had before the measurement."""
    for node in known:
        rate = before.get(node.name)
        if rate:
            cluster_nodes.shape(node, rate)
        else:
            cluster_nodes.unshape(node)
