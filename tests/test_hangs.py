"""Nothing hangs: a stuck, raising or dying rank ends the launch with a LaunchError naming it.

Real processes only: ``horovod.run`` ranks and ipyparallel engines on this
machine, each test bounded well under a minute.
"""

from __future__ import annotations

import os
import sys
import time

import cloudpickle
import pytest

from chexlib.launch import engines, horovodrun, launcher, processes

# Horovod sends functions to its ranks with cloudpickle; the ranks cannot import
# this test module, so its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _hang_on_rank_1():
    """Rank 1 stalls (as on a dead NFS mount); rank 0 finishes."""
    import os
    import time

    if os.environ["HOROVOD_RANK"] == "1":
        while True:
            time.sleep(1)
    return "rank 0 done"


def _fail_on_rank_1(how: str):
    import os

    if os.environ["HOROVOD_RANK"] == "1":
        if how == "raise":
            raise ValueError("rank 1 failed on purpose")
        os._exit(17)  # dies without a word
    return "ok"


def _for_engines(fn):
    """ipyparallel sends a module function by name; a ``__main__`` one travels as code."""
    fn.__module__ = "__main__"
    return fn


@_for_engines
def _raise_on_rank_0():
    """Rank 0 raises; rank 1 then waits for it in an allreduce, forever."""
    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()
    if hvd.rank() == 0:
        raise ValueError("rank 0 failed on purpose")
    return float(hvd.allreduce(tf.constant(1.0)).numpy())


@_for_engines
def _sleep_on_rank_1():
    """Rank 1 never returns (its engine set HOROVOD_RANK when the cluster was wired)."""
    import os
    import time

    while os.environ["HOROVOD_RANK"] == "1":
        time.sleep(0.5)
    return "done"


def test_launch_config_timeout_applies_to_every_mode():
    for mode in launcher.MODES:
        assert launcher.LaunchConfig(mode=mode, timeout=30).timeout == 30
    with pytest.raises(ValueError, match="timeout must be > 0"):
        launcher.LaunchConfig(timeout=0)


def test_stack_summary_shows_the_main_thread():
    dump = (
        "Thread 0x00007f01 (most recent call first):\n"
        '  File "/x/threading.py", line 320 in wait\n\n'
        "Current thread 0x00007f00 (most recent call first):\n"
        '  File "/x/job.py", line 7 in stall\n'
        '  File "/x/job.py", line 12 in main\n'
    )
    assert (
        processes._where(dump)
        == 'File "/x/job.py", line 7 in stall\n      File "/x/job.py", line 12 in main'
    )


# The timeout tests assert what the launcher decided (the timeout fired, and not before
# its time: Event.wait and the monotonic deadline never end early; which ranks it stopped
# and where they were), not how fast a loaded machine got there. A launch that does not
# end fails on the test's own deadline (pytest-timeout): 300 s, over 10x the 16-25 s each
# takes on 2 idle cores.


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_horovod_run_names_the_rank_that_hangs():
    start = time.monotonic()
    with pytest.raises(processes.LaunchError) as err:
        horovodrun.run_function(_hang_on_rank_1, np=2, timeout=15)
    assert time.monotonic() - start >= 15  # the watchdog, not a failure, ended it
    message = str(err.value)
    assert "horovod.run: timed out after 15 s; rank(s) still running: 1 (stopped)" in message
    assert "Ranks that had ended: 0" in message
    assert "in _hang_on_rank_1" in message  # the line rank 1 was stuck on, from its stack
    assert processes.rank_processes(os.getpid()) == {}  # nothing left running


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "how, expected",
    [
        ("raise", "rank 1 raised ValueError: rank 1 failed on purpose"),
        ("exit", "rank 1 exited first, with status 17"),
    ],
)
def test_horovod_run_names_a_rank_that_raises_or_dies(how, expected):
    with pytest.raises(processes.LaunchError) as err:
        horovodrun.run_function(_fail_on_rank_1, args=(how,), np=2, timeout=120)
    # ended by rank 1's failure, not by the 120 s timeout (a timeout's message starts
    # "horovod.run: timed out")
    assert str(err.value).startswith("horovod.run failed: ")
    assert expected in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_horovod_run_returns_every_rank_result_within_its_timeout():
    assert horovodrun.run_function(_fail_on_rank_1, args=("never",), np=1, timeout=60) == ["ok"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ipyparallel_rank_0_raising_is_named_and_the_other_rank_stopped():
    with engines.HorovodCluster(n=2) as cluster:
        assert cluster.server.address[0] == "127.0.0.1"  # local engines: loopback only
        with pytest.raises(processes.LaunchError) as err:
            cluster.run(_raise_on_rank_0, timeout=120)
    message = str(err.value)
    # ended by rank 0's failure, not by the 120 s timeout (rank 1 waits in its allreduce
    # forever): a timeout's message starts "HorovodCluster: timed out"
    assert message.startswith("HorovodCluster: rank 0 failed first (a rank raised or died)")
    assert "rank 0: ValueError: rank 0 failed on purpose" in message
    assert "stopped rank(s) 1" in message  # it was waiting in the allreduce


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ipyparallel_timeout_names_the_stuck_rank_with_its_stack():
    with engines.HorovodCluster(n=2) as cluster:
        start = time.monotonic()
        with pytest.raises(processes.LaunchError) as err:
            cluster.run(_sleep_on_rank_1, timeout=10)
        waited = time.monotonic() - start
    assert waited >= 10  # the deadline, not a failure, ended it
    message = str(err.value)
    assert "HorovodCluster: timed out after 10 s; rank(s) still running: 1 (stopped)" in message
    assert "in _sleep_on_rank_1" in message  # from rank 1's stack
