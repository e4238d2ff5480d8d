"""The record of a training run (its ``metrics.json``) as a typed contract.

:class:`RunRecord` has one field per key. ``chexlib train`` writes the training
fields; notebook 04 adds how the ranks were started, the synthetic-data
ceiling and its figures (:meth:`RunRecord.with_notebook`), notebook 04b the
launch and its per-rank table (:meth:`RunRecord.with_rank_table`).
:meth:`RunRecord.to_dict` gives the JSON in its usual key order;
:meth:`RunRecord.from_dict` refuses a record with a missing or unknown key,
naming it, so a renamed key fails where it is read instead of becoming an empty
column. Plain Python only: the reporting layer reads it without TensorFlow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

CEILING_KEYS = (  # what ``run_report.ceiling_metrics`` returns
    "synthetic_images_per_sec",
    "synthetic_images_per_sec_per_rank",
    "model_ms_per_image",
    "fraction_of_synthetic",
    "ceiling_kind",
)
# Keys a notebook adds to the training run's record: a record has one group or none.
NOTEBOOK_KEYS = {
    "04": ("launch", *CEILING_KEYS, "figures"),
    "04b": ("launch", "rank_table"),
}
_OPTIONAL = {key for keys in NOTEBOOK_KEYS.values() for key in keys}
# Keys no other stage's record has: a record holding any of them is a training run's.
_TRAINING_MARKERS = ("ranks", "images_per_sec", "steps_per_epoch", "weights_in_sync")


class RunRecordError(ValueError):
    """A training run's record with a missing or unknown key; the message names them."""


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
    mixed_precision: bool
    xla: bool
    environment: dict

    # Notebook 04's additions (with_notebook): the launch mode, the synthetic-data
    # ceiling (run_report.ceiling_metrics) and the figures it saved; notebook 04b's
    # (with_rank_table): the launch and one row per rank. Absent from the JSON of a
    # run made by ``chexlib train`` alone.
    launch: str | None = None
    synthetic_images_per_sec: float | None = None
    synthetic_images_per_sec_per_rank: float | None = None
    model_ms_per_image: float | None = None
    fraction_of_synthetic: float | None = None
    ceiling_kind: str | None = None  # "separate", "paired" or None
    figures: list[str] | None = None
    rank_table: list[dict] | None = None

    @property
    def notebook(self) -> str | None:
        """Which notebook's keys the record holds ("04", "04b"); None: ``chexlib train``'s."""
        if self.figures is not None:  # a list in every notebook 04 record
            return "04"
        return "04b" if self.rank_table is not None else None

    def to_dict(self) -> dict:
        """The ``metrics.json`` dict: every key in order, notebook keys only when set."""
        keep = NOTEBOOK_KEYS.get(self.notebook, ())
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in _OPTIONAL or f.name in keep
        }

    @classmethod
    def from_dict(cls, d: dict) -> RunRecord:
        """The record of a ``metrics.json`` dict.

        Raises:
            RunRecordError: a training key is missing, a key is unknown, or only
                part of a notebook's group is there; the message names them.
        """
        names = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in names]
        missing = [k for k in names if k not in d and k not in _OPTIONAL]
        added = [k for k in d if k in _OPTIONAL]
        if added:  # the notebook group sharing most keys with it, then all of that one
            group = max(NOTEBOOK_KEYS.values(), key=lambda keys: len(set(keys) & set(added)))
            missing += [k for k in group if k not in d]
            unknown += [k for k in added if k not in group]
        if missing or unknown:
            problems = [f"missing {', '.join(missing)}"] if missing else []
            problems += [f"unknown {', '.join(unknown)}"] if unknown else []
            raise RunRecordError(f"not a training run record: {'; '.join(problems)}")
        record = cls(**d)
        if added and record.notebook is None:  # figures or rank_table null: to_dict would drop them
            raise RunRecordError(f"notebook keys {', '.join(added)} with null figures/rank_table")
        return record

    def with_notebook(self, launch: str, ceiling: dict, figures: list[str]) -> RunRecord:
        """This record with notebook 04's additions.

        Args:
            launch: how the ranks were started (``LaunchConfig.mode``).
            ceiling: ``run_report.ceiling_metrics(...)``, exactly its keys.
            figures: file names of the figures saved beside the record.
        """
        if sorted(ceiling) != sorted(CEILING_KEYS):
            raise RunRecordError(f"ceiling keys {sorted(ceiling)} are not {sorted(CEILING_KEYS)}")
        if not launch:
            raise RunRecordError("launch mode is empty")
        return dataclasses.replace(self, launch=launch, figures=list(figures), **ceiling)

    def with_rank_table(self, launch: str, rank_table: list[dict]) -> RunRecord:
        """This record with notebook 04b's additions: the launch and one row per rank."""
        if not launch:
            raise RunRecordError("launch mode is empty")
        return dataclasses.replace(self, launch=launch, rank_table=list(rank_table))


def is_training_record(metrics: dict) -> bool:
    """Whether a ``metrics.json`` dict is a training run's (any key only those have)."""
    return any(key in metrics for key in _TRAINING_MARKERS)
