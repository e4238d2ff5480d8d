"""The study summary's tables: one row per training run, gains, scaling, costs.

Everything here reads the run records a study wrote (``results.collect_runs``)
and those of runs made by hand (:func:`collect_hand_runs`), and nothing else,
so the summary can be rebuilt from ``outputs/`` at any time.
The figures are in :mod:`chexlib.report.summary_plots`, the claims and their verdicts in
:mod:`chexlib.report.verdicts`; published numbers (theirs) in :mod:`chexlib.core.reference`.
Reporting layer: pandas only, never TensorFlow.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chexlib.core.files import read_json
from chexlib.core.reference import (
    CHEXNET_MEAN_AUROC,
    CHEXNET_TEST_AUROC,
    POSTER_MEAN_AUROC,
    POSTER_THROUGHPUT,
    POSTER_VAL_AUROC,
)
from chexlib.core.run_record import RunRecord, RunRecordError, is_training_record
from chexlib.core.runs import RecordWarning, collect_runs
from chexlib.data.metadata import LABELS
from chexlib.records.manifest import manifest_if_any
from chexlib.report import allreduce_model
from chexlib.report.feeding import input_costs, projection

INPUT_ORDER = ["raw PNG", "png-records", "compact-records", "synthetic"]
MODEL_ORDER = ["standin", "densenet121", "resnet50", "tiny"]
# A run is input-bound when its real data reaches less than this share of its
# own synthetic-data ceiling (the input, not the model, sets the speed).
INPUT_BOUND_BELOW = 0.9
# Everything but the number of ranks that makes two runs comparable.
CONFIG = ["model", "pipeline", "input", "pin_cores", "image_size", "batch_size_per_rank",
          "precision", "xla"]  # fmt: skip
# A run that evaluated (a learning run) is not a repeat of a throughput run.
RUN_KEY = [*CONFIG, "ranks", "epochs", "evaluated", "synthetic_paired"]


def _input_name(params: dict, source: str) -> str:
    """raw PNG / png-records / compact-records, from the records manifest when there is one."""
    if source != "records":
        return "raw PNG"
    records_dir = (params.get("train") or {}).get("records") or ""
    manifest = manifest_if_any(records_dir) if records_dir else None
    return f"{manifest.get('variant', 'png')}-records" if manifest else "records"


def _paired_spread(run: RunRecord) -> tuple[float | None, float | None]:
    """Smallest and largest real/synthetic window ratio over ranks of a paired run."""
    paired = run.paired_synthetic or []
    lows = [p.get("ratio_min") for p in paired if p.get("ratio_min") is not None]
    highs = [p.get("ratio_max") for p in paired if p.get("ratio_max") is not None]
    return (min(lows) if lows else None, max(highs) if highs else None)


def training_run(rec: dict) -> RunRecord:
    """The :class:`RunRecord` of a training run's record (``collect_runs`` shape).

    Raises:
        RunRecordError: its ``metrics.json`` lacks a key or has an unknown one;
            the message names the run folder and the keys.
    """
    try:
        return RunRecord.from_dict(rec["metrics"])
    except RunRecordError as err:
        raise RunRecordError(f"{rec.get('run_dir', rec['run_id'])}/metrics.json: {err}") from None


def _training_row(rec: dict) -> dict:
    run = training_run(rec)
    low, high = _paired_spread(run)
    env = run.environment  # its keys vary: environment_info(with_gpus=False) has no hardware
    row = {
        "run_id": rec["run_id"],
        "model": run.model,
        "pipeline": run.pipeline,
        "input": _input_name(rec["params"], run.source),
        "ranks": int(run.ranks),
        "pin_cores": int(run.pin_cores or 0),
        "images_per_sec": run.images_per_sec,
        "images_per_sec_ci95": run.images_per_sec_ci95,
        "images_per_sec_per_rank": run.images_per_sec_per_rank,
        "synthetic_images_per_sec": run.synthetic_images_per_sec,  # None: not from notebook 04
        "fraction_of_synthetic": run.fraction_of_synthetic,
        "fraction_min": low,
        "fraction_max": high,
        "model_ms_per_image": run.model_ms_per_image,
        "synthetic_paired": run.paired_synthetic is not None,
        "mean_auroc": run.mean_auroc,
        "auroc_split": run.auroc_split,
        "epochs": run.epochs,
        "image_size": run.image_size,
        "batch_size_per_rank": run.batch_size_per_rank,
        "precision": run.precision,
        "xla": bool(run.xla),
        "hardware": env.get("hardware"),
        "cpu_count": env.get("cpu_count"),
        "finished": _finished(rec),
    }
    row.update({f"auroc.{k}": v for k, v in run.auroc.items()})
    return row


TRAINING_COLUMNS = [
    "run_id", "model", "pipeline", "input", "ranks", "pin_cores", "images_per_sec",
    "images_per_sec_ci95", "images_per_sec_per_rank", "synthetic_images_per_sec",
    "fraction_of_synthetic", "fraction_min", "fraction_max", "model_ms_per_image",
    "synthetic_paired", "mean_auroc", "auroc_split", "epochs", "image_size",
    "batch_size_per_rank", "precision", "xla", "hardware", "cpu_count", "finished",
]  # fmt: skip


def _finished(rec: dict) -> float:
    """When the run's record was written (newest wins among repeats); 0 when unknown."""
    try:
        return (Path(rec["run_dir"]) / "metrics.json").stat().st_mtime
    except (KeyError, OSError):
        return 0.0


