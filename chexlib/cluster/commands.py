"""Running the system's tools for the cluster: every call bounded by a timeout, and the
one-line check of what the machine lacks (root, namespaces, packages)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PACKAGES_HINT = (
    "make cluster-packages (or: apt-get install -y slurm-wlm munge openssh-server iproute2)"
)
# program -> the Debian package that installs it
PROGRAMS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "munged": "munge",
    "mungekey": "munge",
    "sshd": "openssh-server",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "slurmctld": "slurm-wlm",
    "slurmd": "slurm-wlm",
    "sinfo": "slurm-wlm",
    "srun": "slurm-wlm",
}


class ClusterError(RuntimeError):
    """The cluster cannot be brought up, checked or taken down; the message says why."""


def which(program: str) -> str | None:
    """``program``'s path (also in /usr/sbin, which a non-login PATH may lack)."""
    found = shutil.which(program)
    for folder in ("/usr/sbin", "/sbin"):
        if found is None and Path(folder, program).exists():
            found = str(Path(folder, program))
    return found


def run(args: list[str], timeout: float = 20, check: bool = True, **kw) -> str:
    """Run ``args``; return its stdout. Every call has a timeout (``srun`` and
    ``sinfo`` can block forever). A failure raises :class:`ClusterError` naming
    the command and its stderr."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"{' '.join(args)}: no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise ClusterError(f"{args[0]} not found; {PACKAGES_HINT}") from None
    if check and done.returncode != 0:
        err = (done.stderr or done.stdout).strip().splitlines()
        raise ClusterError(f"{' '.join(args)}: exit {done.returncode}: {' | '.join(err[-3:])}")
    return done.stdout


def missing_prerequisite() -> str | None:
    """One line saying what this machine lacks for the cluster, or None."""
    if os.geteuid() != 0:
        return "the local cluster emulation needs root (namespaces, /etc/hosts, daemons): run it with sudo"
    absent = sorted({PROGRAMS[p] for p in PROGRAMS if which(p) is None})
    if absent:
        return f"missing Debian packages {', '.join(absent)}: {PACKAGES_HINT}"
    probe = subprocess.run(
        [which("unshare"), "--net", "--uts", "true"], capture_output=True, text=True, timeout=10
    )
    if probe.returncode != 0:
        why = probe.stderr.strip().splitlines()[-1:] or ["unknown"]
        return f"this kernel or container does not allow network/UTS namespaces ({why[0]})"
    return None
