"""Converting a dataset to sharded TFRecords: the driver, its manifest, and ``chexlib convert``.

:func:`convert` takes the output folder (one conversion per folder at a time:
:func:`conversion_lock`), plans the shards, has worker processes write them
(:mod:`chexlib.records.shards`: settings, plan and the worker) and writes the
manifest last. The two variants (png, compact) are described in
:mod:`chexlib.records.read`, which reads the result back.

Layout of an output folder::

    OUT_DIR/
      train-00000-of-00305.tfrecord   one set of shards per split
      ...
      manifest.json                   written last: settings, source fingerprint,
                                      per shard records/bytes/sha256, totals, skips
      .convert/                       state of the conversion: settings.json and one
                                      sidecar per finished shard (used to resume)
      .convert.lock                   locked while a conversion runs; names its process

Every source image is fully decoded during conversion, in both variants, so a
missing or corrupt file stops the run with its name; with ``skip_bad`` it is
left out instead and listed in the manifest with its reason, and the per-split
totals count it (records + skipped = images listed).

Every image is in exactly one shard, dealt round-robin. A rerun of the same
command resumes: a shard is reused only when its sidecar carries the same run
key (settings + source fingerprint) and the file's sha256 still matches; an
output folder from other settings or another dataset is refused
(``overwrite=True`` deletes it). The same input and settings give
byte-identical shards for any number of workers.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import multiprocessing as mp
import queue
import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

from chexlib import __version__
from chexlib.core.files import folder_lock, read_json, write_json
from chexlib.core.flags import add_flags, config_from_args, option
from chexlib.core.machine import usable_cores, versions
from chexlib.data.fingerprint import metadata_fingerprint
from chexlib.data.metadata import MODEL_INPUT_SIZE, SPLITS, load_metadata
from chexlib.records.manifest import MANIFEST, STATE_DIR
from chexlib.records.schema import SCHEMA, SCHEMA_VERSION
from chexlib.records.shards import (
    COMPACT_FORMATS,
    DEFAULT_COMPACT_FORMAT,
    LOCK,
    RESAMPLE,
    VARIANTS,
    ConvertSettings,
    RecordsError,
    init_worker,
    plan_shards,
    write_shard,
)

# --- the output folder: run key, claim, lock --------------------------------------


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def run_state(settings: ConvertSettings, df, data_dir) -> dict:
    """What identifies a run: its key (sha256 of settings + source fingerprint) and its parts.

    Kept in ``.convert/settings.json``: a rerun with the same key resumes.
    """
    fingerprint = metadata_fingerprint(df)
    return {
        "key": _sha256_json({"settings": settings.to_dict(), "fingerprint": fingerprint}),
        "settings": settings.to_dict(),
        "fingerprint": fingerprint,
        "data_dir": str(Path(data_dir).resolve()),
    }


def _describe_change(old: dict, new: dict) -> str:
    changes = [
        f"{k}: {old.get('settings', {}).get(k)!r} -> {v!r}"
        for k, v in new["settings"].items()
        if old.get("settings", {}).get(k) != v
    ]
    if old.get("fingerprint") != new["fingerprint"]:
        changes.append(
            f"source dataset fingerprint: {str(old.get('fingerprint'))[:12]} -> {new['fingerprint'][:12]}"
        )
    return "; ".join(changes) or "unknown origin (no .convert/settings.json)"


def _ours(out: Path) -> list[Path]:
    """Files a conversion writes into ``out`` (what overwrite deletes)."""
    return sorted(out.glob("*.tfrecord")) + [
        p for p in (out / MANIFEST, out / STATE_DIR) if p.exists()
    ]


def conversion_lock(out: Path):
    """Hold ``OUT/.convert.lock`` for a whole conversion: one per folder at a time
    (:func:`chexlib.core.files.folder_lock`).

    Raises:
        RecordsError: another process holds the lock; names it.
    """
    return folder_lock(out, LOCK, lambda holder: RecordsError(
        f"{out}: another conversion is writing into this folder ({holder}); wait for "
        "it to finish (rerun the same command to resume), or choose another folder"
    ))  # fmt: skip


def _claim(out: Path, state: dict, overwrite: bool) -> None:
    """Make ``out`` ours for this run: resume the same run, refuse (or wipe) another's."""

    marker = out / STATE_DIR / "settings.json"
    try:
        previous = read_json(marker)
    except (OSError, ValueError):
        previous = None
    found = _ours(out) if out.is_dir() else []
    if previous is not None and previous.get("key") == state["key"]:
        for tmp in (out / STATE_DIR).glob("*.tmp"):  # left by a killed run
            tmp.unlink()
    elif found:
        if not overwrite:
            raise RecordsError(
                f"{out} holds TFRecords of a different conversion ({_describe_change(previous or {}, state)}); "
                "its shards are never reused. Choose another output folder, or pass --overwrite "
                "(overwrite=True) to delete them."
            )
        for path in found:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / MANIFEST).unlink(missing_ok=True)  # the set is incomplete until the end
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    write_json(marker, state)


