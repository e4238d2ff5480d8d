"""What one training run's record says, as tables and text: learning curves,
per-class AUROC beside the published numbers (theirs), throughput per rank, the
synthetic-data ceiling of a run, and the terminal summary.

Each function reads a :class:`chexlib.core.run_record.RunRecord`, the run's typed
record (what ``chexlib train``, :func:`chexlib.launch.launcher.launch` and
:func:`chexlib.train.recipe.train` return). Used by ``chexlib train`` (its CSVs and
last lines) and notebooks 04 and 04b. Reporting layer: numpy and pandas only,
never TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chexlib.core.reference import (
    CHEXNET_MEAN_AUROC,
    CHEXNET_TEST_AUROC,
    POSTER_MEAN_AUROC,
    POSTER_VAL_AUROC,
)
from chexlib.core.run_record import RunRecord
from chexlib.data.metadata import LABELS


def history_frame(record: RunRecord):
    """Per-epoch history as a table: loss, val_loss, mean and per-class val AUROC, LR, times."""
    import pandas as pd

    rows = []
    for h in record.history:
        row = {k: v for k, v in h.items() if not isinstance(v, dict)}
        row.update({f"val_auroc/{k}": v for k, v in (h.get("val_auroc") or {}).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def auroc_table(record: RunRecord):
    """Per-class AUROC of this run beside CheXNet's (test) and the poster's (validation)."""
    import pandas as pd

    split = record.auroc_split or "val"
    rows = [
        {
            "label": label,
            f"ours ({split})": record.auroc.get(label),
            "CheXNet (test)": CHEXNET_TEST_AUROC[label],
            "poster (val)": POSTER_VAL_AUROC[label],
            "note": record.auroc_reasons.get(label, ""),
        }
        for label in LABELS
    ]
    rows.append(
        {
            "label": "mean",
            f"ours ({split})": record.mean_auroc,
            "CheXNet (test)": CHEXNET_MEAN_AUROC,
            "poster (val)": POSTER_MEAN_AUROC,
            "note": "ours: mean of the defined classes",
        }
    )
    table = pd.DataFrame(rows).set_index("label")
    numeric = [c for c in table.columns if c != "note"]
    table[numeric] = table[numeric].astype(float)  # None -> NaN
    return table


@dataclass(frozen=True)
class Ceiling:
    """The synthetic-data ceiling of a ``--paired-synthetic`` run, shaped like a run for
    :func:`throughput_frame`: images/s in total and per rank, and each rank's windows."""

    images_per_sec: float
    images_per_sec_per_rank: float
    throughput: dict  # {"per_rank": [{"median", "ci95", "windows"}, ...]}


def throughput_frame(runs: dict[str, RunRecord | Ceiling]):
    """Images/s per rank (median and 1.96 std over windows) of named runs, e.g. real vs synthetic."""
    import pandas as pd

    rows = []
    for name, run in runs.items():
        for rank, r in enumerate(run.throughput["per_rank"]):
            rows.append(
                {
                    "input": name,
                    "rank": rank,
                    "images_per_sec": r["median"],
                    "ci95": r["ci95"],
                    "windows": r["windows"],
                    "total_images_per_sec": run.images_per_sec,
                }
            )
    return pd.DataFrame(rows)


def paired_ceiling(record: RunRecord) -> Ceiling | None:
    """The synthetic-data ceiling a ``--paired-synthetic`` run measured (per-rank median
    of the synthetic windows, total their sum); None unless every rank has a
    (real, synthetic) pair."""
    paired = record.paired_synthetic
    if not paired or not all(p["pairs"] for p in paired):
        return None
    medians = [p["synthetic_median"] for p in paired]
    return Ceiling(
        images_per_sec=float(sum(medians)),
        images_per_sec_per_rank=float(np.mean(medians)),
        throughput={
            "per_rank": [
                {"median": p["synthetic_median"], "ci95": None, "windows": p["pairs"]}
                for p in paired
            ]
        },
    )


def ceiling_metrics(record: RunRecord, synthetic: RunRecord | None = None) -> dict:
    """The synthetic-data ceiling of a run and real / synthetic, for its run record.

    ``synthetic`` is a separate ``--synthetic`` run of the same configuration;
    without it, the ceiling comes from the run's own paired windows
    (``--paired-synthetic``), whose ratio is the median over ranks of each
    rank's median (real window / the synthetic window after it): adjacent
    windows share the machine's state, so this ratio is the less noisy one.
    """
    paired = paired_ceiling(record)
    ceiling, kind = (synthetic, "separate") if synthetic else (paired, "paired" if paired else None)
    real = record.images_per_sec
    if kind == "paired":
        fraction = record.fraction_of_synthetic_paired
    else:
        fraction = real / ceiling.images_per_sec if real and ceiling else None
    per_rank = ceiling.images_per_sec_per_rank if ceiling else None
    return {
        "synthetic_images_per_sec": ceiling.images_per_sec if ceiling else None,
        "synthetic_images_per_sec_per_rank": per_rank,
        # the model's own cost: wall ms per image of one rank with its cores, no input work
        "model_ms_per_image": 1000.0 / per_rank if per_rank else None,
        "fraction_of_synthetic": fraction,
        "ceiling_kind": kind,
    }


def summary_text(record: RunRecord) -> str:
    """A few lines for the terminal."""

    def fmt(v, spec=".1f"):
        return "n/a" if v is None else format(v, spec)

    r = record
    lines = [
        f"{r.model} {r.source}/{r.pipeline}{' (synthetic)' if r.synthetic else ''}: "
        f"{r.ranks} rank(s), batch {r.batch_size_per_rank}/rank, {r.steps_per_epoch} steps/epoch",
        f"  throughput: {fmt(r.images_per_sec)} images/s total, "
        f"{fmt(r.images_per_sec_per_rank)} per rank (+- {fmt(r.images_per_sec_ci95)})",
        f"  mean AUROC ({r.auroc_split or 'n/a'}): {fmt(r.mean_auroc, '.3f')}",
        f"  wall time: {r.wall_seconds:.1f} s",
    ]
    return "\n".join(lines)
