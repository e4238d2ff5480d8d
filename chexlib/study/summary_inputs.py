"""What a collecting run (the summary) read: a digest of a study's run records.

The runner keeps it in the collecting run's ``run.json`` when the run starts and
compares it with the records there now: a record edited, deleted or added since
makes the complete summary stale, so it is rebuilt rather than reported as done.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

# The files of a run folder a collection reads (chexlib.core.runs.collect_runs).
READ = ("run.json", "params.json", "metrics.json")


def inputs_digest(study_dir: str | Path, own_dir: str | Path) -> str:
    """sha256 over each run folder of ``study_dir`` (``<stage>/<run>/`` with a
    ``run.json``; not ``own_dir`` or below it) and the bytes of its :data:`READ`
    files, a missing one marked as missing."""
    own_dir = Path(own_dir)
    digest = hashlib.sha256()
    for marker in sorted(Path(study_dir).glob("*/*/run.json")):
        folder = marker.parent
        if folder == own_dir or own_dir in folder.parents:
            continue
        digest.update(f"{folder.parent.name}/{folder.name}\0".encode())
        for name in READ:
            try:
                digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
            except FileNotFoundError:
                digest.update(b"missing\0")
    return digest.hexdigest()