# --- the worker processes ---------------------------------------------------------


def _drain(progress_queue, bar) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _pool_context():
    """Worker processes that start from a clean interpreter, cheaply.

    Not ``fork``: the caller may have imported TensorFlow, whose threads do not
    survive a fork. ``forkserver`` starts one clean server that imports the
    workers' module once and forks each worker from it, so a worker costs
    milliseconds instead of a fresh interpreter's imports (which, on small
    datasets, would eat much of the parallel speed-up); ``spawn`` where there
    is no forkserver.
    """
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([write_shard.__module__])
        return ctx
    return mp.get_context("spawn")


def _run_jobs(
    jobs, settings, out: Path, key: str, skip_bad: bool, workers: int, progress: bool
) -> list[dict]:
    """Write the shards over a process pool; each worker writes whole shards."""
    from tqdm.auto import tqdm

    ctx = _pool_context()
    progress_queue = ctx.Queue()
    results = []
    bar = tqdm(
        total=sum(len(j.items) for j in jobs),
        unit="img",
        desc=f"convert {settings.variant}",
        disable=not progress,
    )
    with (
        bar,
        ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=init_worker, initargs=(progress_queue,)
        ) as pool,
    ):
        # Largest shards first, so no worker is left with a big one at the end.
        by_size = sorted(jobs, key=lambda j: -len(j.items))
        pending = {pool.submit(write_shard, j, settings, str(out), key, skip_bad) for j in by_size}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                _drain(progress_queue, bar)
                results.extend(f.result() for f in done)  # re-raises a worker's error
        except BaseException:
            for f in pending:
                f.cancel()  # running shards still finish (and stay valid for a rerun)
            raise
        bar.update(bar.total - bar.n)
    return results


# --- the conversion ---------------------------------------------------------------


def convert(
    data_dir,
    out_dir,
    variant: str = "png",
    images_per_shard: int = 256,
    shards: int | None = None,
    workers: int | None = None,
    size: int = MODEL_INPUT_SIZE,
    skip_bad: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    compact_format: str = DEFAULT_COMPACT_FORMAT,
    jpeg_quality: int = 95,
    overwrite: bool = False,
) -> dict:
    """Convert a dataset in the NIH layout to sharded TFRecords (see the module docstring).

    Args:
        data_dir: dataset folder (``chexlib.data.metadata.load_metadata`` layout).
        out_dir: output folder: new, empty, or an earlier run of the same
            settings and data (resumed: valid shards are kept). One
            conversion per folder at a time (a second one is refused).
        variant: ``"png"`` (original bytes) or ``"compact"`` (resized once).
        images_per_shard: most records per shard (default 256).
        shards: shards per split instead of ``images_per_shard``.
        workers: processes writing shards (default: all usable cores); does
            not change the output.
        size: compact: stored width and height (default 224, the training size).
        skip_bad: leave out missing or corrupt images, listing each with its
            reason in the manifest, instead of stopping at the first.
        val_fraction: validation fraction of train_val, by patient.
        seed: seed of the validation split.
        progress: show a progress bar over images.
        compact_format: compact: ``"raw"`` (default) or ``"jpeg"``.
        jpeg_quality: compact JPEG quality.
        overwrite: delete the TFRecords of a different conversion in ``out_dir``.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``).

    Raises:
        DataError: bad metadata, or a listed image missing (without skip_bad).
        RecordsError: a source image does not decode (without skip_bad),
            ``out_dir`` holds another conversion (without overwrite), or
            another process is converting into ``out_dir`` right now.
    """
    start = time.perf_counter()
    settings = ConvertSettings(
        variant, images_per_shard, shards, size, compact_format, jpeg_quality, val_fraction, seed
    )
    df = load_metadata(data_dir, val_fraction=val_fraction, seed=seed, allow_missing=skip_bad)
    out, state = Path(out_dir), run_state(settings, df, data_dir)
    with conversion_lock(out):
        _claim(out, state, overwrite)
        return _write_all(out, settings, df, state, start, workers, skip_bad, progress)


