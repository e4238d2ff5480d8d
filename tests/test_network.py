"""Nothing is open to the network that need not be: loopback binding, and a warning where
TensorFlow or Horovod cannot restrict the address.

Reachability is tested for real: a TCP connection to this machine's non-loopback
address (skipped when it has none, failed in CI, which has one), with a server
bound to every interface as the control that shows such a connection succeeds.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from pathlib import Path

import cloudpickle
import psutil
import pytest
from conftest import OutputLines, kill_tree, require

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
    """:func:`outside_or_none`, or skip the test (fail it in CI)."""
    __tracebackhide__ = True  # a skip is reported at the test's line
    address = outside_or_none()
    require(address is not None, "this machine has no non-loopback IPv4 address to connect from")
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


def _probe_servers(outside: str, control_port: int) -> dict:
    """In a rank: can the launcher's rendezvous and function servers be reached from outside?
    And the control, the test's server on every interface, which must be."""
    import contextlib
    import os
    import socket
    import sys

    def reachable(host, port):
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=3):
            return True
        return False

    ports = {
        "control": control_port,
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
    with socket.create_server(("0.0.0.0", 0)) as control:  # the control: every interface
        port = control.getsockname()[1]
        (result,) = horovodrun.run_function(_probe_servers, args=(outside, port), np=1, timeout=120)
    # without it, an address no rank can reach would pass servers listening everywhere
    assert result.pop("control") == (True, True), (
        f"a server on every interface is not reachable at {outside} from a rank: "
        "that address cannot tell loopback-only servers from exposed ones"
    )
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
    outside = outside_address()
    chexlib = Path(sys.executable).parent / "chexlib"
    proc = subprocess.Popen(
        [str(chexlib), "data-service", "local", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out = OutputLines(proc, name="chexlib data-service local (stdout)")
    err = OutputLines(proc, proc.stderr, name="chexlib data-service local (stderr)")
    try:
        # it waits up to 120 s for each of its 2 servers to start, then prints the address
        started = out.next(300, "the line with the dispatcher's address")
        assert started is not None, f"it ended (exit {proc.poll()}) without printing an address"
        assert started.startswith("tf.data service: dispatcher grpc://"), started
        port = int(started.split()[3].rstrip(",").rpartition(":")[2])
        warning = err.until(lambda line: line.startswith("warning:"), 30, "its warning")
        assert warning.startswith("warning: the tf.data service listens on port(s) ")
        assert str(port) in warning and "private cluster network" in warning
        assert reachable(outside, port)  # the exposure the warning is about is real
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            raise
