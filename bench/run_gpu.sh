#!/usr/bin/env bash
# On a GPU machine with PyTorch: unpack the prebuilt benchmark binary, run the device correctness
# grid, the prefill benchmark and the PyTorch comparison. Results land in $OUT (or bench/out).
#
#   bash bench/run_gpu.sh [commit]
#
# Expects .bin/bench.xz: `bash bench/build_gpu_binary.sh` makes it on the build machine.
set -euo pipefail
out=${OUT:-bench/out}
commit=${1:-unknown}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
unpack .bin/bench.xz "$work/bench"
chmod +x "$work/bench"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
# Each stage runs under a time limit (seconds; above what each takes on an H200), so a kernel
# that hangs costs that stage, not the whole trip: `timeout` exits 124 and the next stage runs.
# The logs are written line by line, so a stage cut short shows the last case it reached.
limit_check=${LIMIT_CHECK:-300}
limit_bench=${LIMIT_BENCH:-300}
limit_compare=${LIMIT_COMPARE:-300}
echo "== correctness grid on the device against float64"
# A failing check is reported and the benchmark still runs, so one trip measures everything.
timeout "$limit_check" "$work/bench" --check 2>&1 | grep --line-buffered -v '^.*: seed ' \
  | tee "$out/check.log" || echo "CHECK FAILED (or over ${limit_check} s)"
echo "== prefill benchmark"
timeout "$limit_bench" "$work/bench" --out "$work/cases" --iters "${ITERS:-10}" ${BENCH_ARGS:-} 2>&1 \
  | tee "$out/bench.log" || echo "BENCHMARK FAILED (or over ${limit_bench} s)"
echo "== PyTorch anchors and float64 check on the same data"
PYTHONUNBUFFERED=1 timeout "$limit_compare" python3 bench/compare.py --dir "$work/cases" \
  --commit "$commit" --iters "${ITERS:-10}" --json "$out/results.json" --md "$out/table.md" 2>&1 \
  | tee "$out/compare.log"