def _write_all(out: Path, settings, df, state: dict, start, workers, skip_bad, progress) -> dict:
    """Under the lock: write (or reuse) every shard, then the manifest; return the manifest.

    ``start`` is the ``perf_counter`` at the start of :func:`convert`; ``workers``
    is capped at one per shard.
    """

    jobs = plan_shards(df, settings)
    workers = max(1, min(int(workers or usable_cores()), len(jobs) or 1))
    infos = (
        _run_jobs(jobs, settings, out, state["key"], skip_bad, workers, progress) if jobs else []
    )
    run = {"seconds": time.perf_counter() - start, "workers": workers, "skip_bad": skip_bad}
    manifest = build_manifest(settings, df, state["fingerprint"], state["key"], infos, run)
    write_json(out / MANIFEST, manifest)
    return manifest


# --- the manifest -----------------------------------------------------------------


def build_manifest(
    settings: ConvertSettings, df, fingerprint: str, key: str, infos: list[dict], run: dict
) -> dict:
    """The manifest: settings, source, per-shard facts, per-split totals, every skip."""

    order = {s: i for i, s in enumerate(SPLITS)}
    infos = sorted(infos, key=lambda i: (order[i["split"]], i["index"]))
    skipped = _all_skipped(df, infos)
    splits = _split_totals(df, infos, skipped)
    totals = {
        k: sum(s[k] for s in splits.values())
        for k in ("images", "records", "skipped", "shards", "bytes")
    }
    return {
        "complete": True,
        "variant": settings.variant,
        "format": settings.image_format,
        "size": settings.size if settings.variant == "compact" else None,
        "resample": RESAMPLE if settings.variant == "compact" else None,
        "schema_version": SCHEMA_VERSION,
        "settings": {**settings.to_dict(), "skip_bad": run["skip_bad"]},
        "key": key,
        "source": {
            "data_dir": str(Path(df.attrs["csv"]).parent),
            "csv": Path(df.attrs["csv"]).name,
            "fingerprint": fingerprint,
            "images": len(df),
        },
        "splits": splits,
        "totals": totals,
        "shards": [
            {k: i[k] for k in ("file", "split", "index", "records", "bytes", "sha256")}
            for i in infos
        ],
        "skipped": skipped,
        "schema": SCHEMA,
        "conversion": _conversion_facts(infos, totals, run),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": {**versions(), "chexlib": __version__},
    }


def _all_skipped(df, infos: list[dict]) -> list[dict]:
    """Every image left out: missing when the metadata was loaded, then bad in a shard."""
    split_of = dict(zip(df["image"], df["split"], strict=True))
    skipped = [
        {"image": e["image"], "split": split_of[e["image"]], "reason": e["reason"]}
        for e in df.attrs.get("excluded", [])
    ]
    return skipped + [s for i in infos for s in i["skipped"]]


