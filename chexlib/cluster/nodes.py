"""The emulated nodes: one network namespace each, joined by a bridge on the host.

Node ``nodeK`` is the namespace ``nodeK`` (``/var/run/netns/nodeK``) whose end of
a veth pair is named ``eth0`` with address ``SUBNET.(10+K)``; the host's end
(``chex-nodeK``) is a port of the bridge :data:`BRIDGE` (``SUBNET.1``, also the
nodes' default route, so they reach the host's own addresses). Names go to
/etc/hosts. ``--link-rate`` shapes both directions of each node's link with a
token bucket (``tc ... tbf``; this kernel has no ``netem``). Each node gets its
own cores: its daemons, and everything they start, run with that affinity.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from chexlib.cluster.commands import ClusterError, run
from chexlib.cluster.state import HOSTS_FILE, HOSTS_MARK, ClusterState, add_hosts_lines

BRIDGE = "chexbr0"
SUBNET = "10.10.0.0/24"
NETNS_DIR = Path("/var/run/netns")
NODE_IFACE = "eth0"  # each node's interface, as on a real node: --network-interface eth0


@dataclass(frozen=True)
class Node:
    name: str  # node1 .. nodeN: hostname, namespace and Slurm NodeName
    address: str
    veth: str  # the host's end of its link
    cores: tuple[int, ...]  # the host's CPUs its processes run on

    def to_dict(self) -> dict:
        return {**asdict(self), "cores": list(self.cores)}

    @classmethod
    def from_dict(cls, d: dict) -> Node:
        return cls(d["name"], d["address"], d["veth"], tuple(d["cores"]))

    @property
    def netns(self) -> str:
        return str(NETNS_DIR / self.name)


def controller_address(subnet: str = SUBNET) -> str:
    return str(next(ipaddress.ip_network(subnet).hosts()))


def plan_nodes(count: int, cores_per_node: int, subnet: str = SUBNET) -> list[Node]:
    """``count`` nodes, each with ``cores_per_node`` of this process's CPUs, in turn
    (more cores asked than exist: they wrap around and nodes share cores)."""
    if not 1 <= count <= 200:
        raise ClusterError(f"--nodes must be 1..200, not {count}")
    cpus = sorted(os.sched_getaffinity(0))
    if not 1 <= cores_per_node <= len(cpus):
        raise ClusterError(
            f"--cores-per-node must be 1..{len(cpus)} (this machine), not {cores_per_node}"
        )
    base = ipaddress.ip_network(subnet).network_address
    return [
        Node(
            name=f"node{k}",
            address=str(base + 10 + k),
            veth=f"chex-node{k}",
            cores=tuple(
                cpus[((k - 1) * cores_per_node + j) % len(cpus)] for j in range(cores_per_node)
            ),
        )
        for k in range(1, count + 1)
    ]


def check_free(nodes: list[Node], subnet: str = SUBNET) -> None:
    """Refuse when a name or address the cluster would take is already someone else's."""
    taken = [n.name for n in nodes if Path(n.netns).exists()]
    taken += [
        name
        for name in (BRIDGE, *(n.veth for n in nodes))
        if Path(f"/sys/class/net/{name}").exists()
    ]
    if taken:
        raise ClusterError(f"already exist and are not this cluster's: {', '.join(taken)}")
    net = ipaddress.ip_network(subnet)
    used = [a for a in run(["ip", "-o", "-4", "addr", "show"]).split() if "/" in a]
    clash = [a for a in used if _in(a, net)]
    if clash:
        raise ClusterError(
            f"subnet {subnet} is already in use on this machine ({', '.join(clash)})"
        )
    names = {n.name for n in nodes}
    for line in HOSTS_FILE.read_text().splitlines() if HOSTS_FILE.exists() else []:
        words = line.split("#")[0].split()
        if names & set(words[1:]) and HOSTS_MARK not in line:
            raise ClusterError(f"{HOSTS_FILE} already names {' '.join(words[1:])}: {line.strip()}")


