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
echo "== correctness grid on the device against float64"
# A failing check is reported and the benchmark still runs, so one trip measures everything.
"$work/bench" --check 2>&1 | grep -v '^.*: seed ' | tee "$out/check.log" || echo "CHECK FAILED"
echo "== prefill benchmark"
"$work/bench" --out "$work/cases" --iters "${ITERS:-10}" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
echo "== PyTorch anchors and float64 check on the same data"
PYTHONUNBUFFERED=1 python3 bench/compare.py --dir "$work/cases" --commit "$commit" \
  --iters "${ITERS:-10}" --json "$out/results.json" --md "$out/table.md" 2>&1 | tee "$out/compare.log"
