"""What ``chexlib cluster up`` created, kept in one place so ``down`` undoes exactly that.

The state file (:data:`STATE_DIR`/``state.json``) is an undo log: each thing is
recorded right after it is made (a namespace, a link, a line of ``/etc/hosts``,
a file, a daemon with its start time), and ``down`` undoes the log backwards.
Nothing that is not in the log is touched; a daemon whose pid now belongs to
another process (its start time differs) is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

STATE_DIR = Path(os.environ.get("CHEXLIB_CLUSTER_STATE", "/var/lib/chexlib-cluster"))
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# chexlib-cluster (LOCAL EMULATION)"


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot); None: no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return int(fields[19]) if fields[0] != "Z" else None  # a zombie has ended


class ClusterState:
    """The undo log of one cluster, written to ``dir/state.json`` after every change."""

    def __init__(self, directory: Path = STATE_DIR, data: dict | None = None):
        self.dir = Path(directory)
        self.data = data or {"created": [], "config": {}}

    @property
    def path(self) -> Path:
        return self.dir / "state.json"

    @classmethod
    def load(cls, directory: Path = STATE_DIR) -> ClusterState | None:
        """The recorded cluster, or None when there is none."""
        path = Path(directory) / "state.json"
        if not path.exists():
            return None
        return cls(directory, json.loads(path.read_text()))

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    @property
    def config(self) -> dict:
        return self.data["config"]

    def record(self, kind: str, **what) -> None:
        """Note one thing made (kinds: netns, link, hosts_line, file, dir, daemon)."""
        self.data["created"].append({"kind": kind, **what})
        self.save()

    def items(self, kind: str) -> list[dict]:
        return [c for c in self.data["created"] if c["kind"] == kind]

    def record_daemon(self, name: str, pid: int, node: str | None = None, log: str = "") -> None:
        self.record("daemon", name=name, pid=pid, started=start_time(pid), node=node, log=log)

    def daemons_alive(self) -> dict[str, bool]:
        """Each recorded daemon: whether it still runs (the same process, by start time)."""
        return {d["name"]: is_same_process(d) for d in self.items("daemon")}


def is_same_process(daemon: dict) -> bool:
    now = start_time(daemon["pid"])
    return now is not None and now == daemon["started"]


def stop_process(daemon: dict, grace: float = 3.0) -> None:
    """SIGTERM the recorded process if it is still the same one, SIGKILL after ``grace`` s."""
    if not is_same_process(daemon):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(daemon["pid"], signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and is_same_process(daemon):
        time.sleep(0.05)
    if is_same_process(daemon):
        with contextlib.suppress(ProcessLookupError):
            os.kill(daemon["pid"], signal.SIGKILL)


def add_hosts_lines(state: ClusterState, lines: list[str]) -> None:
    """Append ``lines`` (marked as ours) to /etc/hosts, each recorded."""
    text = HOSTS_FILE.read_text() if HOSTS_FILE.exists() else ""
    for line in lines:
        marked = f"{line}  {HOSTS_MARK}"
        if marked not in text.splitlines():
            with HOSTS_FILE.open("a") as f:
                f.write(("" if text.endswith("\n") or not text else "\n") + marked + "\n")
            text = HOSTS_FILE.read_text()
            state.record("hosts_line", line=marked)


def remove_hosts_line(line: str) -> None:
    """Drop exactly ``line`` from /etc/hosts (in place: it may be a bind mount)."""
    if not HOSTS_FILE.exists():
        return
    lines = HOSTS_FILE.read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if ln.rstrip("\n") != line]
    if len(kept) != len(lines):
        with HOSTS_FILE.open("r+") as f:  # rewrite, not replace: keep the inode
            f.write("".join(kept))
            f.truncate()