def training_table(records: list[dict]) -> pd.DataFrame:
    """One row per training configuration, with shared ceilings, scaling and the bound.

    Training records are read as :class:`RunRecord`, so one with a missing or
    unknown key raises :class:`RunRecordError` naming it; other stages' are skipped.

    Two runs of the same configuration (a leftover of an earlier spec, a rerun)
    are not both kept: the newest is used and ``repeats`` says how many there were.
    """
    rows = [_training_row(rec) for rec in records if is_training_record(rec["metrics"])]
    # no runs: an empty table that still has every column, so readers need no special case
    table = pd.DataFrame(rows, columns=None if rows else TRAINING_COLUMNS)
    for col in ("images_per_sec", "images_per_sec_ci95", "images_per_sec_per_rank",
                "synthetic_images_per_sec", "fraction_of_synthetic", "fraction_min",
                "fraction_max", "model_ms_per_image", "mean_auroc"):  # fmt: skip
        table[col] = pd.to_numeric(table[col], errors="coerce")
    table["evaluated"] = table["mean_auroc"].notna()
    table = _newest_per_configuration(table)
    table = _share_ceiling(table)
    table["bound"] = np.where(
        table["fraction_of_synthetic"].isna(),
        None,
        np.where(
            table["fraction_of_synthetic"] < INPUT_BOUND_BELOW, "input-bound", "compute-bound"
        ),
    )
    table = _scaling(table)
    table["model_order"] = table["model"].map(
        lambda m: MODEL_ORDER.index(m) if m in MODEL_ORDER else 99
    )
    table = table.sort_values(["model_order", "pipeline", "input", "pin_cores", "ranks"])
    return table.drop(columns="model_order").reset_index(drop=True)


def _newest_per_configuration(table: pd.DataFrame) -> pd.DataFrame:
    table = table.sort_values(["finished", "run_id"])
    repeats = table.groupby(RUN_KEY, dropna=False)["run_id"].transform("size")
    table = table.assign(repeats=repeats)
    return table.drop_duplicates(subset=RUN_KEY, keep="last")


def _share_ceiling(table: pd.DataFrame) -> pd.DataFrame:
    """The synthetic ceiling depends on the model and its configuration, not on the
    input or pipeline: a study may measure it once per configuration and share it."""
    same = ["model", "ranks", "pin_cores", "image_size", "batch_size_per_rank",
            "precision", "xla"]  # fmt: skip
    shared = table.groupby(same, dropna=False)["synthetic_images_per_sec"].transform("median")
    missing = table["synthetic_images_per_sec"].isna() & shared.notna()
    table["synthetic_shared"] = missing
    table.loc[missing, "synthetic_images_per_sec"] = shared[missing]
    table.loc[missing, "fraction_of_synthetic"] = (
        table.loc[missing, "images_per_sec"] / shared[missing]
    )
    return table


