"""The record of a training run (its ``metrics.json``) as a typed contract.

:class:`RunRecord` has one field per key. ``chexlib train`` writes the training
fields; whoever launched the run may add how the ranks were started and the
synthetic-data ceiling with its figures (:meth:`RunRecord.with_ceiling`), or a
per-rank table (:meth:`RunRecord.with_rank_table`).

Versions: every record carries ``schema_version`` (:data:`SCHEMA_VERSION`;
records written before it existed are version 1). A field added later gets a
default, so an older record still reads, with that default; a record of a newer
version than this code knows is refused, naming the file. A missing field that
has no default, or an unknown key, is refused too, naming it, so a renamed key
fails where it is read instead of becoming an empty column. Plain Python only:
the reporting layer reads it without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from chexlib.core.files import read_json

# 1: the records before versions; 2: schema_version written, additions named, not numbered;
# 3: precision (an older record reads as float16 if mixed_precision, else float32);
# 4: hosts_per_rank (an older record reads as None: not gathered).
SCHEMA_VERSION = 4

CEILING_KEYS = (  # what ``chexlib.report.training.ceiling_metrics`` returns
    "synthetic_images_per_sec",
    "synthetic_images_per_sec_per_rank",
    "model_ms_per_image",
    "fraction_of_synthetic",
    "ceiling_kind",
)
# Keys a launcher adds to the training run's record: a record has one group or none.
ADDITIONS = {
    "ceiling": ("launch", *CEILING_KEYS, "figures"),
    "rank table": ("launch", "rank_table"),
}
_ADDED = {key for keys in ADDITIONS.values() for key in keys}
# Keys written only when known: an older record without them round-trips as it was.
_WHEN_KNOWN = ("hosts_per_rank",)
# Keys no other stage's record has: a record holding any of them is a training run's.
_TRAINING_MARKERS = ("ranks", "images_per_sec", "steps_per_epoch", "weights_in_sync")


class RunRecordError(ValueError):
    """A training run's record with a missing or unknown key, or of a newer schema;
    the message names them."""


@dataclass(frozen=True)
class RunRecord:
    """One training run's ``metrics.json``: rank 0's view, the same on every rank.

    Fields are declared in the order the JSON holds them. Nested values
    (history, per-class AUROC, throughput windows, paired windows, environment)
    stay plain dicts and lists, as written.
    """

    # Who wrote it and what ran: the configuration, and the paired synthetic
    # windows of a --paired-synthetic run (per rank; None without).
    rank: int
    ranks: int
    model: str
    source: str  # "raw" or "records"
    pipeline: str  # "naive" or "optimized"
    synthetic: bool  # one random batch instead of data: a ceiling run
    paired_synthetic: list[dict] | None
    fraction_of_synthetic_paired: float | None
    image_size: int
    batch_size_per_rank: int
    global_batch_size: int
    learning_rate: float  # as scaled by the number of ranks
    steps_per_epoch: int
    epochs: int
    resumed_from_epoch: int | None

    # Throughput: images/s from timed windows after warm-up (None: nothing timed);
    # ``throughput`` holds every rank's windows, the window sizes and a note.
    images_per_sec: float | None  # sum over ranks
    images_per_sec_per_rank: float | None
    images_per_sec_ci95: float | None
    throughput: dict

    # AUROC: the final per-class and mean (test if evaluated, else the last val;
    # None with a reason when there was no evaluation), the split sizes and history.
    auroc: dict
    auroc_reasons: dict
    auroc_split: str | None  # "test", "val" or None
    mean_auroc: float | None
    test_images: int | None
    test_loss: float | None
    val_images: int | None
    val_mean_auroc: float | None
    val_auroc: dict | None
    history: list[dict]  # one dict per epoch

    # Ranks in sync, time, cores and compute settings, versions and hardware.
    weights_sha256_per_rank: list[str]
    weights_in_sync: bool
    wall_seconds: float
    pin_cores: int  # 0: ranks share all cores
    cores_per_rank: list
    mixed_precision: bool  # compute below float32 (precision bfloat16 or float16)
    xla: bool
    environment: dict
    precision: str | None = None  # "float32", "bfloat16" or "float16" (read in from older records)
    hosts_per_rank: list[str] | None = None  # each rank's hostname, by rank (None: not gathered)

    # A launcher's additions: the launch mode, the synthetic-data ceiling
    # (report.training.ceiling_metrics) and the figures saved (with_ceiling); or the
    # launch and one row per rank (with_rank_table). Absent from the JSON of a run
    # made by ``chexlib train`` alone.
    launch: str | None = None
    synthetic_images_per_sec: float | None = None
    synthetic_images_per_sec_per_rank: float | None = None
    model_ms_per_image: float | None = None
    fraction_of_synthetic: float | None = None
    ceiling_kind: str | None = None  # "separate", "paired" or None
    figures: list[str] | None = None
    rank_table: list[dict] | None = None

    @property
    def addition(self) -> str | None:
        """Which group of :data:`ADDITIONS` the record holds; None: ``chexlib train``'s alone."""
        if self.figures is not None:  # a list in every record with a ceiling
            return "ceiling"
        return "rank table" if self.rank_table is not None else None

    def to_dict(self) -> dict:
        """The ``metrics.json`` dict: the schema version, then every key in order,
        a launcher's additions only when set."""
        keep = ADDITIONS.get(self.addition, ())
        return {
            "schema_version": SCHEMA_VERSION,
            **{
                f.name: getattr(self, f.name)
                for f in fields(self)
                if (f.name not in _ADDED or f.name in keep)
                and not (f.name in _WHEN_KNOWN and getattr(self, f.name) is None)
            },
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        """The record of a ``metrics.json`` dict, of this schema version or an older one.

        Raises:
            RunRecordError: a newer schema version, a key without a default is
                missing, a key is unknown, or only part of an addition's group is
                there; the message names them.
        """
        d = dict(d)
        version = d.pop("schema_version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise RunRecordError(f"schema_version must be a positive integer, not {version!r}")
        if version > SCHEMA_VERSION:
            raise RunRecordError(
                f"written by a newer chexlib (run record schema {version}; this one reads "
                f"up to {SCHEMA_VERSION}): upgrade chexlib to read it"
            )
        if version < 3 and "precision" not in d:  # only mixed float16 existed before
            d["precision"] = "float16" if d.get("mixed_precision") else "float32"
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in d if k not in known]
        missing = [k for k, f in known.items() if k not in d and not _has_default(f)]
        added = [k for k in d if k in _ADDED]
        if added:  # the group sharing most keys with it, then all of that one
            group = max(ADDITIONS.values(), key=lambda keys: len(set(keys) & set(added)))
            missing += [k for k in group if k not in d]
            unknown += [k for k in added if k not in group]
        if missing or unknown:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise RunRecordError(f"not a training run record: {'; '.join(problems)}")
        record = cls(**d)
        if added and record.addition is None:  # figures or rank_table null: to_dict would drop them
            raise RunRecordError(f"added keys {', '.join(added)} with null figures/rank_table")
        return record

    @classmethod
    def read(cls, path: str | Path) -> RunRecord:
        """The record in the ``metrics.json`` at ``path``; any error names the file."""
        try:
            return cls.from_dict(read_json(path, expect=dict))
        except RunRecordError as err:
            raise RunRecordError(f"{path}: {err}") from None

    def with_ceiling(self, launch: str, ceiling: dict, figures: list[str]) -> RunRecord:
        """This record with the launch mode, the synthetic-data ceiling and its figures.

        Args:
            launch: how the ranks were started (``LaunchConfig.mode``).
            ceiling: ``chexlib.report.training.ceiling_metrics(...)``, exactly its keys.
            figures: file names of the figures saved beside the record.
        """
        if sorted(ceiling) != sorted(CEILING_KEYS):
            raise RunRecordError(f"ceiling keys {sorted(ceiling)} are not {sorted(CEILING_KEYS)}")
        if not launch:
            raise RunRecordError("launch mode is empty")
        return dataclasses.replace(self, launch=launch, figures=list(figures), **ceiling)

    def with_rank_table(self, launch: str, rank_table: list[dict]) -> RunRecord:
        """This record with the launch mode and one row per rank (an interactive launch)."""
        if not launch:
            raise RunRecordError("launch mode is empty")
        return dataclasses.replace(self, launch=launch, rank_table=list(rank_table))


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def is_training_record(metrics: dict) -> bool:
    """Whether a ``metrics.json`` dict is a training run's (any key only those have)."""
    return any(key in metrics for key in _TRAINING_MARKERS)
