"""What the data a run, a conversion or a cache reads looks like on disk, as one digest.

One rule for all three, so they agree on when data "changed": a file is stamped
by its name, size and modification time (one ``stat``, no pixel read), and the
metadata files (CSV and split lists) by their content. A replaced image or an
edited label changes the fingerprint; so does copying a dataset without keeping
modification times (``cp -a`` and ``rsync -a`` keep them).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from chexlib.data.metadata import TEST_LIST, TRAIN_VAL_LIST


def stamp(path: str) -> str:
    """``size mtime_ns`` of one file; ``missing`` when it is not there (reading it
    fails later, naming the file)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size} {st.st_mtime_ns}"


def file_stamp(path: str) -> str:
    """``path size mtime_ns``: changes when the file is replaced or rewritten."""
    return f"{path} {stamp(path)}"


def metadata_fingerprint(metadata) -> str:
    """sha256 of a loaded dataset: its metadata files' content and every listed image's stamp.

    ``metadata`` is :func:`chexlib.data.metadata.load_metadata`'s table (its
    ``attrs["csv"]`` names the CSV; the split lists sit beside it). An image
    listed without a file (``skip_bad``) counts as "missing". The bytes hashed
    are those of the manifests written so far, so their fingerprints still hold.
    """
    digest = hashlib.sha256()
    csv_path = Path(metadata.attrs["csv"])
    for path in (csv_path, csv_path.with_name(TRAIN_VAL_LIST), csv_path.with_name(TEST_LIST)):
        digest.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    for image, path in zip(metadata["image"], metadata["path"], strict=True):
        mark = stamp(path) if isinstance(path, str) else "missing"
        digest.update(f"{image}\0{mark.replace(' ', chr(0))}\n".encode())
    return digest.hexdigest()


def shards_fingerprint(records_dir, manifest: dict) -> str:
    """sha256 of a shard set: the manifest's shards (name, records, sha256) and each file's stamp."""
    digest = hashlib.sha256()
    for shard in manifest["shards"]:
        keys = (shard["file"], shard["records"], shard.get("sha256"))
        keys += (stamp(str(Path(records_dir) / shard["file"])),)
        digest.update("\0".join(map(str, keys)).encode() + b"\n")
    return digest.hexdigest()
