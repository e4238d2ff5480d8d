"""``chexlib cluster up | status | down``: a LOCAL EMULATION of a cluster on this machine.

``up`` makes nodes ``node1`` .. ``nodeN`` (network + UTS namespaces on a bridge,
each with its address, hostname, sshd and slurmd on its own cores), starts munge
and slurmctld on the host, names the nodes in /etc/hosts and sets up ssh so that
``ssh node1`` and ``srun -N2 hostname`` work; ``down`` undoes exactly what ``up``
recorded (:mod:`chexlib.cluster.state`). Both are idempotent. It is for tests,
teaching and measurement: the engines are real, the hosts are emulated, and all
nodes share this machine's disks, memory and (unless ``--cores-per-node`` keeps
them apart) cores.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import time

from chexlib.cluster import daemons, nodes, slurm_conf
from chexlib.cluster.commands import ClusterError, missing_prerequisite
from chexlib.cluster.nodes import Node
from chexlib.cluster.state import STATE_DIR, ClusterState, remove_hosts_line, stop_process

EMULATION = "a LOCAL EMULATION of a cluster (network namespaces as nodes on this one machine)"
READY_STATES = {"idle", "mixed", "allocated", "completing"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("up", help=f"bring up {EMULATION}")
    up.add_argument("--nodes", type=int, default=2, help="number of nodes, node1..nodeN")
    up.add_argument("--cores-per-node", type=int, default=1, help="CPUs each node runs on")
    up.add_argument(
        "--link-rate", default=None, help="shape each node's link (tc units: 1gbit, 100mbit)"
    )
    shape_ = sub.add_parser("shape", help="re-shape the running cluster's links (tc tbf)")
    shape_.add_argument(
        "--link-rate", required=True, help="tc units (10gbit, 1gbit, 100mbit) or 'none' (unshaped)"
    )
    sub.add_parser("status", help="what runs, per node, and whether Slurm sees it")
    crash_ = sub.add_parser(
        "crash", help="lose a node mid-run: SIGKILL everything on it (slurmd, sshd, ranks)"
    )
    crash_.add_argument("node", help="the node to lose, e.g. node2; chexlib cluster up restarts it")
    sub.add_parser("down", help="remove everything up created (nothing else)")


def run(args: argparse.Namespace) -> int:
    if args.action == "down" and os.geteuid() == 0:
        return down()  # whatever else is missing now: undo what was made
    missing = missing_prerequisite()
    if missing:
        raise ClusterError(missing)
    if args.action == "up":
        return up(args.nodes, args.cores_per_node, args.link_rate)
    if args.action == "shape":
        return shape(args.link_rate)
    if args.action == "crash":
        return crash(args.node)
    return down() if args.action == "down" else status()


def up(count: int = 2, cores_per_node: int = 1, link_rate: str | None = None) -> int:
    """Bring the cluster up (or check the one that is up); see the module docstring."""
    wanted = {"nodes": count, "cores_per_node": cores_per_node, "link_rate": link_rate}
    state = ClusterState.load()
    if state is not None:
        if state.config != wanted:
            raise ClusterError(
                f"a cluster is up with {state.config}, not {wanted}: chexlib cluster down first"
            )
        print("chexlib cluster: already up; checking it")
        repair(state)
        return status()
    planned = nodes.plan_nodes(count, cores_per_node)
    nodes.check_free(planned)
    if slurm_conf.CONF.exists() and not slurm_conf.is_ours():
        raise ClusterError(
            f"{slurm_conf.CONF} exists and is not this cluster's: move it away first"
        )
    started = time.monotonic()
    state = ClusterState(STATE_DIR, {"created": [], "config": wanted})
    state.data["nodes"] = [n.to_dict() for n in planned]
    state.save()
    try:
        _bring_up(state, planned, link_rate)
    except BaseException:
        _tear_down(state)
        raise
    print(f"chexlib cluster: up in {time.monotonic() - started:.1f} s")
    return status()


def _bring_up(state: ClusterState, planned: list[Node], link_rate: str | None) -> None:
    nodes.create_network(state, planned, link_rate)
    daemons.ssh_setup(state, planned)
    sock = daemons.start_munge(state)
    if not slurm_conf.CONF.exists():
        daemons.make_dir(state, slurm_conf.CONF.parent)
        state.record("file", path=str(slurm_conf.CONF))
    ctl = nodes.controller_address()
    slurm_conf.CONF.write_text(slurm_conf.render(planned, ctl, state.dir, sock))
    for node in planned:
        daemons.start_sshd(state, node)
    daemons.start_slurm(state, planned)
    for node in planned:
        log = state.dir / "log" / f"sshd-{node.name}.out"
        daemons.wait_for(
            f"sshd on {node.name}", lambda n=node: daemons.port_open(n.address, 22), 15, log
        )
    names = {n.name for n in planned}

    def all_ready() -> bool:
        states = daemons.node_states()
        return all(states.get(n, "").rstrip("*~#") in READY_STATES for n in names)

    daemons.wait_for("every node idle in sinfo", all_ready, 40, state.dir / "log" / "slurmctld.log")


def shape(link_rate: str | None) -> int:
    """Every node's link of the running cluster at ``link_rate`` (None or "none": unshaped).

    For measurements at several link rates on one cluster. ``up``'s recorded
    ``--link-rate`` stays as it was (a later ``up`` with the same flags still only
    checks): whoever re-shapes sets the rate back when done.
    """
    state = ClusterState.load()
    if state is None:
        raise ClusterError(f"no cluster is up to shape ({EMULATION}): chexlib cluster up first")
    rate = None if link_rate in (None, "", "none", "unshaped") else link_rate
    for node in (Node.from_dict(d) for d in state.data.get("nodes", [])):
        if rate:
            nodes.shape(node, rate)
        else:
            nodes.unshape(node)
        print(f"chexlib cluster: {node.name} link {nodes.link_rate_now(node) or 'unshaped'}")
    return 0


def crash(name: str) -> int:
    """Lose ``name`` as a node is lost mid-run: SIGKILL every process in it (its slurmd,
    sshd, job steps and ranks), no warning. Its namespace and address stay, as a crashed
    machine's cable does; ``chexlib cluster up`` restarts its daemons (a reboot)."""
    state = ClusterState.load()
    if state is None:
        raise ClusterError(f"no cluster is up ({EMULATION}): nothing to crash")
    known = [d["name"] for d in state.data.get("nodes", [])]
    if name not in known:
        raise ClusterError(f"no node {name!r} in this cluster (nodes: {', '.join(known)})")
    pids = nodes.processes_in(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    print(
        f"chexlib cluster: {name} crashed: killed {len(pids)} process(es) on it (slurmd, sshd, "
        "every job step and rank); chexlib cluster up brings its daemons back"
    )
    return 0


def repair(state: ClusterState) -> None:
    """Restart the daemons a crashed node or a killed daemon left dead, as an admin would
    after a reboot: slurmctld on the host, sshd and slurmd on each node. Slurm takes a
    node it had marked DOWN back when its slurmd registers (``ReturnToService=2``)."""
    planned = [Node.from_dict(d) for d in state.data.get("nodes", [])]
    gone = [n.name for n in planned if not os.path.exists(n.netns)]
    if gone:
        raise ClusterError(f"namespace(s) {', '.join(gone)} gone: chexlib cluster down, then up")
    alive = state.daemons_alive()
    if not alive.get("munged", True):
        raise ClusterError("munged is not running: chexlib cluster down, then up")
    if not alive.get("slurmctld", True):
        print("chexlib cluster: restarting slurmctld")
        daemons.start_slurm(state, [])
    restarted = []
    for node in planned:
        if not alive.get(f"sshd-{node.name}", True):
            daemons.start_sshd(state, node)
            restarted.append(node)
        if not alive.get(f"slurmd-{node.name}", True):
            daemons.start_slurmd(state, node)
            restarted.append(node)
    for node in dict.fromkeys(restarted):  # each node once, in order
        print(f"chexlib cluster: {node.name}: restarted its dead daemons; waiting for Slurm")
        log = state.dir / "log" / f"sshd-{node.name}.out"
        daemons.wait_for(
            f"sshd on {node.name}", lambda n=node: daemons.port_open(n.address, 22), 15, log
        )
        daemons.wait_for(
            f"{node.name} back in sinfo",
            lambda n=node: daemons.node_states().get(n.name, "").rstrip("*~#") in READY_STATES,
            60,
            state.dir / "log" / "slurmctld.log",
        )


def problems(state: ClusterState) -> list[str]:
    """What is wrong with the recorded cluster: daemons gone, nodes Slurm does not see."""
    found = [f"{name} is not running" for name, ok in state.daemons_alive().items() if not ok]
    planned = [Node.from_dict(d) for d in state.data.get("nodes", [])]
    found += [f"namespace {n.name} is gone" for n in planned if not os.path.exists(n.netns)]
    states = daemons.node_states()
    found += [
        f"Slurm sees {n.name} as {states.get(n.name, 'missing')}"
        for n in planned
        if states.get(n.name, "").rstrip("*~#") not in READY_STATES
    ]
    return found


def status() -> int:
    """Print the cluster's nodes and daemons; 0 when all is well, 1 otherwise."""
    state = ClusterState.load()
    if state is None:
        print(f"chexlib cluster: no cluster is up ({EMULATION})")
        return 1
    planned = [Node.from_dict(d) for d in state.data.get("nodes", [])]
    alive = state.daemons_alive()
    slurm = daemons.node_states()
    print(f"chexlib cluster: {EMULATION}; state in {state.dir}")
    print(f"  host: slurmctld {_word(alive.get('slurmctld'))}, munged {_word(alive.get('munged'))}")
    for n in planned:
        rate = nodes.link_rate_now(n) or "unshaped"
        print(
            f"  {n.name}: {n.address} on eth0, cores {','.join(map(str, n.cores))}, link {rate}, "
            f"sshd {_word(alive.get('sshd-' + n.name))}, "
            f"slurmd {_word(alive.get('slurmd-' + n.name))}, Slurm: {slurm.get(n.name, 'missing')}"
        )
    wrong = problems(state)
    for line in wrong:
        print(f"  problem: {line} (chexlib cluster up restarts dead daemons)")
    if not wrong:
        hosts = ",".join(f"{n.name}:{len(n.cores)}" for n in planned)
        print(f"  try: ssh node1 hostname; srun -N{len(planned)} hostname; HOSTS={hosts}")
    return 1 if wrong else 0


def _word(alive: bool | None) -> str:
    return "running" if alive else "NOT running"


def down() -> int:
    """Remove what ``up`` recorded; nothing recorded: nothing to do."""
    state = ClusterState.load()
    if state is None:
        print("chexlib cluster: no cluster is up; nothing to do")
        return 0
    started = time.monotonic()
    _tear_down(state)
    print(f"chexlib cluster: down in {time.monotonic() - started:.1f} s ({EMULATION})")
    return 0


def _tear_down(state: ClusterState) -> None:
    """Every process in the nodes, the recorded daemons, then the log backwards; the state last."""
    for item in state.items("netns"):  # ranks, job steps, ssh sessions: all inside our nodes
        _kill_all(nodes.processes_in(item["name"]))
    for daemon in reversed(state.items("daemon")):
        stop_process(daemon)
    for item in reversed(state.data["created"]):
        kind = item["kind"]
        if kind in ("netns", "link"):
            nodes.remove(kind, item["name"])
        elif kind == "hosts_line":
            remove_hosts_line(item["line"])
        elif kind == "file":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(item["path"])
        elif kind == "dir":
            with contextlib.suppress(OSError):  # not empty: someone else uses it now
                os.rmdir(item["path"])
    shutil.rmtree(state.dir, ignore_errors=True)


def _kill_all(pids: list[int], grace: float = 2.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            if not any(os.path.exists(f"/proc/{p}") and not _zombie(p) for p in pids):
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True
