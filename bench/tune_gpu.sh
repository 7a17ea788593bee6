#!/usr/bin/env bash
# On a GPU machine: time to first kernel and install-time tuning (issue: autotune).
#
#   bash bench/tune_gpu.sh
#
# Expects .bin/bench.xz and .bin/attn-tune.xz (`bash bench/build_gpu_binary.sh`). Results land in
# $OUT (or bench/out): first_call.log, tune.log, tune.tsv.
set -euo pipefail
out=${OUT:-bench/out}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
unpack .bin/bench.xz "$work/bench"
unpack .bin/attn-tune.xz "$work/attn-tune"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
seq=${SEQ:-4096}
{
  echo "== cold process, empty cache, tuning off (fallback shape: client + compile + run)"
  ATTN_CACHE_DIR="$work/cold-off" ATTN_TUNE=off "$work/bench" --first-call --seq "$seq"
  echo "== cold process, empty cache, tuning on (the first call tunes this key)"
  ATTN_CACHE_DIR="$work/cold-on" "$work/bench" --first-call --seq "$seq"
  echo "== a new process on that cache (tuned shape and compiled kernels on disk)"
  ATTN_CACHE_DIR="$work/cold-on" "$work/bench" --first-call --seq "$seq"
} 2>&1 | tee "$out/first_call.log"
{
  echo "== attn-tune list"
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" list
  echo "== attn-tune tune (default grid, every example variant)"
  start=$(date +%s%N)
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" tune --quiet --report "$out/tune.tsv"
  echo "attn-tune wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  echo "== attn-tune tune again (everything cached)"
  start=$(date +%s%N)
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" tune --quiet
  echo "attn-tune wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" status
} 2>&1 | tee "$out/tune.log"
{
  echo "== after attn-tune: first calls in fresh processes"
  for i in 1 2; do ATTN_CACHE_DIR="$work/installed" "$work/bench" --first-call --seq "$seq"; done
} 2>&1 | tee -a "$out/first_call.log"
