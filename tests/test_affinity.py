"""chexlib.train.affinity: each rank on its own cores, every thread of the process pinned."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chexlib.train import affinity

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")


def test_rank_cores_are_disjoint_blocks():
    cores = [0, 1, 2, 3, 8, 9]
    assert affinity.rank_cores(0, 3, 2, cores) == [0, 1]
    assert affinity.rank_cores(2, 3, 2, cores) == [8, 9]
    with pytest.raises(affinity.AffinityError, match="needs 8 cores; this process may use 6"):
        affinity.rank_cores(0, 4, 2, cores)
    with pytest.raises(affinity.AffinityError, match=">= 1"):
        affinity.rank_cores(0, 1, 0, cores)


def test_pin_process_pins_threads_started_before_and_after():
    """A thread running before the pin (like Horovod's background thread) is pinned too."""
    code = """
import os, threading, time
from pathlib import Path
from chexlib.train import affinity
stop = threading.Event()
before = threading.Thread(target=stop.wait); before.start()
target = affinity.available_cores()[-1:]
affinity.pin_process(target)
after = threading.Thread(target=stop.wait); after.start()
seen = {int(t.name): sorted(os.sched_getaffinity(int(t.name))) for t in Path('/proc/self/task').iterdir()}
stop.set()
print(len(seen), all(v == target for v in seen.values()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    threads, all_pinned = out.stdout.split()
    assert int(threads) >= 3 and all_pinned == "True"


def test_tensorflow_threads_follow_the_pin():
    code = """
from chexlib.train import affinity
affinity.set_tensorflow_threads(1)
import tensorflow as tf
tf.constant(1) + 1  # starts the runtime with those pools
print(tf.config.threading.get_intra_op_parallelism_threads(),
      tf.config.threading.get_inter_op_parallelism_threads())
try:
    affinity.set_tensorflow_threads(2)
except affinity.AffinityError as err:
    print("refused:", "already started" in str(err))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "1 1" and lines[1] == "refused: True"
