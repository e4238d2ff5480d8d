"""A converted folder's ``manifest.json``: the one place it is named and read.

``chexlib convert`` writes the manifest last, so a folder with one holds a
finished shard set; its shards, record counts, digests, format and variant are
what every reader (input pipelines, checkpoints' data fingerprint, the summary's
input names, benchmarks) takes from it. No TensorFlow here: the summary reads it.
"""

from __future__ import annotations

from pathlib import Path

from chexlib.core.files import RecordError, read_json

MANIFEST = "manifest.json"
STATE_DIR = ".convert"  # a conversion's work in progress (see chexlib.records.convert)
_REQUIRED = ("shards", "splits", "format")


def read_manifest(records_dir) -> dict:
    """The manifest of a finished conversion in ``records_dir``.

    Raises:
        FileNotFoundError: no manifest (not a conversion, or not finished yet:
            the message says which).
        RecordError: the manifest is unreadable, or lacks ``shards``, ``splits``
            or ``format``; the message names the file.
    """
    path = Path(records_dir) / MANIFEST
    if not path.is_file():
        unfinished = (Path(records_dir) / STATE_DIR).is_dir()
        hint = (
            " (a conversion was started here but has not finished: rerun the same "
            "`chexlib convert` command to resume it)"
            if unfinished
            else ""
        )
        raise FileNotFoundError(
            f"{records_dir}: no {MANIFEST}; not a finished chexlib conversion{hint}"
        )
    manifest = read_json(path, expect=dict)
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise RecordError(f"{path}: not a chexlib manifest (no {', '.join(missing)})")
    return manifest


def manifest_if_any(records_dir) -> dict | None:
    """The manifest when ``records_dir`` has one, None when it has none; a manifest
    that is there but unreadable is an error (:func:`read_manifest`), never ignored."""
    if not (Path(records_dir) / MANIFEST).is_file():
        return None
    return read_manifest(records_dir)
