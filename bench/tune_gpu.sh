#!/usr/bin/env bash
# On a GPU machine: time to first kernel and install-time tuning (issue: autotune).
#
#   bash bench/tune_gpu.sh
#
# Expects .bin/bench.xz and .bin/attn-tune.xz (`bash bench/build_gpu_binary.sh`). Results land in
# $OUT (or bench/out): first_call.log, tune.log, tune1.tsv and tune2.tsv (two tunings from
# empty caches), installed.log (the tuner run as a subcommand of the program's own binary).
#
# INSTALLED_ONLY=1 runs only that last part (needs only .bin/bench.xz): `bench attn-tune tune`
# at install, as a program that carries the tuner runs it, then the program's first calls in
# fresh processes.
set -euo pipefail
out=${OUT:-bench/out}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
unpack .bin/bench.xz "$work/bench"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
seq=${SEQ:-4096}
{
  echo "== install: the tuner inside the program's binary (bench attn-tune tune --variant Llama3)"
  start=$(date +%s%N)
  ATTN_CACHE_DIR="$work/own" "$work/bench" attn-tune tune --quiet --no-decode --variant Llama3 \
    --report "$out/installed.tsv"
  echo "install wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  echo "== after install: first calls of the program in fresh processes"
  for i in 1 2 3 4 5; do ATTN_CACHE_DIR="$work/own" "$work/bench" --first-call --seq "$seq"; done
} 2>&1 | tee "$out/installed.log"
[ "${INSTALLED_ONLY:-0}" = 1 ] && exit 0
unpack .bin/attn-tune.xz "$work/attn-tune"
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
  # Two independent tunings (fresh caches): a pick must hold in both.
  for run in 1 2; do
    dir="$work/installed"; [ "$run" = 2 ] && dir="$work/installed-again"
    echo "== attn-tune tune, run $run (default grid, every example variant, empty cache)"
    start=$(date +%s%N)
    ATTN_CACHE_DIR="$dir" "$work/attn-tune" tune --quiet --report "$out/tune$run.tsv"
    echo "attn-tune wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  done
  echo "== attn-tune tune again on run 1's cache (everything cached)"
  start=$(date +%s%N)
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" tune --quiet
  echo "attn-tune wall: $(( ($(date +%s%N) - start) / 1000000 )) ms"
  ATTN_CACHE_DIR="$work/installed" "$work/attn-tune" status
} 2>&1 | tee "$out/tune.log"
{
  echo "== after attn-tune: first calls in fresh processes (the first compiles, the rest load)"
  for i in 1 2 3 4 5 6; do ATTN_CACHE_DIR="$work/installed" "$work/bench" --first-call --seq "$seq"; done
  echo "== the same with the compiled-kernel store off"
  for i in 1 2; do ATTN_KERNEL_CACHE=off ATTN_CACHE_DIR="$work/installed" "$work/bench" --first-call --seq "$seq"; done
} 2>&1 | tee -a "$out/first_call.log"