def _scaling(table: pd.DataFrame) -> pd.DataFrame:
    """images/s(N) / (N x images/s(1)) against the 1-rank run of the same configuration.

    With ``pin_cores`` every rank has its own cores, so this is weak scaling
    (Horovod's own overhead); without, the ranks share the machine's cores.
    """
    one = table[table["ranks"] == 1].set_index(CONFIG)["images_per_sec"]
    base = table.set_index(CONFIG).index.map(one.to_dict().get)
    table["scaling_efficiency"] = table["images_per_sec"] / (
        table["ranks"] * pd.to_numeric(pd.Series(base, index=table.index))
    )
    table["scaling_kind"] = np.where(
        table["pin_cores"] > 0,
        "weak: " + table["pin_cores"].astype(str) + " core(s) per rank",
        "ranks share all cores",
    )
    return table


def ratio_with_noise(a: pd.Series, b: pd.Series) -> dict:
    """a / b for two rows, with the run-to-run noise of the ratio from their windows.

    Noise: the relative 1.96-std spreads of both runs' timed windows added in
    quadrature. A ratio within ``1 +- noise`` is not a gain or a loss.
    """
    ratio = a["images_per_sec"] / b["images_per_sec"]
    parts = [
        (r["images_per_sec_ci95"] / r["images_per_sec"])
        for r in (a, b)
        if pd.notna(r.get("images_per_sec_ci95")) and r["images_per_sec"]
    ]
    noise = math.sqrt(sum(p * p for p in parts)) if parts else None
    return {
        "ratio": float(ratio),
        "noise": noise,
        "within_noise": bool(noise is not None and abs(ratio - 1) <= noise),
        "runs": [a["run_id"], b["run_id"]],
    }


def throughput_rows(train: pd.DataFrame) -> pd.DataFrame:
    """One run per (configuration, ranks) for throughput figures: a run that only
    measured throughput is preferred to a learning run of the same configuration."""
    if train.empty:
        return train
    ordered = train.sort_values(["evaluated", "synthetic_paired"], ascending=[True, False])
    return ordered.drop_duplicates(subset=[*CONFIG, "ranks"]).sort_index()


def records_gain(train: pd.DataFrame) -> pd.DataFrame:
    """% images/s of each records variant over raw PNG, same configuration otherwise."""
    train = throughput_rows(train)
    keys = [k for k in [*CONFIG, "ranks"] if k != "input"]
    raw = train[train["input"] == "raw PNG"].set_index(keys)
    rows = []
    for _, r in train[train["input"] != "raw PNG"].iterrows():
        key = tuple(r[k] for k in keys)
        if key not in raw.index:
            continue
        ref = raw.loc[key]
        ref = ref.iloc[-1] if isinstance(ref, pd.DataFrame) else ref
        cmp = ratio_with_noise(r, ref.to_dict())
        rows.append(
            {
                **{k: r[k] for k in keys},
                "input": r["input"],
                "gain_percent": 100.0 * (cmp["ratio"] - 1.0),
                "noise_percent": 100.0 * cmp["noise"] if cmp["noise"] is not None else None,
                "within_noise": cmp["within_noise"],
            }
        )
    return pd.DataFrame(rows)


def poster_scaling() -> pd.DataFrame:
    """The poster's throughput and scaling efficiency against GPUs (theirs)."""
    one = POSTER_THROUGHPUT[1]
    return pd.DataFrame(
        [
            {"ranks": n, "images_per_sec": v, "scaling_efficiency": v / (n * one),
             "who": "poster (V100 GPUs, theirs)"}
            for n, v in POSTER_THROUGHPUT.items()
        ]
    )  # fmt: skip


def profiling_tables(records: list[dict]) -> dict[str, pd.DataFrame]:
    """The pipeline-profiling stage's throughput, ablation and utilization tables."""
    tables: dict[str, list] = {"throughput": [], "ablation": [], "utilization": []}
    for rec in records:
        for name in tables:
            rows = rec["metrics"].get(name)
            if isinstance(rows, list):
                tables[name].extend({**row, "run_id": rec["run_id"]} for row in rows)
    return {name: pd.DataFrame(rows) for name, rows in tables.items()}


