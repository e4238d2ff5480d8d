"""Nothing is open to the network that need not be: loopback binding, and a warning where
TensorFlow or Horovod cannot restrict the address.

Reachability is tested for real: a TCP connection to this machine's non-loopback
address (skipped when it has none), with a server bound to every interface as
the control that shows such a connection would succeed.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import psutil
import pytest

from chexlib.launch import engines, horovodrun

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # horovod.run ranks get code


def outside_or_none() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                return addr.address
    return None


def outside_address() -> str:
    """:func:`outside_or_none`, or skip the test."""
    address = outside_or_none()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    return address


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3):
        return True
    return False


def _plan(n: int = 2):
    from horovod.runner.common.util.hosts import get_host_assignments, parse_hosts

    return get_host_assignments(parse_hosts(f"localhost:{n}"), n)


def test_rendezvous_server_of_a_local_cluster_is_loopback_only():
    outside = outside_address()
    exposed = engines.RendezvousService(_plan(), host="")  # the control: every interface
    local = engines.RendezvousService(_plan())  # what HorovodCluster uses for local engines
    try:
        assert reachable(outside, exposed.address[1])
        assert local.address[0] == "127.0.0.1" and reachable("127.0.0.1", local.address[1])
        assert not reachable(outside, local.address[1])
    finally:
        exposed.stop()
        local.stop()


def _probe_servers(outside: str) -> dict:
    """In a rank: can the launcher's rendezvous and function servers be reached from outside?"""
    import contextlib
    import os
    import socket
    import sys

    def reachable(host, port):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3):
            return True
        return False

    ports = {
        "rendezvous": int(os.environ["HOROVOD_GLOO_RENDEZVOUS_PORT"]),
        "function": int(sys.argv[-1]),  # python -m horovod.runner.run_task ADDR PORT
    }
    return {
        name: (reachable("127.0.0.1", port), reachable(outside, port))
        for name, port in ports.items()
    }


@pytest.mark.slow
def test_horovod_run_servers_listen_on_loopback_only():
    outside = outside_address()
    (result,) = horovodrun.run_function(_probe_servers, args=(outside,), np=1, timeout=120)
    assert result == {"rendezvous": (True, False), "function": (True, False)}


def test_horovod_run_with_other_hosts_warns_that_its_servers_are_exposed(capsys):
    with horovodrun._horovod_servers_on_loopback("192.0.2.1:2"):  # TEST-NET: never this machine
        pass
    err = capsys.readouterr().err
    assert err.startswith(
        "warning: horovod.run's rendezvous and result servers: listening on every"
    )
    assert "private cluster network, or firewall it" in err


@pytest.mark.slow
def test_data_service_warns_that_it_listens_on_every_interface():
    """TensorFlow 2.15 binds tf.data service servers to 0.0.0.0 with no option to restrict
    them: ``chexlib data-service local`` must say so, naming the ports."""
    from chexlib.pipeline.dataservice import _read_line

    chexlib = Path(sys.executable).parent / "chexlib"
    proc = subprocess.Popen(
        [str(chexlib), "data-service", "local", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        started = _read_line(proc, 120)
        assert started.startswith("tf.data service: dispatcher grpc://"), started
        port = int(started.split()[3].rstrip(",").rpartition(":")[2])
        deadline, warning = time.monotonic() + 30, ""
        while not warning.startswith("warning:") and time.monotonic() < deadline:
            warning = _read_stderr_line(proc)
        assert warning.startswith("warning: the tf.data service listens on port(s) ")
        assert str(port) in warning and "private cluster network" in warning
        outside = outside_or_none()
        if outside:  # the exposure the warning is about is real
            assert reachable(outside, port)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()


def _read_stderr_line(proc) -> str:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    return proc.stderr.readline().strip() if sel.select(timeout=5) else ""
