#!/usr/bin/env bash
# `make bench`: chexlib's benchmark commands, measured side by side in one run,
# then each ratio printed with its target. Benchmarks are not tests: timings on
# a shared or busy machine are noisy, so read the spread printed with each run.
#
# Everything is generated under outputs/bench/ (git-ignored) and reused by the
# next run: the dataset and the records are only made when missing.
# Settings can be overridden from the environment, e.g.
#   BENCH_IMAGES=1000 BENCH_BATCHES=120 make bench
set -euo pipefail
cd "$(dirname "$0")/.."

export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}  # keep TensorFlow's start-up logging out of the results
VENV=${VENV:-.venv}
CHEXLIB="$VENV/bin/chexlib"
BENCH_DIR=${BENCH_DIR:-outputs/bench}
N_IMAGES=${BENCH_IMAGES:-300}          # generated images (NIH layout)
SOURCE_SIZE=${BENCH_SOURCE_SIZE:-1024} # their side in pixels, as NIH's
BATCH=${BENCH_BATCH:-32}               # images per batch
IMAGE_SIZE=${BENCH_IMAGE_SIZE:-224}    # model input side
BATCHES=${BENCH_BATCHES:-60}           # timed batches per measurement (5 windows)
DEVICE_TIMES=${BENCH_DEVICE_TIMES:-1.5}  # simulated device speed / measured single-core rate

DATA="$BENCH_DIR/data"
echo "== machine load before the run: $(cut -d" " -f1-3 /proc/loadavg) (1, 5, 15 min) on $(nproc) cores"
RESULTS="$BENCH_DIR/pipeline"
mkdir -p "$RESULTS"
rm -f "$RESULTS"/*.json

echo "== dataset: $N_IMAGES generated images of ${SOURCE_SIZE}x${SOURCE_SIZE} in $DATA"
"$CHEXLIB" synth "$DATA" --images "$N_IMAGES" --size "$SOURCE_SIZE" --seed 0 --no-progress

# ---- records conversion (chexlib.records.read; its conversion benchmark may go here) ----
# compact records at convert's DEFAULT size, which is the training size: the resize is done once, here
echo "== records: compact (default size, raw uint8) and png (original bytes), 32 images per shard"
"$CHEXLIB" convert "$DATA" "$BENCH_DIR/records-compact" --variant compact \
  --images-per-shard 32 --no-progress --overwrite > /dev/null
"$CHEXLIB" convert "$DATA" "$BENCH_DIR/records-png" --variant png \
  --images-per-shard 32 --no-progress --overwrite > /dev/null
# ---- end of records conversion ----

# ---- input pipelines (chexlib.pipeline.builders, chexlib.bench.measure) ----
common=(--batch-size "$BATCH" --image-size "$IMAGE_SIZE" --batches "$BATCHES" --windows 5)
measure() {  # measure NAME ARGS...: one chexlib bench-pipeline run into RESULTS/NAME.json
  local name=$1
  shift
  echo "== $name"
  "$CHEXLIB" bench-pipeline "$@" "${common[@]}" --json "$RESULTS/$name.json" | grep -v "written:"
}
raw=(--source raw --data "$DATA")
measure naive-raw --pipeline naive "${raw[@]}"
measure optimized-raw --pipeline optimized "${raw[@]}" --reference-rates --paired-with keras-directory
measure keras-directory-raw --pipeline keras-directory "${raw[@]}"
measure keras-raw --pipeline keras-sequence "${raw[@]}"
measure optimized-compact --pipeline optimized --source records --records "$BENCH_DIR/records-compact"
measure optimized-png --pipeline optimized --source records --records "$BENCH_DIR/records-png"

# The uint8 input contract: the same optimized raw-PNG pipeline handing over one uint8
# grey channel (the model normalises) or normalised float32 x3 (the contract before),
# in alternating processes, so the CPU ms it saves is read from adjacent runs.
for round in $(seq 1 "${BENCH_CONTRACT_ROUNDS:-3}"); do
  measure "contract-uint8-$round" --pipeline optimized "${raw[@]}"
  measure "contract-float-$round" --pipeline optimized "${raw[@]}" --normalize-in-pipeline
done

# A SIMULATED accelerator at DEVICE_TIMES the single-core rate measured above.
device=(--device-times "$DEVICE_TIMES" --device-reference "$RESULTS/optimized-raw.json")
measure device-naive --pipeline naive "${raw[@]}" "${device[@]}"
measure device-optimized --pipeline optimized "${raw[@]}" "${device[@]}"
# ---- end of input pipelines ----

echo
"$CHEXLIB" bench-report "$RESULTS"