def _split_totals(df, infos: list[dict], skipped: list[dict]) -> dict:
    """Per split: images listed, records, skipped, shards and bytes.

    Raises:
        RecordsError: a split's records + skipped differ from its images.
    """
    splits = {}
    for split in SPLITS:
        mine = [i for i in infos if i["split"] == split]
        images = int((df["split"] == split).sum())
        records = sum(i["records"] for i in mine)
        n_skipped = sum(s["split"] == split for s in skipped)
        if records + n_skipped != images:  # every image counted in or out
            raise RecordsError(
                f"{split}: {records} records + {n_skipped} skipped != {images} images"
            )
        splits[split] = {
            "images": images,
            "records": records,
            "skipped": n_skipped,
            "shards": len(mine),
            "bytes": sum(i["bytes"] for i in mine),
        }
    return splits


def _conversion_facts(infos: list[dict], totals: dict, run: dict) -> dict:
    """How the run went: seconds, workers, images/s, shards written and reused, worker CPU."""
    seconds = run["seconds"]
    return {
        "seconds": round(seconds, 3),
        "workers": run["workers"],
        "images_per_second": round(totals["records"] / seconds, 2) if seconds > 0 else None,
        "shards_written": sum(not i["reused"] for i in infos),
        "shards_reused": sum(bool(i["reused"]) for i in infos),
        # CPU time of the workers on written shards: against workers x seconds it shows
        # how much of the cores the conversion got (other load on the machine shows here).
        "worker_cpu_seconds": round(sum(i.get("cpu_seconds", 0.0) for i in infos), 3),
    }


# --- command line -----------------------------------------------------------------


@dataclass(frozen=True)
class ConvertCommand:
    """One ``chexlib convert`` call: the :func:`convert` arguments (two positional, the rest flags)."""

    data_dir: str = option("dataset folder in the NIH ChestX-ray14 layout", positional=True)
    out_dir: str = option(
        "output folder (new, or an interrupted run of the same command)", positional=True
    )
    variant: str = option(
        "png: original file bytes; compact: decoded and resized once",
        default="png",
        choices=VARIANTS,
    )
    images_per_shard: int = option("most records per shard", default=256, exclusive="shard_size")
    shards: int | None = option(
        "shards per split instead of --images-per-shard", default=None, exclusive="shard_size"
    )
    workers: int | None = option("processes writing shards; None: all cores", default=None)
    size: int = option(
        "compact: stored width and height, the training input: read without a resize",
        default=MODEL_INPUT_SIZE,
    )
    compact_format: str = option(
        "compact: raw uint8 or JPEG", default=DEFAULT_COMPACT_FORMAT, choices=COMPACT_FORMATS
    )
    jpeg_quality: int = option("compact JPEG quality", default=95)
    skip_bad: bool = option(
        "leave out missing/corrupt images (listed in the manifest) instead of stopping",
        default=False,
    )
    val_fraction: float = option("validation fraction", default=0.1)
    seed: int = option("seed of the validation split", default=0)
    overwrite: bool = option(
        "delete TFRecords of a different conversion found in OUT_DIR", default=False
    )
    progress: bool = option("hide the progress bar", default=True)  # the switch is --no-progress


def add_arguments(parser) -> None:
    """``DATA_DIR OUT_DIR`` positional, then one flag per other :class:`ConvertCommand` field."""
    add_flags(parser, ConvertCommand)


def run(args) -> int:
    """``chexlib convert DATA_DIR OUT_DIR``: convert (or resume) and print the totals."""
    config = config_from_args(ConvertCommand, args)
    manifest = convert(**asdict(config))  # the fields are convert()'s keyword arguments
    print(f"{config.out_dir}: {manifest['variant']} records (image/format {manifest['format']!r})")
    for split, t in manifest["splits"].items():
        print(
            f"  {split:<5} {t['records']:>7} records in {t['shards']:>4} shards, "
            f"{t['bytes'] / 2**20:9.1f} MiB, {t['skipped']} skipped"
        )
    for entry in manifest["skipped"]:
        print(f"  skipped {entry['image']} ({entry['split']}): {entry['reason']}")
    c = manifest["conversion"]
    print(
        f"  {c['seconds']:.1f} s with {c['workers']} worker(s), {c['images_per_second']} images/s; "
        f"{c['shards_written']} shards written, {c['shards_reused']} reused"
    )
    return 0
