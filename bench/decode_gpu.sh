#!/usr/bin/env bash
# On a GPU machine with PyTorch: the decode benchmark and its comparison with SDPA (flash, cuDNN)
# and FlexAttention on the same data. Results land in $OUT (or bench/out).
#
#   bash bench/decode_gpu.sh [commit]
#
# Expects .bin/bench.xz (cubecl's LLVM back end) and optionally .bin/bench-cpp.xz (its CUDA C++
# back end, NVRTC): `bash bench/build_gpu_binary.sh` makes them on the build machine. Each binary
# found is measured, each against the anchors of the same run.
set -euo pipefail
out=${OUT:-bench/out}
commit=${1:-unknown}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
for build in bench bench-cpp; do
  [ -f ".bin/$build.xz" ] || continue
  unpack ".bin/$build.xz" "$work/$build"
  chmod +x "$work/$build"
  echo "== decode benchmark ($build)"
  "$work/$build" --decode --out "$work/$build-decode" --iters "${ITERS:-20}" ${BENCH_ARGS:-} 2>&1 \
    | grep -v ': seed ' | tee "$out/$build-decode.log"
  echo "== PyTorch anchors and float64 check on the same data ($build)"
  PYTHONUNBUFFERED=1 python3 bench/decode.py --dir "$work/$build-decode" --commit "$commit ($build)" \
    --iters "${ITERS:-20}" --json "$out/decode_results.json" --md "$out/$build-decode_table.md" 2>&1 \
    | grep -v 'Warning\|return F.scaled' | tee "$out/$build-decode_compare.log"
done
