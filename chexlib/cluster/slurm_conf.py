"""``slurm.conf`` for the emulated nodes (the minimal one measured in ../shared/CLUSTER.md).

No systemd or cgroup v2 here: processes are tracked through /proc
(``proctrack/linuxproc``), tasks are not confined (``task/none``: a node's
cores come from its daemons' affinity), and each node's CPUs are as
configured, not as detected (``config_overrides``). ``%n`` in a path is the
node's name. No accounting database: job state comes from ``squeue``,
``scontrol`` and ``sbatch --wait``'s exit status.
"""

from __future__ import annotations

import socket
from pathlib import Path

from chexlib.cluster.nodes import Node

CONF = Path("/etc/slurm/slurm.conf")
MARK = "# Written by chexlib cluster up: a LOCAL EMULATION of a cluster. chexlib cluster down removes it."
PARTITION = "debug"


def render(nodes: list[Node], controller: str, state_dir: Path, munge_socket: Path) -> str:
    """The whole file: controller on the host at ``controller``, one line per node."""
    host = socket.gethostname().split(".")[0]
    lines = [
        MARK,
        "ClusterName=chexlib",
        f"SlurmctldHost={host}({controller})",
        "SlurmUser=root",
        "AuthType=auth/munge",
        f"AuthInfo=socket={munge_socket}",
        "CredType=cred/munge",
        "MpiDefault=none",  # Horovod here uses Gloo
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "SlurmdTimeout=30",
        f"StateSaveLocation={state_dir}/slurmctld",
        f"SlurmdSpoolDir={state_dir}/slurmd/%n",
        f"SlurmdPidFile={state_dir}/slurmd-%n.pid",
        f"SlurmctldPidFile={state_dir}/slurmctld.pid",
        f"SlurmctldLogFile={state_dir}/log/slurmctld.log",
        f"SlurmdLogFile={state_dir}/log/slurmd-%n.log",
    ]
    lines += [
        f"NodeName={n.name} NodeAddr={n.address} CPUs={len(n.cores)} RealMemory=1000 State=UNKNOWN"
        for n in nodes
    ]
    names = ",".join(n.name for n in nodes)
    lines.append(f"PartitionName={PARTITION} Nodes={names} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def is_ours(path: Path = CONF) -> bool:
    return path.exists() and path.read_text().startswith(MARK)
