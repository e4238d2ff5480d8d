"""The poster's questions as claims with measured verdicts (``verdicts.json``).

Each claim has an id, the question, what this study measured with its noise
(the measured interval: value +- noise, in the claim's unit), the threshold with
its source (the poster's number, CheXNet's, or ours, and why) and a verdict:
``supported`` or ``not supported`` when the whole interval is on one side of the
threshold, ``inconclusive`` when it straddles the threshold, ``not testable
here`` when the runs that would answer it are missing (or cannot answer it on
this hardware). A value without a measured noise is judged as a point. The
summary's conclusions and the README block are written from this file, never
by hand. Reporting layer: pandas only, never TensorFlow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from chexlib.core.files import write_json
from chexlib.core.reference import (
    BIG_NODE,
    CHEXNET_MEAN_AUROC,
    POSTER_EFFICIENCY,
    POSTER_LINK,
    POSTER_MEAN_AUROC,
    POSTER_NODE,
    POSTER_RECORDS_GAIN,
    POSTER_THROUGHPUT,
)
from chexlib.report.allreduce_model import POSTER_CASE, TOLERANCE, case
from chexlib.report.cluster_scaling import TARGET_VS_CONCURRENT
from chexlib.report.summary import INPUT_BOUND_BELOW, ratio_with_noise, throughput_rows

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE = "supported", "not supported", "not testable here"
INCONCLUSIVE = "inconclusive"  # the measured interval straddles the threshold
VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE, NOT_TESTABLE)
# whose number a threshold is
POSTER, CHEXNET, OURS = "the poster's", "CheXNet's", "ours"
# the model standing in for a fast accelerator (chexlib.train.models)
STANDIN = "standin"


@dataclass(frozen=True)
class Claim:
    id: str
    question: str
    unit: str
    threshold: float | None
    source: str  # whose number the threshold is: POSTER, CHEXNET or OURS
    why: str  # why this number
    at_most: bool = False  # the measured value must stay at or under the threshold
    # the runs it is measured on (a kind of summary.load_study's left_out); None: no runs
    reads: str | None = "training"


class Measured(NamedTuple):
    """What a claim's measurement gives: the value (None: not measured), the runs it
    used, a note, and the noise (+- in the claim's unit; None: not measured)."""

    value: float | None
    runs: list
    note: str
    noise: float | None = None


_SMALLER_GAIN = min(POSTER_RECORDS_GAIN.values())
_GAINS = " and ".join(f"+{v} % ({k})" for k, v in POSTER_RECORDS_GAIN.items())
_POSTER_2GPU = POSTER_THROUGHPUT[2] / (2 * POSTER_THROUGHPUT[1])
_POSTER_AT = max(POSTER_EFFICIENCY)  # the largest GPU count whose efficiency the poster states
_CHECK_GBIT = 1.0  # the link rate at which the allreduce model is held to TOLERANCE
_CROSS_MODEL = "densenet121"

CLAIMS = [
    Claim("pipeline", "In end-to-end training that is input-bound (the fast-accelerator "
          "stand-in on raw PNG), does the optimized tf.data pipeline beat the naive one?",
          "x naive", 1.5, OURS, "the study's target for a 2-core CPU (issue 12), a gain far "
          "outside the run-to-run noise"),
    Claim("records", "In end-to-end training, do compact TFRecords (decoded once, stored at the "
          "training size) beat raw PNG files?", "x raw PNG", 3.0, OURS,
          "the study's target (issue 12): decoding once removes most of the input's work per "
          "image, which is most of an input-bound step"),
    Claim("png-records", "Do TFRecords holding the original PNG bytes beat raw PNG files by at "
          f"least the poster's smaller gain (+{_SMALLER_GAIN} %)?",
          "x raw PNG", 1 + _SMALLER_GAIN / 100, POSTER,
          f"the smaller of its TFRecords gains on 4 V100s, {_GAINS}"),
    Claim("scaling", "Does DenseNet121 keep its per-rank speed at 2 Horovod ranks when each "
          "rank has its own cores (weak-scaling efficiency)?", "efficiency", 0.85, OURS,
          f"the study's target (issue 12), about the poster's own {_POSTER_2GPU:.3f} at 2 GPUs"),
    Claim("ceiling", "Does the best input feed the input-bound model at its synthetic-data "
          "speed (real / synthetic, measured in the same run)?", "real / synthetic",
          INPUT_BOUND_BELOW, OURS, "the share of its synthetic ceiling under which the "
          "summary calls a run input-bound (summary.INPUT_BOUND_BELOW)"),
    Claim("learning", "Does training learn the findings (best test mean AUROC; generated data, "
          f"CheXNet's {CHEXNET_MEAN_AUROC} is on NIH's test set, theirs)?", "AUROC", 0.80, OURS,
          f"the study's target (issue 12), near the poster's {POSTER_MEAN_AUROC} validation mean "
          f"and under CheXNet's {CHEXNET_MEAN_AUROC} (theirs, on NIH images)"),
    Claim("localization", "Does Grad-CAM of the best-learning run point at the planted findings "
          "(pointing-game hit rate, averaged over findings with boxes; generated data)?",
          "hit rate", 0.6, OURS, "the study's target (issue 13): most findings found, far "
          "above chance", reads="localization"),
    Claim("feeding", "PROJECTION: can an 8-GPU node with 112 cores feed each GPU training "
          "DenseNet121 from raw PNG (cores one GPU needs, within its 14-core share)?",
          "cores per GPU", BIG_NODE["cores"] / BIG_NODE["gpus"], OURS,
          f"the cores per GPU of {BIG_NODE['name']}, a current GPU node",
          at_most=True, reads="profiling"),
    Claim("cross-node", "Across 2 nodes (LOCAL EMULATION, one core each), does DenseNet121 "
          "under Horovod keep its speed against two independent one-rank jobs running at the "
          "same time (unshaped link: what Horovod itself costs)?", "x independent jobs",
          TARGET_VS_CONCURRENT, OURS, "the target of issue 23: Horovod's allreduce and per-step "
          "work cost at most a tenth of a DenseNet121 step", reads=None),
    Claim("allreduce-model", "Does the ring-allreduce model predict DenseNet121's measured "
          f"2-node allreduce overhead at {_CHECK_GBIT:g} Gbit/s (|predicted - measured| / "
          "measured)?", "relative error", TOLERANCE, OURS, "the target of issue 23: close "
          "enough to project the poster's scaling from", at_most=True, reads=None),
    Claim("scaling-projection", "PROJECTION: does the network explain the poster's "
          f"{POSTER_EFFICIENCY[_POSTER_AT]:.1%} scaling efficiency at {_POSTER_AT} GPUs (a ring "
          f"allreduce of DenseNet121's float32 gradients over {POSTER_LINK['name']}, "
          f"{POSTER_LINK['gbit_per_s']:.0f} Gbit/s, not overlapped with compute: it does if the "
          "projected efficiency is at or under theirs)?", "efficiency",
          POSTER_EFFICIENCY[_POSTER_AT], POSTER, f"its measured efficiency at {_POSTER_AT} GPUs",
          at_most=True, reads=None),
]  # fmt: skip
BY_ID = {claim.id: claim for claim in CLAIMS}


def _verdict(claim: Claim, measured: float | None, noise: float | None = None) -> str:
    """The verdict of the interval ``measured +- noise`` (a point without noise)."""
    if measured is None or claim.threshold is None:
        return NOT_TESTABLE
    noise = noise or 0.0
    low, high = measured - noise, measured + noise
    sign = -1 if claim.at_most else 1  # at most: flip so "higher is better" below
    worst, best = sorted((sign * low, sign * high))
    if worst >= sign * claim.threshold:
        return SUPPORTED
    if best < sign * claim.threshold:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def _one(train: pd.DataFrame, **match) -> pd.Series | None:
    rows = train
    for key, value in match.items():
        rows = rows[rows[key] == value]
    return rows.iloc[-1] if len(rows) else None


def _compare(train, a: dict, b: dict, what: str) -> tuple:
    # the end-to-end comparisons: the stand-in, one rank on all cores
    base = {"model": STANDIN, "ranks": 1, "pin_cores": 0}
    train = throughput_rows(train)  # not a learning run of the same configuration
    ra, rb = _one(train, **base, **a), _one(train, **base, **b)
    if ra is None or rb is None:
        return Measured(None, [], f"no {what} runs of the stand-in at 1 rank in this study")
    cmp = ratio_with_noise(ra, rb)
    noise = f"; run-to-run noise +-{cmp['noise']:.0%}" if cmp["noise"] is not None else ""
    inside = " (within the noise: neither a gain nor a loss)" if cmp["within_noise"] else ""
    note = (
        f"{ra['images_per_sec']:.0f} vs {rb['images_per_sec']:.0f} images/s{noise}{inside}; "
        f"the {rb['input']} {rb['pipeline']} run is {rb.get('bound') or 'of unknown bound'}"
    )
    return Measured(cmp["ratio"], cmp["runs"], note, _absolute(cmp))


def _absolute(cmp: dict) -> float | None:
    """The noise of a ratio in its own unit (``ratio_with_noise`` gives it relative)."""
    return cmp["ratio"] * cmp["noise"] if cmp["noise"] is not None else None


def _pipeline(tables):
    return _compare(tables["train"], {"input": "raw PNG", "pipeline": "optimized"},
                    {"input": "raw PNG", "pipeline": "naive"}, "raw-PNG naive/optimized")  # fmt: skip


def _records(tables, variant: str):
    return _compare(tables["train"], {"input": variant, "pipeline": "optimized"},
                    {"input": "raw PNG", "pipeline": "optimized"}, f"{variant}/raw-PNG")  # fmt: skip


def _scaling(tables):
    train = throughput_rows(tables["train"])
    rows = train[
        (train["model"] == "densenet121") & (train["pin_cores"] > 0) & (train["ranks"] == 2)
    ]
    rows = rows.dropna(subset=["scaling_efficiency"])
    if rows.empty:
        return Measured(None, [], "no pinned 1- and 2-rank DenseNet121 runs in this study")
    row = rows.iloc[-1]
    one = _one(train, **{k: row[k] for k in ("model", "pipeline", "input", "pin_cores")}, ranks=1)
    standin = train[(train["model"] == STANDIN) & (train["pin_cores"] > 0) & (train["ranks"] == 2)]
    extra = standin["scaling_efficiency"].dropna()
    # efficiency = (2-rank images/s / 1-rank images/s) / 2: the ratio's relative noise
    cmp = ratio_with_noise(row, one)
    noise = cmp["noise"] * float(row["scaling_efficiency"]) if cmp["noise"] is not None else None
    note = (
        f"{row['images_per_sec']:.2f} images/s at 2 ranks vs {one['images_per_sec']:.2f} at 1 rank, "
        f"{row['pin_cores']} core(s) per rank, {row['input']}"
        + (f"; run-to-run noise +-{cmp['noise']:.0%}" if cmp["noise"] is not None else "")
        + (f"; the input-bound stand-in: {extra.iloc[-1]:.2f}" if len(extra) else "")
    )
    return Measured(float(row["scaling_efficiency"]), [one["run_id"], row["run_id"]], note, noise)


def _ceiling(tables):
    train = throughput_rows(tables["train"])
    # only ceilings measured in the same run (paired windows): a ceiling from another
    # run differs by the run-to-run noise, which is the size of the question
    rows = train[(train["model"] == STANDIN) & (train["pipeline"] == "optimized")
                 & (train["ranks"] == 1) & (train["pin_cores"] == 0)
                 & train["synthetic_paired"].astype(bool)]  # fmt: skip
    rows = rows.dropna(subset=["fraction_of_synthetic"])
    if rows.empty:
        return Measured(
            None, [], "no optimized stand-in runs with a paired synthetic ceiling in this study"
        )
    best = rows.loc[rows["images_per_sec"].idxmax()]
    spread = ""
    if pd.notna(best.get("fraction_min")) and pd.notna(best.get("fraction_max")):
        spread = f" (windows {best['fraction_min']:.2f}-{best['fraction_max']:.2f})"
    # the real windows' spread (the synthetic windows' is not recorded, so at least this)
    rel = _relative_ci(best)
    value = float(best["fraction_of_synthetic"])
    note = (
        f"best input: {best['input']} at {best['images_per_sec']:.0f} images/s, ceiling "
        f"{best['synthetic_images_per_sec']:.0f} from paired windows{spread}"
        + (f"; noise +-{rel:.0%} (its real windows)" if rel is not None else "")
    )
    return Measured(value, [best["run_id"]], note, value * rel if rel is not None else None)


def _relative_ci(row) -> float | None:
    ci, rate = row.get("images_per_sec_ci95"), row.get("images_per_sec")
    return float(ci / rate) if pd.notna(ci) and pd.notna(rate) and rate else None


def _learning(tables):
    train = tables["train"]
    scored = train[train["auroc_split"] == "test"].dropna(subset=["mean_auroc"])
    if scored.empty:
        return Measured(None, [], "no run evaluated the test split")
    best = scored.loc[scored["mean_auroc"].idxmax()]
    note = (
        f"{best['model']} on {best['input']}, {best.get('epochs')} epoch(s); generated data "
        "(planted findings), not comparable with NIH numbers"
    )
    return Measured(float(best["mean_auroc"]), [best["run_id"]], note)


def _feeding(tables):
    table = tables.get("feeding")
    if table is None or table.empty:
        return Measured(None, [], "no CPU cost per image measured (profiling stage missing)")
    raw = table[(table["model"] == "densenet121") & (table["input"] == "raw PNG")]
    h100 = raw[raw["gpu"] == "H100"]
    known = raw.dropna(subset=["cores_per_gpu"]).sort_values("images_per_sec")
    fastest = known.iloc[-1] if len(known) else None
    if len(h100) and h100["cores_per_gpu"].notna().any():
        row = h100.dropna(subset=["cores_per_gpu"]).iloc[-1]
        return Measured(float(row["cores_per_gpu"]), [], f"{row['source']}; projection")
    reason = h100["source"].iloc[0] if len(h100) else "no H100 rate"
    note = f"H100: {reason}, so not projected"
    if fastest is not None:
        node = POSTER_NODE["cores"] / POSTER_NODE["gpus"]
        note += (
            f"; the fastest published GPU here, {fastest['gpu']} {fastest['precision']}, needs "
            f"{fastest['cores_per_gpu']:.1f} cores for DenseNet121 from raw PNG "
            f"({fastest['cpu_ms_per_image']:.1f} CPU-ms/image measured; the poster's node gives "
            f"{node:.0f} per GPU); an H100 is faster still"
        )
    return Measured(None, [], note)


def _localization(tables):
    scored = [r for r in tables.get("localization") or [] if r.get("hit_rate") is not None]
    if not scored:
        return Measured(
            None, [], "no Grad-CAM run (chexlib explain) scored against boxes in this study"
        )
    best = max(scored, key=lambda r: r["hit_rate"])
    note = (
        # records written before the upsampling was a choice used bilinear
        f"{best.get('model')} ({best.get('layer')}, {best.get('upsampling', 'bilinear')} "
        f"upsampling), {best.get('boxes')} boxes of "
        f"{best.get('findings_with_boxes')} findings; chance {best.get('hit_rate_chance', 0):.2f}, "
        f"pooled over boxes {best.get('hit_rate_pooled', 0):.2f}, mean IoU {best.get('mean_iou', 0):.2f}"
    )
    rate, boxes = float(best["hit_rate"]), best.get("boxes")
    noise = None
    if boxes:  # binomial, 1.96 std over the boxes (approximate: the rate is a mean over findings)
        noise = 1.96 * math.sqrt(rate * (1 - rate) / boxes)
        note += f"; noise +-{noise:.2f} (binomial over the boxes)"
    return Measured(rate, [best["run_id"]], note, noise)


def _scaling_projection(tables):
    table = tables.get("scaling_projection")
    if table is None or table.empty:
        return Measured(None, [], "no scaling projection in the tables")
    rows = case(table, *POSTER_CASE).set_index("ranks")
    if _POSTER_AT not in rows.index:
        return Measured(None, [], f"the projection has no row at {_POSTER_AT} ranks")
    at, theirs = rows.loc[_POSTER_AT], POSTER_EFFICIENCY[_POSTER_AT]
    # the band: the allreduce TOLERANCE slower or faster than modelled
    noise = max(at["efficiency"] - at["efficiency_low"], at["efficiency_high"] - at["efficiency"])
    noise = float(noise) if pd.notna(noise) else None  # a table without the band
    limit = {
        SUPPORTED: "the network",
        NOT_SUPPORTED: "not the network (the rest of the loss is outside the model: input, "
        "synchronisation, software)",
        INCONCLUSIVE: "undecided, the network's share straddles theirs",
    }[_verdict(BY_ID["scaling-projection"], float(at["efficiency"]), noise)]
    note = (
        f"model: {at['allreduce_ms']:.1f} ms of allreduce per {at['compute_ms']:.0f} ms step "
        f"({at['grad_mbytes']:.1f} MB of gradients"
        + (
            f", latency {at['latency_us']:.0f} us per ring step assumed"
            if "latency_us" in at
            else ""
        )
        + f"), so the network costs {1 - at['efficiency']:.1%} of the {1 - theirs:.1%} the "
        f"poster lost; what limits the poster's scaling, according to the model: {limit}"
    )
    node = POSTER_NODE["gpus"]
    if node in rows.index and node in POSTER_EFFICIENCY:
        note += (
            f". At {node} GPUs (one node, where the modelled link is not even on the path) it "
            f"projects {rows.loc[node, 'efficiency']:.1%} against their {POSTER_EFFICIENCY[node]:.1%}"
        )
    if noise:
        note += f"; noise +-{noise:.3f}: the allreduce {TOLERANCE:.0%} slower or faster"
    note += _checks_note(tables.get("allreduce_checks") or [])
    return Measured(float(at["efficiency"]), [], note + "; projection", noise)


def _cluster_rows(tables) -> tuple[pd.DataFrame, float | None, str]:
    """Notebook 04c's DenseNet121 rows, the relative run-to-run noise of one run and what
    it was taken from: the ``alone`` runs repeat one configuration (one rank, no network)
    at every link rate, so their spread is this machine's noise between runs."""
    table = tables.get("cluster_scaling")
    if table is None or table.empty:
        return pd.DataFrame(), None, ""
    rows = table[table["model"] == _CROSS_MODEL]
    alone = rows.loc[rows["configuration"] == "alone", "images_per_sec_per_rank"].dropna()
    if len(alone) < 2:
        return rows, None, ""
    rel = float(alone.std() / alone.mean())
    return rows, rel, f"run-to-run noise +-{rel:.0%} per run (the {len(alone)} alone runs)"


def _cross_node(tables):
    rows, rel, noise_from = _cluster_rows(tables)
    if rows.empty:
        return Measured(
            None, [], "no cross-node scaling (notebook 04c) of DenseNet121 in this study"
        )
    at = {r["configuration"]: r for _, r in rows[rows["link_rate"] == "unshaped"].iterrows()}
    if not {"horovod", "concurrent"} <= set(at):
        return Measured(None, [], "no unshaped-link Horovod and independent-jobs runs of "
                        "DenseNet121 in this study")  # fmt: skip
    hvd, pair = at["horovod"], at["concurrent"]
    value = float(hvd["efficiency_vs_concurrent"])
    # a ratio of two runs, each with the relative noise ``rel``
    noise = value * rel * math.sqrt(2) if rel is not None else None
    note = (
        f"{hvd['images_per_sec_per_rank']:.1f} images/s per rank under Horovod vs "
        f"{pair['images_per_sec_per_rank']:.1f} for each of two independent jobs, batch "
        f"{int(hvd['batch_size_per_rank'])} per rank"
        + (f"; {noise_from}" if noise_from else "; noise not measured (fewer than 2 alone runs)")
        + "; LOCAL EMULATION: two network namespaces on one machine"
    )
    return Measured(value, [str(hvd["run_id"])], note, noise)


def _allreduce_model(tables):
    rows, rel, noise_from = _cluster_rows(tables)
    checks = [c for c in tables.get("allreduce_checks") or []
              if c.get("model") == _CROSS_MODEL and c.get("gbit_per_s") == _CHECK_GBIT]  # fmt: skip
    if not checks:
        return Measured(None, [], f"no measured 2-node overhead of DenseNet121 at "
                        f"{_CHECK_GBIT:g} Gbit/s in this study")  # fmt: skip
    check = checks[-1]
    predicted, measured = float(check["predicted_ms"]), float(check["measured_ms"])
    # the check's own error (predicted - measured) / measured, as its table prints it
    value = abs(float(check.get("relative_error", (predicted - measured) / measured)))
    noise = None
    shaped = rows[(rows["gbit_per_s"] == _CHECK_GBIT) & (rows["configuration"] == "concurrent")]
    if rel is not None and len(shaped):
        # measured = Horovod's step - the independent jobs' step, each +-rel of itself
        step = float(shaped["step_ms"].iloc[-1])
        noise_ms = rel * math.sqrt(step**2 + (step + measured) ** 2)
        noise = predicted / measured**2 * noise_ms
    note = (
        f"{predicted:.0f} ms predicted vs {measured:.0f} ms measured per step (Horovod's step "
        "minus the independent jobs' step), Horovod's timeline: "
        f"{check.get('timeline_allreduce_ms', float('nan')):.0f} ms of allreduce per step"
        + (f"; {noise_from}" if noise_from else "")
    )
    return Measured(value, [str(check.get("run_id", ""))], note, noise)


def _checks_note(checks: list[dict]) -> str:
    """What the model's checks against measured 2-host overheads (``allreduce_model.
    check_overhead`` of a study's runs) say; the model is untested without them."""
    if not checks:
        return "; the model is not checked against a measured 2-host overhead in this study"
    parts = [
        f"{c.get('model', 'a model')}: {c['predicted_ms']:.0f} vs {c['measured_ms']:.0f} ms measured at "
        f"{c['gbit_per_s']:g} Gbit/s ({'within' if c['within'] else 'OUTSIDE'} "
        f"{TOLERANCE:.0%})"
        for c in checks
    ]
    return "; the model's allreduce against measured 2-host overheads: " + ", ".join(parts)


_MEASURE = {
    "pipeline": _pipeline,
    "records": lambda t: _records(t, "compact-records"),
    "png-records": lambda t: _records(t, "png-records"),
    "scaling": _scaling,
    "ceiling": _ceiling,
    "learning": _learning,
    "localization": _localization,
    "feeding": _feeding,
    "cross-node": _cross_node,
    "allreduce-model": _allreduce_model,
    "scaling-projection": _scaling_projection,
}


_NAMED = 3  # runs left out that a note names; the rest are counted


def _left_out_note(left_out: list[dict]) -> str:
    named = "; ".join(f"{p['run_dir']} ({p['problem']})" for p in left_out[:_NAMED])
    more = f"; and {len(left_out) - _NAMED} more" if len(left_out) > _NAMED else ""
    return f"; LEFT OUT, bad record(s) it may have used: {named}{more}"


def verdicts(tables: dict) -> dict:
    """``{"hardware", "left_out", "claims": [...]}`` for every claim of :data:`CLAIMS`.

    A run left out of the tables (``tables["left_out"]``: unreadable or missing
    record, a measured value that is not a number) that measured what a claim
    reads (or whose kind is unknown) is named in that claim's note and
    ``left_out``: its verdict was reached without it.
    """
    claims = []
    left_out = list(tables.get("left_out") or [])
    for claim in CLAIMS:
        measured, runs, note, noise = _MEASURE[claim.id](tables)
        noise = None if measured is None or noise is None else float(noise)
        reads = claim.reads is not None  # a claim on published numbers alone reads no run
        missing = [p for p in left_out if reads and p.get("kind") in (claim.reads, None)]
        note += _left_out_note(missing) if missing else ""
        claims.append(
            {
                "id": claim.id,
                "question": claim.question,
                "measured": measured,
                "noise": noise,
                "unit": claim.unit,
                "threshold": claim.threshold,
                "comparison": "<=" if claim.at_most else ">=",
                "threshold_source": claim.source,
                "threshold_why": claim.why,
                "verdict": _verdict(claim, measured, noise),
                "runs": list(runs),
                "note": note,
                "left_out": [p["run_dir"] for p in missing],
            }
        )
    return {"hardware": tables.get("hardware", "unknown"), "left_out": left_out, "claims": claims}


def write_verdicts(result: dict, out_dir: str | Path) -> Path:

    return write_json(Path(out_dir) / "verdicts.json", result)


# what each verdict means, said once above the verdicts wherever they are printed
STATES = (
    f"Each verdict reads the measured interval (value ± its noise) against the threshold: "
    f"**{SUPPORTED}** or **{NOT_SUPPORTED}** when the whole interval is on one side, "
    f"**{INCONCLUSIVE}** when it straddles the threshold, **{NOT_TESTABLE}** when nothing in "
    "the study measured it; a value without a measured noise is read as a point. Each "
    "threshold says whose it is (the poster's, CheXNet's or ours) and why."
)


def _value(claim: dict) -> str:
    m, t, noise = claim["measured"], claim["threshold"], claim.get("noise")
    # verdicts.json written before the comparison was recorded: only feeding was "at most"
    sign = claim.get("comparison") or ("<=" if claim["id"] == "feeding" else ">=")
    source = claim.get("threshold_source")
    whose = f", {source}{': ' + claim['threshold_why'] if claim.get('threshold_why') else ''}"
    threshold = f"threshold {sign} {t:.2f}{whose if source else ''}"
    if m is None:
        return f"Not measured ({threshold})"
    what = "Projected" if claim["question"].startswith("PROJECTION") else "Measured"
    if noise is None:
        return f"{what} {m:.2f} {claim['unit']}, noise not measured ({threshold})"
    return (
        f"{what} {m:.2f} ± {noise:.2g} {claim['unit']}, interval {m - noise:.2f} to "
        f"{m + noise:.2f} ({threshold})"
    )


def conclusions(result: dict) -> str:
    """Markdown, one line per claim, written from the verdicts and nothing else."""
    lines = [f"Verdicts on {result['hardware']} (`verdicts.json`):", "", STATES, ""]
    left_out = result.get("left_out") or []
    if left_out:
        lines += [
            f"**{len(left_out)} run(s) left out: their records are bad or missing** "
            "(rerun them, or restore the record, then rerun the summary):",
            *(f"- `{p['run_dir']}`: {p['problem']}" for p in left_out),
            "",
        ]
    for c in result["claims"]:
        lines.append(f"- **{c['id']}: {c['verdict']}**. {c['question']} {_value(c)}. {c['note']}.")
    return "\n".join(lines)
