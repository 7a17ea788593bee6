#!/usr/bin/env bash
# On a GPU machine with PyTorch: the decode benchmark and its comparison with SDPA (flash, cuDNN)
# and FlexAttention on the same data. Results land in $OUT (or bench/out).
#
#   bash bench/decode_gpu.sh [commit]
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
echo "== decode benchmark"
"$work/bench" --decode --out "$work/decode" --iters "${ITERS:-20}" ${BENCH_ARGS:-} 2>&1 \
  | grep -v ': seed ' | tee "$out/decode.log"
echo "== PyTorch anchors and float64 check on the same data"
PYTHONUNBUFFERED=1 python3 bench/decode.py --dir "$work/decode" --commit "$commit" \
  --iters "${ITERS:-20}" --json "$out/decode_results.json" --md "$out/decode_table.md" 2>&1 \
  | tee "$out/decode_compare.log"
