"""Workarounds for Horovod 0.28.1's launcher, pinned to the upstream behaviour they answer."""

from __future__ import annotations

import os

from chexlib.train import process


def test_non_numeric_horovod_tuning_variables_are_dropped(monkeypatch):
    monkeypatch.setenv("HOROVOD_CYCLE_TIME", "(None,)")
    monkeypatch.setenv("HOROVOD_CACHE_CAPACITY", "1024")
    process.drop_bad_horovod_env()
    assert "HOROVOD_CYCLE_TIME" not in os.environ
    assert os.environ["HOROVOD_CACHE_CAPACITY"] == "1024"


def test_horovod_run_still_sends_tuples_as_tuning_values():
    """The upstream defect the workaround exists for (a stray comma in ``_HorovodArgs``):
    when a Horovod release fixes it, this fails and the workaround can go."""
    from horovod.runner import _HorovodArgs

    args = _HorovodArgs()
    assert args.cycle_time_ms == (None,) and args.cache_capacity == (None,)
