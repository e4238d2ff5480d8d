"""The poster's questions as claims with measured verdicts (``verdicts.json``).

Each claim has an id, the question, what this study measured, the threshold
and a verdict: ``supported``, ``not supported`` or ``not testable here`` (the
runs that would answer it are missing, or cannot answer it on this hardware).
The summary's conclusions and the README block are written from this file,
never by hand. Reporting layer: pandas only, never TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from chexlib.core.files import write_json
from chexlib.core.reference import BIG_NODE, CHEXNET_MEAN_AUROC, POSTER_NODE, POSTER_RECORDS_GAIN
from chexlib.report.summary import ratio_with_noise, throughput_rows

SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE = "supported", "not supported", "not testable here"
# the model standing in for a fast accelerator (chexlib.train.models)
STANDIN = "standin"


@dataclass(frozen=True)
class Claim:
    id: str
    question: str
    unit: str
    threshold: float | None
    at_most: bool = False  # the measured value must stay at or under the threshold
    reads: str = "training"  # the runs it is measured on (a kind of summary.load_study's left_out)


CLAIMS = [
    Claim("pipeline", "In end-to-end training that is input-bound (the fast-accelerator "
          "stand-in on raw PNG), does the optimized tf.data pipeline beat the naive one?",
          "x naive", 1.5),
    Claim("records", "In end-to-end training, do compact TFRecords (decoded once, stored at the "
          "training size) beat raw PNG files?", "x raw PNG", 3.0),
    Claim("png-records", "Do TFRecords holding the original PNG bytes beat raw PNG files by at "
          f"least the poster's smaller gain (+{min(POSTER_RECORDS_GAIN.values())} %)?",
          "x raw PNG", 1 + min(POSTER_RECORDS_GAIN.values()) / 100),
    Claim("scaling", "Does DenseNet121 keep its per-rank speed at 2 Horovod ranks when each "
          "rank has its own cores (weak-scaling efficiency)?", "efficiency", 0.85),
    Claim("ceiling", "Does the best input feed the input-bound model at its synthetic-data "
          "speed (real / synthetic, measured in the same run)?", "real / synthetic", 0.9),
    Claim("learning", "Does training learn the findings (best test mean AUROC; generated data, "
          f"CheXNet's {CHEXNET_MEAN_AUROC} is on NIH's test set, theirs)?", "AUROC", 0.80),
    Claim("localization", "Does Grad-CAM of the best-learning run point at the planted findings "
          "(pointing-game hit rate, averaged over findings with boxes; generated data)?",
          "hit rate", 0.6, reads="localization"),
    Claim("feeding", "PROJECTION: can an 8-GPU node with 112 cores feed each GPU training "
          "DenseNet121 from raw PNG (cores one GPU needs, within its 14-core share)?",
          "cores per GPU", BIG_NODE["cores"] / BIG_NODE["gpus"], at_most=True,
          reads="profiling"),
]  # fmt: skip


def _verdict(claim: Claim, measured: float | None) -> str:
    if measured is None or claim.threshold is None:
        return NOT_TESTABLE
    ok = measured <= claim.threshold if claim.at_most else measured >= claim.threshold
    return SUPPORTED if ok else NOT_SUPPORTED


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
        return None, [], f"no {what} runs of the stand-in at 1 rank in this study"
    cmp = ratio_with_noise(ra, rb)
    noise = f"; run-to-run noise +-{cmp['noise']:.0%}" if cmp["noise"] is not None else ""
    inside = " (within the noise: neither a gain nor a loss)" if cmp["within_noise"] else ""
    note = (
        f"{ra['images_per_sec']:.0f} vs {rb['images_per_sec']:.0f} images/s{noise}{inside}; "
        f"the {rb['input']} {rb['pipeline']} run is {rb.get('bound') or 'of unknown bound'}"
    )
    return cmp["ratio"], cmp["runs"], note


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
        return None, [], "no pinned 1- and 2-rank DenseNet121 runs in this study"
    row = rows.iloc[-1]
    one = _one(train, **{k: row[k] for k in ("model", "pipeline", "input", "pin_cores")}, ranks=1)
    standin = train[(train["model"] == STANDIN) & (train["pin_cores"] > 0) & (train["ranks"] == 2)]
    extra = standin["scaling_efficiency"].dropna()
    note = (
        f"{row['images_per_sec']:.2f} images/s at 2 ranks vs {one['images_per_sec']:.2f} at 1 rank, "
        f"{row['pin_cores']} core(s) per rank, {row['input']}"
        + (f"; the input-bound stand-in: {extra.iloc[-1]:.2f}" if len(extra) else "")
    )
    return float(row["scaling_efficiency"]), [one["run_id"], row["run_id"]], note


def _ceiling(tables):
    train = throughput_rows(tables["train"])
    # only ceilings measured in the same run (paired windows): a ceiling from another
    # run differs by the run-to-run noise, which is the size of the question
    rows = train[(train["model"] == STANDIN) & (train["pipeline"] == "optimized")
                 & (train["ranks"] == 1) & (train["pin_cores"] == 0)
                 & train["synthetic_paired"].astype(bool)]  # fmt: skip
    rows = rows.dropna(subset=["fraction_of_synthetic"])
    if rows.empty:
        return None, [], "no optimized stand-in runs with a paired synthetic ceiling in this study"
    best = rows.loc[rows["images_per_sec"].idxmax()]
    spread = ""
    if pd.notna(best.get("fraction_min")) and pd.notna(best.get("fraction_max")):
        spread = f" (windows {best['fraction_min']:.2f}-{best['fraction_max']:.2f})"
    note = (
        f"best input: {best['input']} at {best['images_per_sec']:.0f} images/s, ceiling "
        f"{best['synthetic_images_per_sec']:.0f} from paired windows{spread}"
    )
    return float(best["fraction_of_synthetic"]), [best["run_id"]], note


def _learning(tables):
    train = tables["train"]
    scored = train[train["auroc_split"] == "test"].dropna(subset=["mean_auroc"])
    if scored.empty:
        return None, [], "no run evaluated the test split"
    best = scored.loc[scored["mean_auroc"].idxmax()]
    note = (
        f"{best['model']} on {best['input']}, {best.get('epochs')} epoch(s); generated data "
        "(planted findings), not comparable with NIH numbers"
    )
    return float(best["mean_auroc"]), [best["run_id"]], note


def _feeding(tables):
    table = tables.get("feeding")
    if table is None or table.empty:
        return None, [], "no CPU cost per image measured (profiling stage missing)"
    raw = table[(table["model"] == "densenet121") & (table["input"] == "raw PNG")]
    h100 = raw[raw["gpu"] == "H100"]
    known = raw.dropna(subset=["cores_per_gpu"]).sort_values("images_per_sec")
    fastest = known.iloc[-1] if len(known) else None
    if len(h100) and h100["cores_per_gpu"].notna().any():
        row = h100.dropna(subset=["cores_per_gpu"]).iloc[-1]
        return float(row["cores_per_gpu"]), [], f"{row['source']}; projection"
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
    return None, [], note


def _localization(tables):
    scored = [r for r in tables.get("localization") or [] if r.get("hit_rate") is not None]
    if not scored:
        return None, [], "no Grad-CAM run (chexlib explain) scored against boxes in this study"
    best = max(scored, key=lambda r: r["hit_rate"])
    note = (
        # records written before the upsampling was a choice used bilinear
        f"{best.get('model')} ({best.get('layer')}, {best.get('upsampling', 'bilinear')} "
        f"upsampling), {best.get('boxes')} boxes of "
        f"{best.get('findings_with_boxes')} findings; chance {best.get('hit_rate_chance', 0):.2f}, "
        f"pooled over boxes {best.get('hit_rate_pooled', 0):.2f}, mean IoU {best.get('mean_iou', 0):.2f}"
    )
    return float(best["hit_rate"]), [best["run_id"]], note


_MEASURE = {
    "pipeline": _pipeline,
    "records": lambda t: _records(t, "compact-records"),
    "png-records": lambda t: _records(t, "png-records"),
    "scaling": _scaling,
    "ceiling": _ceiling,
    "learning": _learning,
    "localization": _localization,
    "feeding": _feeding,
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
        measured, runs, note = _MEASURE[claim.id](tables)
        missing = [p for p in left_out if p.get("kind") in (claim.reads, None)]
        note += _left_out_note(missing) if missing else ""
        claims.append(
            {
                "id": claim.id,
                "question": claim.question,
                "measured": measured,
                "unit": claim.unit,
                "threshold": claim.threshold,
                "verdict": _verdict(claim, measured),
                "runs": list(runs),
                "note": note,
                "left_out": [p["run_dir"] for p in missing],
            }
        )
    return {"hardware": tables.get("hardware", "unknown"), "left_out": left_out, "claims": claims}


def write_verdicts(result: dict, out_dir: str | Path) -> Path:

    return write_json(Path(out_dir) / "verdicts.json", result)


def _value(claim: dict) -> str:
    m, t = claim["measured"], claim["threshold"]
    if m is None:
        return "Not measured"
    sign = "<=" if claim["id"] == "feeding" else ">="
    return f"Measured {m:.2f} {claim['unit']} (threshold {sign} {t:.2f})"


def conclusions(result: dict) -> str:
    """Markdown, one line per claim, written from the verdicts and nothing else."""
    lines = [f"Verdicts on {result['hardware']} (`verdicts.json`):", ""]
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
