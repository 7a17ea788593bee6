#!/usr/bin/env bash
# On a GPU machine with PyTorch: the backward benchmark (each selected prefill case's forward,
# then every backward plan timed) and its comparison with PyTorch's backward passes (SDPA flash,
# cuDNN, FlexAttention) and float64 on the same data. Results land in $OUT (or bench/out).
#
#   BACKWARD_CASES=3,5,9 bash bench/backward_gpu.sh [commit]
#
# Expects .bin/bench.xz: `bash bench/build_gpu_binary.sh` makes it on the build machine.
set -euo pipefail
out=${OUT:-bench/out}
commit=${1:-unknown}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
unpack .bin/bench.xz "$work/bench"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
# Llama-3 GQA causal, MHA d 64, the variant space (window, packed documents, ALiBi, sinks, the
# custom mask): the shapes of the forward benchmark's cases.
cases=${BACKWARD_CASES:-3,5,9,13,14,15,16}
echo "== backward benchmark (cases $cases)"
timeout "${LIMIT_BENCH:-400}" "$work/bench" --backward --only "$cases" --out "$work/cases" \
  --iters "${ITERS:-10}" 2>&1 | tee "$out/backward.log" || echo "BENCHMARK FAILED (or over the limit)"
echo "== PyTorch backward passes and float64 on the same data"
PYTHONUNBUFFERED=1 timeout "${LIMIT_COMPARE:-400}" python3 bench/backward.py --dir "$work/cases" \
  --commit "$commit" --iters "${ITERS:-10}" --json "$out/backward_results.json" \
  --md "$out/backward_table.md" 2>&1 | grep -v 'Warning\|warnings.warn' | tee "$out/backward_compare.log"