def hardware_caption(records: list[dict]) -> str:
    """What the numbers ran on, computed from the run records ("2 CPU cores, no GPU (...)").

    The machine's core count is the largest any run saw: a pinned rank sees only its own.
    """
    envs = [rec["metrics"].get("environment") or {} for rec in records]
    gpus = sorted({g for e in envs for g in e.get("gpus") or []})
    if gpus:
        return f"GPUs: {', '.join(gpus)}"
    cores = max((e.get("cpu_count") or 0 for e in envs), default=0)
    cpus = sorted({e["cpu"] for e in envs if e.get("cpu")})
    what = f"{cores} CPU core{'s' if cores != 1 else ''}" if cores else "CPU"
    return f"{what}, no GPU" + (f" ({cpus[0]})" if cpus else "")


HAND_STAGE = "by hand"  # the stage of runs made outside a study


def _hand_record(run_dir: Path, run_id: str) -> dict:

    params = run_dir / "params.json"
    return {
        "stage": HAND_STAGE,
        "run_id": run_id,
        "run_dir": str(run_dir),
        "parameters": {},
        "params": read_json(params, expect=dict) if params.is_file() else {},
        "metrics": read_json(run_dir / "metrics.json", expect=dict),
    }


def hand_run_dirs(paths) -> list[Path]:
    """Run folders at or below ``paths``: every folder with a ``metrics.json``, outermost only.

    A folder made by ``chexlib train --out``, or notebook 04's ``OUTPUT_DIR``
    (whose own ``run/`` folder is the same training and is not counted twice),
    or a folder holding many of them. Glob patterns are expanded.

    Raises:
        FileNotFoundError: a path (or pattern) that names nothing.
    """
    import glob

    found: list[Path] = []
    for path in paths:
        matches = sorted(glob.glob(str(path))) if glob.has_magic(str(path)) else [str(path)]
        if not matches or not Path(matches[0]).exists():
            raise FileNotFoundError(f"run folder {path} does not exist")
        for match in map(Path, matches):
            runs = sorted(p.parent.resolve() for p in match.glob("**/metrics.json"))
            found += [r for r in runs if not any(o in r.parents for o in runs)]
    return list(dict.fromkeys(found))


def collect_hand_runs(paths, known: list[dict] = ()) -> list[dict]:
    """Records of runs made by hand (not by ``chexlib study``), shaped like ``collect_runs``'.

    Args:
        paths: run folders or folders holding them (:func:`hand_run_dirs`).
        known: records already collected; a run among them is not added again.
    """
    seen = {Path(rec["run_dir"]).resolve() for rec in known}
    records, ids = [], {rec["run_id"] for rec in known}
    for run_dir in hand_run_dirs(paths):
        if run_dir in seen or any(p in seen for p in run_dir.parents):
            continue  # the study collected it (or the run it belongs to) already
        record = _hand_record(run_dir, run_dir.name)
        if record["metrics"].get("synthetic") is True:
            continue  # a ceiling measured on one random batch, not a training run
        run_id = (
            run_dir.name if run_dir.name not in ids else f"{run_dir.parent.name}/{run_dir.name}"
        )
        ids.add(run_id)
        records.append({**record, "run_id": run_id})
    return records


# Measured numbers a table computes with: a value that is not a finite number (NaN,
# a string) would become NaN there and turn a verdict without a word.
_MEASURED = {
    "training": ("images_per_sec", "images_per_sec_ci95", "images_per_sec_per_rank",
                 "synthetic_images_per_sec", "fraction_of_synthetic", "model_ms_per_image",
                 "mean_auroc"),
    "localization": ("hit_rate",),
}  # fmt: skip
# What the notebook of a run left out measured, when its record could not be read.
_NOTEBOOK_KINDS = {"03": "profiling", "04": "training", "06": "localization"}


def _kind(rec: dict) -> str | None:
    if is_training_record(rec["metrics"]):
        return "training"
    return "localization" if "hit_rate" in rec["metrics"] else None


