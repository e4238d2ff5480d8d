"""One ``chexlib study`` per study folder at a time.

Two studies writing into the same run folders would run every notebook twice
and overwrite each other's results, so a study holds ``<study>/.study.lock``
(an ``flock``, as a TFRecord conversion holds its folder) while it runs. The
kernel releases an ``flock`` when its holder exits or is killed, so a dead study
never leaves a stale lock; the file's text names the holder for the error a
second study gets.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import os
import socket
from pathlib import Path

LOCK = ".study.lock"


class StudyLockError(RuntimeError):
    """Another process runs a study in this folder; the message names it."""


@contextlib.contextmanager
def study_lock(study_dir: str | Path):
    """Hold ``study_dir/.study.lock`` (made with its folder if missing) for the block.

    Raises:
        StudyLockError: another process holds it; names the folder, its host,
            process id and start time.
    """
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip()[:200] or "process unknown"
            raise StudyLockError(
                f"{study_dir}: another chexlib study is running in this folder ({holder}); "
                "wait for it to finish (rerun then to resume), or give another --outputs"
            ) from None
        os.ftruncate(fd, 0)
        since = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n".encode())
        yield path
    finally:
        os.close(fd)  # releases the lock
