"""One ``chexlib study`` per study folder at a time.

Two studies writing into the same run folders would run every notebook twice
and overwrite each other's results, so a study holds ``<study>/.study.lock``
(an ``flock``, as a TFRecord conversion holds its folder) while it runs. The
kernel releases an ``flock`` when its holder exits or is killed, so a dead study
never leaves a stale lock; the file's text names the holder for the error a
second study gets.
"""

from __future__ import annotations

from pathlib import Path

from chexlib.core.files import folder_lock

LOCK = ".study.lock"


class StudyLockError(RuntimeError):
    """Another process runs a study in this folder; the message names it."""


def study_lock(study_dir: str | Path):
    """Hold ``study_dir/.study.lock`` (made with its folder if missing) for the block
    (:func:`chexlib.core.files.folder_lock`).

    Raises:
        StudyLockError: another process holds it; names the folder, its host,
            process id and start time.
    """
    return folder_lock(study_dir, LOCK, lambda holder: StudyLockError(
        f"{study_dir}: another chexlib study is running in this folder ({holder}); "
        "wait for it to finish (rerun then to resume), or give another --outputs"
    ))  # fmt: skip