def record_problem(rec: dict) -> str | None:
    """Why a run's record cannot be used (a measured value that is not a number), or None."""
    metrics = rec["metrics"]
    bad = [
        f"{key} is {repr(metrics[key])[:40]}"
        for key in _MEASURED.get(_kind(rec), ())
        if not _number_or_none(metrics.get(key))
    ]
    return f"metrics.json: {', '.join(bad)} (not a finite number)" if bad else None


def _number_or_none(value) -> bool:
    if value is None:
        return True
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _notebook_kind(notebook) -> str | None:
    """What a run's notebook measured (``training``, ...), from its number; None: unknown."""
    return _NOTEBOOK_KINDS.get(Path(notebook).name[:2]) if notebook else None


def usable_records(records: list[dict], left_out: list[dict]) -> list[dict]:
    """``records`` without those :func:`record_problem` refuses; each of those is added
    to ``left_out`` (``{"run_dir", "stage", "kind", "problem"}``)."""
    kept = []
    for rec in records:
        problem = record_problem(rec)
        if problem is None:
            kept.append(rec)
        else:
            run_dir = rec.get("run_dir", rec["run_id"])
            left_out.append(
                {"run_dir": run_dir, "stage": rec["stage"], "kind": _kind(rec), "problem": problem}
            )
    return kept


def allreduce_checks(records: list[dict]) -> list[dict]:
    """Every check of the ring-allreduce model a run recorded (``allreduce_checks`` in the
    ``metrics.json`` of :mod:`chexlib.report.cluster_scaling`'s runs), with its run."""
    return [
        {**check, "run_id": rec["run_id"]}
        for rec in records
        for check in rec["metrics"].get("allreduce_checks") or []
        if isinstance(check, dict)
    ]


def cluster_scaling_table(records: list[dict]) -> pd.DataFrame:
    """Notebook 04c's rows (``cluster_scaling`` in its ``metrics.json``: weak scaling across
    nodes against one node alone and two independent jobs, per model and link rate) of the
    study's last such run, with its run id; empty when no run measured it."""
    runs = [rec for rec in records if rec["metrics"].get("cluster_scaling")]
    if not runs:
        return pd.DataFrame()
    last = runs[-1]
    rows = [r for r in last["metrics"]["cluster_scaling"] if isinstance(r, dict)]
    return pd.DataFrame([{**row, "run_id": last["run_id"]} for row in rows])


def load_study(study_dir: str | Path | None, run_dirs=()) -> dict:
    """Every table the summary needs, from the run records under ``study_dir``
    (None or "": none) and the runs made by hand in ``run_dirs``.

    A run whose record is unreadable, missing (a run marked complete without
    ``metrics.json``) or holds a measured value that is not a number is left
    out, with a :class:`RecordWarning` naming its folder; ``left_out`` lists them
    (``run_dir``, ``stage``, ``kind``: what it measured if known, ``problem``),
    for the verdicts that might have used them to name them.
    """
    unread: list[dict] = []
    records = collect_runs(study_dir, problems=unread) if study_dir else []
    left_out = [
        {"run_dir": p["run_dir"], "stage": p["stage"], "kind": _notebook_kind(p["notebook"]),
         "problem": p["problem"]}
        for p in unread
    ]  # fmt: skip
    records += collect_hand_runs(run_dirs, known=records)
    records = usable_records(records, left_out)
    for bad in left_out:
        warnings.warn(f"run left out: {bad['run_dir']}: {bad['problem']}", RecordWarning, 2)
    by_stage: dict[str, list] = {}
    for rec in records:
        by_stage.setdefault(rec["stage"], []).append(rec)
    train = training_table(records)
    profiling = profiling_tables(records)
    costs = input_costs(profiling["throughput"])
    return {
        "records": records,
        "stages": {k: len(v) for k, v in by_stage.items()},
        "hardware": hardware_caption(records),
        "train": train,
        "gain": records_gain(train) if not train.empty else pd.DataFrame(),
        "input_costs": costs,
        "feeding": projection(costs) if not costs.empty else pd.DataFrame(),
        # published numbers alone (the poster's hardware), the same for every study
        "scaling_projection": allreduce_model.projection(),
        # the ring model checked against measured 2-node overheads (notebook 04c's runs)
        "allreduce_checks": allreduce_checks(records),
        "cluster_scaling": cluster_scaling_table(records),
        "localization": [
            {**rec["metrics"], "run_id": rec["run_id"]}
            for rec in records
            if "hit_rate" in rec["metrics"]
        ],
        "left_out": left_out,
        **profiling,
    }


