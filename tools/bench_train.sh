#!/usr/bin/env bash
# Training throughput benchmark (part of `make bench`; not a test).
#
# For each model (DenseNet121, ResNet50 at 224x224) and each rank count (1, 2),
# side by side in one run: the synthetic-data ceiling (one repeated random
# batch), then real data through the optimized pipeline from raw PNGs and from
# compact TFRecords, and the naive pipeline from raw PNGs. Prints images/s
# (median over timed windows after warm-up, +- 1.96 std), each real run as a
# fraction of the synthetic ceiling of the same model and ranks (target for
# optimized: >= 97 %), and 2 ranks / 1 rank.
#
# On a 2-core machine without GPUs both ranks share the same two cores, so
# "2 ranks / 1 rank" checks correctness and Horovod's overhead; it is not a
# scaling measurement. Timings on a shared or busy machine are noisy: read the
# spread printed with each number.
#
# Usage: tools/bench_train.sh            (from anywhere; outputs in outputs/bench/train)
# Settings from the environment, e.g.
#   BENCH_TRAIN_MODELS=resnet50 BENCH_TRAIN_RANKS="1" BENCH_TRAIN_STEPS=12 tools/bench_train.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
CHEXLIB="$VENV/bin/chexlib"
HOROVODRUN="$VENV/bin/horovodrun"
PY="$VENV/bin/python"
BENCH_DIR=${BENCH_DIR:-outputs/bench}
OUT="$BENCH_DIR/train"
DATA=${BENCH_TRAIN_DATA:-$BENCH_DIR/train-data}     # generated NIH-layout dataset (reused)
N_IMAGES=${BENCH_TRAIN_IMAGES:-1200}               # enough for STEPS x BATCH per rank at 2 ranks
SOURCE_SIZE=${BENCH_TRAIN_SOURCE_SIZE:-1024}       # PNG side, as NIH's
MODELS=${BENCH_TRAIN_MODELS:-"densenet121 resnet50"}
RANKS=${BENCH_TRAIN_RANKS:-"1 2"}
IMAGE_SIZE=${BENCH_TRAIN_IMAGE_SIZE:-224}
RECORDS="$OUT/records-compact-$IMAGE_SIZE"         # written at the model size
BATCH=${BENCH_TRAIN_BATCH:-16}                     # per rank
STEPS=${BENCH_TRAIN_STEPS:-20}                     # steps per run: WARMUP + windows x WINDOW
WARMUP=${BENCH_TRAIN_WARMUP:-4}                    # untimed steps (compilation, start-up)
WINDOW=${BENCH_TRAIN_WINDOW:-4}                    # steps per timed window
INPUTS=${BENCH_TRAIN_INPUTS:-"synthetic optimized-raw optimized-records naive-raw"}
REPEATS=${BENCH_TRAIN_REPEATS:-1}                  # >1 on a busy machine: runs interleave, medians reported

mkdir -p "$OUT/runs"
echo "== dataset: $N_IMAGES generated images of ${SOURCE_SIZE}x${SOURCE_SIZE} in $DATA"
"$CHEXLIB" synth "$DATA" --images "$N_IMAGES" --size "$SOURCE_SIZE" --seed 0 --no-progress > /dev/null
if [[ " $INPUTS " == *" optimized-records "* ]]; then
  echo "== records: compact (${IMAGE_SIZE} px, the model size) in $RECORDS"
  "$CHEXLIB" convert "$DATA" "$RECORDS" --variant compact --size "$IMAGE_SIZE" --no-progress > /dev/null
fi

common=(--epochs 1 --steps-per-epoch "$STEPS" --batch-size "$BATCH" --image-size "$IMAGE_SIZE"
        --warmup-epochs 0 --no-evaluate --no-checkpoint --verbose 2
        --throughput-warmup-steps "$WARMUP" --throughput-window-steps "$WINDOW")
declare -A input_args=(
  [synthetic]="--synthetic --data $DATA"
  [optimized-raw]="--source raw --data $DATA --pipeline optimized"
  [optimized-records]="--source records --records $RECORDS --data $DATA --pipeline optimized"
  [naive-raw]="--source raw --data $DATA --pipeline naive"
)

rm -rf "$OUT/runs"
for model in $MODELS; do
  for np in $RANKS; do
    for repeat in $(seq 1 "$REPEATS"); do
    for input in $INPUTS; do
      run="$OUT/runs/$model-$input-np$np-r$repeat"
      echo "== $model, $input, $np rank(s), repeat $repeat"
      # shellcheck disable=SC2206
      args=(train --model "$model" --out "$run" ${input_args[$input]} "${common[@]}")
      if [ "$np" = 1 ]; then
        "$CHEXLIB" "${args[@]}" 2>&1 | grep -E "throughput|steps/epoch" || true
      else
        "$HOROVODRUN" -np "$np" -H "localhost:$np" --gloo "$CHEXLIB" "${args[@]}" 2>&1 \
          | grep -E "throughput|steps/epoch" || true
      fi
      [ -f "$run/metrics.json" ] || { echo "bench_train: $run failed" >&2; exit 1; }
    done
    done
  done
done

echo
"$PY" - "$OUT" <<'EOF'
"""Table of the runs just made: images/s, fraction of the synthetic ceiling, 2 ranks / 1 rank."""
import json
import sys
from pathlib import Path

import pandas as pd

out = Path(sys.argv[1])
rows = []
for path in sorted((out / "runs").glob("*/metrics.json")):
    m = json.loads(path.read_text())
    name = path.parent.name
    rows.append({
        "model": m["model"], "input": name.split("-", 1)[1].rsplit("-np", 1)[0], "ranks": m["ranks"],
        "images_per_sec": m["images_per_sec"], "per_rank": m["images_per_sec_per_rank"],
        "ci95": m["images_per_sec_ci95"], "windows": m["throughput"]["per_rank"][0]["windows"],
    })
runs = pd.DataFrame(rows)
runs.to_csv(out / "runs.csv", index=False)
# median over repeats (each repeat ran every input, interleaved)
t = runs.groupby(["model", "input", "ranks"], as_index=False).agg(
    images_per_sec=("images_per_sec", "median"), per_rank=("per_rank", "median"),
    ci95=("ci95", "median"), windows=("windows", "sum"), repeats=("images_per_sec", "size"))
ceiling = t[t["input"] == "synthetic"].set_index(["model", "ranks"])["images_per_sec"]
t["of_synthetic"] = [r.images_per_sec / ceiling.get((r.model, r.ranks), float("nan")) for r in t.itertuples()]
one = t[t["ranks"] == 1].set_index(["model", "input"])["images_per_sec"]
t["vs_1_rank"] = [r.images_per_sec / one.get((r.model, r.input), float("nan")) for r in t.itertuples()]
t = t.sort_values(["model", "ranks", "input"])
pd.set_option("display.width", 160)
print(t.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
t.to_csv(out / "summary.csv", index=False)
print()
for r in t[t["input"] == "optimized-raw"].itertuples():
    verdict = "meets" if r.of_synthetic >= 0.97 else "MISSES"
    print(f"{r.model}, {r.ranks} rank(s): optimized raw = {r.of_synthetic:.1%} of synthetic "
          f"({verdict} the >= 97 % target)")
for r in t[t["input"] == "optimized-records"].itertuples():
    print(f"{r.model}, {r.ranks} rank(s): optimized records = {r.of_synthetic:.1%} of synthetic")
print("2 ranks on this machine share its cores: 'vs_1_rank' is an overhead check, not scaling.")
print(f"summary: {out / 'summary.csv'}")
EOF
