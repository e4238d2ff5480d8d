"""The cluster's daemons: munge and slurmctld on the host; sshd and slurmd in each node.

A node's daemon is entered with ``nsenter --net=/var/run/netns/NODE`` (not ``ip netns
exec``: that remounts /sys in a new mount namespace, hiding the cgroup mounts slurmd
needs) and gets the node's hostname in its own UTS namespace (``unshare --uts``: with
one hostname for all, Horovod takes every rank for a local one), on the node's cores
(affinity, inherited by everything it starts: an ssh session's ranks, a Slurm job).

munge runs with its own key and socket under the state folder (Slurm is told the
socket in ``AuthInfo``), so a munged the machine already has is left alone. ssh uses
a host key, a root key, an ``authorized_keys`` and a ``known_hosts`` of the cluster's
own, named in one client file (:data:`SSH_CLIENT_CONF`, read through the system
config's ``Include``), so ``ssh node1`` needs no question and no change to ~/.ssh.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from chexlib.cluster.commands import ClusterError, run, which
from chexlib.cluster.nodes import Node
from chexlib.cluster.state import ClusterState

SSH_CLIENT_CONF = Path("/etc/ssh/ssh_config.d/chexlib-cluster.conf")
SSHD_PRIVSEP = Path("/run/sshd")  # sshd refuses to start without it


def start(state: ClusterState, name: str, argv: list[str], node: Node | None = None) -> int:
    """Start ``argv`` detached (in ``node`` when given), its output in ``log/NAME.out``."""
    log = state.dir / "log" / f"{name}.out"
    log.parent.mkdir(parents=True, exist_ok=True)
    if node is not None:
        enter = f'hostname {node.name} && exec "$0" "$@"'
        argv = [
            which("nsenter"),
            f"--net={node.netns}",
            which("unshare"),
            "--uts",
            "sh",
            "-c",
            enter,
            *argv,
        ]
    cores = node.cores if node is not None else None
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives `chexlib cluster up`
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
    time.sleep(0.05)  # let /proc show the new process's start time
    state.record_daemon(name, proc.pid, node.name if node else None, str(log))
    return proc.pid


def wait_for(what: str, ready, timeout: float, log: Path | None = None) -> None:
    """Poll ``ready()`` until true; else raise naming ``what`` and the end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tail = ""
    if log is not None and log.exists():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    raise ClusterError(f"{what} not ready within {timeout:g} s{': ' + tail if tail else ''}")


def start_munge(state: ClusterState) -> Path:
    """munged with the cluster's own key and socket; returns the socket."""
    folder = state.dir / "munge"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    key, sock = folder / "munge.key", folder / "munge.socket"
    if not key.exists():
        run(["mungekey", "--create", f"--keyfile={key}"])
    argv = [which("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={sock}"]
    argv += [f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log"]
    argv += [f"--seed-file={folder}/munged.seed"]
    start(state, "munged", argv)
    wait_for("munged", sock.exists, 10, folder / "munged.log")
    return sock


def ssh_setup(state: ClusterState, nodes: list[Node]) -> None:
    """Keys, ``authorized_keys``, ``known_hosts`` and the client file naming them."""
    folder = state.dir / "ssh"
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    for key in ("host_ed25519", "id_ed25519"):
        if not (folder / key).exists():
            run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    "chexlib-cluster",
                    "-f",
                    str(folder / key),
                ]
            )
    (folder / "authorized_keys").write_text((folder / "id_ed25519.pub").read_text())
    host_key = (folder / "host_ed25519.pub").read_text().split()[:2]
    known = [f"{n.name},{n.address} {' '.join(host_key)}" for n in nodes]
    (folder / "known_hosts").write_text("\n".join(known) + "\n")
    names = " ".join(n.name for n in nodes) + " " + " ".join(n.address for n in nodes)
    if not SSH_CLIENT_CONF.exists():
        make_dir(state, SSH_CLIENT_CONF.parent)
        state.record("file", path=str(SSH_CLIENT_CONF))
    SSH_CLIENT_CONF.write_text(
        "# chexlib cluster (a LOCAL EMULATION of a cluster); chexlib cluster down removes this\n"
        f"Host {names}\n  User root\n  IdentityFile {folder}/id_ed25519\n"
        f"  UserKnownHostsFile {folder}/known_hosts\n  StrictHostKeyChecking yes\n"
        "  ConnectTimeout 10\n"
    )
    make_dir(state, SSHD_PRIVSEP)


def make_dir(state: ClusterState, folder: Path) -> None:
    """``folder`` if missing, recorded (down removes it when empty)."""
    if not folder.exists():
        folder.mkdir(mode=0o755)
        state.record("dir", path=str(folder))


def start_sshd(state: ClusterState, node: Node) -> None:
    folder = state.dir / "ssh"
    conf = folder / f"sshd-{node.name}.conf"
    conf.write_text(
        f"ListenAddress {node.address}\nPort 22\nHostKey {folder}/host_ed25519\n"
        f"PidFile {folder}/sshd-{node.name}.pid\nAuthorizedKeysFile {folder}/authorized_keys\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\nMaxStartups 100\n"
        "Subsystem sftp internal-sftp\n"
    )
    start(state, f"sshd-{node.name}", [which("sshd"), "-D", "-e", "-f", str(conf)], node)


def port_open(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1):
            return True
    except OSError:
        return False


def start_slurm(state: ClusterState, nodes: list[Node]) -> None:
    """slurmctld on the host, then one ``slurmd -D`` per node."""
    for folder in ("slurmctld", "log", *(f"slurmd/{n.name}" for n in nodes)):
        (state.dir / folder).mkdir(parents=True, exist_ok=True)
    start(state, "slurmctld", [which("slurmctld"), "-D", "-i"])
    ctl_log = state.dir / "log" / "slurmctld.log"
    wait_for("slurmctld", lambda: _ok(["scontrol", "ping"], "UP"), 20, ctl_log)
    for node in nodes:
        start_slurmd(state, node)


def start_slurmd(state: ClusterState, node: Node) -> None:
    start(state, f"slurmd-{node.name}", [which("slurmd"), "-D", "-N", node.name], node)


def _ok(args: list[str], expect: str) -> bool:
    return expect in run(args, timeout=10, check=False)


def node_states() -> dict[str, str]:
    """``sinfo``'s state of each node (idle, alloc, down*, ...); {} when it does not answer."""
    try:
        out = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10, check=False)
    except ClusterError:
        return {}
    return dict(line.split()[:2] for line in out.splitlines() if len(line.split()) >= 2)