def cpu_ms(tables: dict, input_name: str) -> float | None:
    """CPU ms per image of one input (``raw PNG``, ...) measured by the profiling stage."""
    costs = tables.get("input_costs")
    if costs is None or costs.empty or input_name not in set(costs["input"]):
        return None
    return float(costs.set_index("input").loc[input_name, "cpu_ms_per_image"])


def cost_table(train: pd.DataFrame, costs: pd.DataFrame) -> pd.DataFrame:
    """The model's ms per image beside the input's: why a run is input- or compute-bound.

    Model: wall ms per image of one rank on its cores with no input work (the
    synthetic ceiling). Input: CPU ms per image of the optimized pipeline alone
    (profiling stage), and the wall ms per image it needs on the same cores.
    """
    raw = costs.set_index("input")["cpu_ms_per_image"].get("raw PNG") if not costs.empty else None
    rows = []
    one_rank = train[(train["ranks"] == 1) & (train["pin_cores"] == 0)]
    for model, part in one_rank.groupby("model", sort=False):
        ms = part["model_ms_per_image"].dropna()
        cores = part["cpu_count"].dropna()
        rows.append(
            {
                "model": model,
                "model_ms_per_image": float(ms.median()) if len(ms) else None,
                "raw_png_cpu_ms_per_image": raw,
                "raw_png_wall_ms_per_image": raw / cores.max() if raw and len(cores) else None,
                "bound_on_raw_png": _bound(part),
            }
        )
    return pd.DataFrame(rows)


def _bound(part: pd.DataFrame) -> str | None:
    raw = part[(part["input"] == "raw PNG") & (part["pipeline"] == "optimized")]
    values = raw["bound"].dropna()
    return values.iloc[0] if len(values) else None


def auroc_comparison(train: pd.DataFrame) -> pd.DataFrame:
    """Per-class AUROC of our best-scoring run beside CheXNet's and the poster's (theirs)."""
    scored = train.dropna(subset=["mean_auroc"])
    if scored.empty:
        return pd.DataFrame()
    best = scored.loc[scored["mean_auroc"].idxmax()]
    ours = (
        f"ours: {best['model']} {best['input']}, {best['auroc_split']} split "
        "(generated data unless the study ran on NIH images)"
    )
    table = pd.DataFrame(
        {
            ours: [best.get(f"auroc.{label}") for label in LABELS],
            "CheXNet (NIH test, theirs)": [CHEXNET_TEST_AUROC[label] for label in LABELS],
            "poster (NIH val, theirs)": [POSTER_VAL_AUROC[label] for label in LABELS],
        },
        index=list(LABELS),
    ).astype(float)
    table.loc["mean"] = [best["mean_auroc"], CHEXNET_MEAN_AUROC, POSTER_MEAN_AUROC]
    return table


@dataclass(frozen=True)
class SummaryConfig:
    """Parameters of ``notebooks/05_summary.ipynb``, validated."""

    study_dir: str
    output_dir: str
    run_dirs: tuple = ()  # runs made by hand: run folders, or folders holding them

    def __post_init__(self):
        object.__setattr__(self, "run_dirs", tuple(str(p) for p in self.run_dirs or ()))
        if not self.study_dir and not self.run_dirs:
            raise ValueError("nothing to summarise: give study_dir or run_dirs")
        if self.study_dir and not Path(self.study_dir).is_dir():
            raise ValueError(f"study_dir {self.study_dir} does not exist: run the study first")
        try:
            hand_run_dirs(self.run_dirs)
        except FileNotFoundError as err:
            raise ValueError(str(err)) from None

    def to_dict(self) -> dict:
        return asdict(self)