def _in(cidr: str, net) -> bool:
    try:
        return ipaddress.ip_interface(cidr).ip in net
    except ValueError:
        return False


def create_network(state: ClusterState, nodes: list[Node], link_rate: str | None) -> None:
    """The bridge, one namespace and link per node, addresses, routes, shaping, names."""
    ctl, prefix = controller_address(), ipaddress.ip_network(SUBNET).prefixlen
    run(["ip", "link", "add", BRIDGE, "type", "bridge"])
    state.record("link", name=BRIDGE)
    run(["ip", "addr", "add", f"{ctl}/{prefix}", "dev", BRIDGE])
    run(["ip", "link", "set", BRIDGE, "up"])
    for node in nodes:
        run(["ip", "netns", "add", node.name])
        state.record("netns", name=node.name)
        run(
            [
                "ip",
                "link",
                "add",
                node.veth,
                "type",
                "veth",
                "peer",
                "name",
                NODE_IFACE,
                "netns",
                node.name,
            ]
        )
        state.record("link", name=node.veth)
        run(["ip", "link", "set", node.veth, "master", BRIDGE, "up"])
        inside = ["ip", "-n", node.name]
        run([*inside, "addr", "add", f"{node.address}/{prefix}", "dev", NODE_IFACE])
        run([*inside, "link", "set", "lo", "up"])
        run([*inside, "link", "set", NODE_IFACE, "up"])
        run([*inside, "route", "add", "default", "via", ctl])
        if link_rate:
            shape(node, link_rate)
    add_hosts_lines(state, [f"{n.address} {n.name}" for n in nodes])


def _on_host(args: list[str]) -> list[str]:
    """``args`` run in the host's network namespace, where the links' host ends are: as
    they are from there, through ``nsenter`` from inside a node (a Slurm job's shell)."""
    if run(["ip", "-o", "link", "show", BRIDGE], check=False).strip():
        return args
    state = ClusterState.load()
    host = [d for d in (state.items("daemon") if state else []) if d.get("node") is None]
    if not host:  # munged and slurmctld run in the host's namespace
        raise ClusterError(f"{BRIDGE} is not in this network namespace and no host daemon runs")
    return ["nsenter", f"--net=/proc/{host[0]['pid']}/ns/net", *args]


def shape(node: Node, rate: str) -> None:
    """Both directions of ``node``'s link at ``rate`` (tc units: 1gbit, 100mbit)."""
    tbf = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    run(_on_host(["tc", "qdisc", "replace", "dev", node.veth, *tbf]))  # host -> node
    run(["tc", "-n", node.name, "qdisc", "replace", "dev", NODE_IFACE, *tbf])  # node -> host


def unshape(node: Node) -> None:
    """Both directions of ``node``'s link back to the unshaped default (no tbf)."""
    if link_rate_now(node) is not None:
        run(_on_host(["tc", "qdisc", "del", "dev", node.veth, "root"]))
    inside = run(["tc", "-n", node.name, "qdisc", "show", "dev", NODE_IFACE], check=False)
    if "tbf" in inside.split():
        run(["tc", "-n", node.name, "qdisc", "del", "dev", NODE_IFACE, "root"])


def link_rate_now(node: Node) -> str | None:
    """The rate ``tc`` shapes ``node``'s link to, or None (unshaped)."""
    out = run(_on_host(["tc", "qdisc", "show", "dev", node.veth]), check=False)
    words = out.split()
    return words[words.index("rate") + 1] if "tbf" in words and "rate" in words else None


def processes_in(node: str) -> list[int]:
    """Pids of every process in ``node``'s network namespace (``ip netns pids``)."""
    out = run(["ip", "netns", "pids", node], check=False)
    return [int(p) for p in out.split() if p.isdigit()]


def remove(kind: str, name: str) -> None:
    """Undo one recorded network item; gone already is fine."""
    if kind == "netns" and Path(NETNS_DIR / name).exists():
        run(["ip", "netns", "delete", name])
    elif kind == "link" and Path(f"/sys/class/net/{name}").exists():
        run(["ip", "link", "delete", name])
