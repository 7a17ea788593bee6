#!/usr/bin/env bash
# On a GPU machine: a kernel change against its baseline, in one trip. Runs the correctness grid
# on the candidate, then times the candidate and the baseline in turns (A B A B …) so that both
# see the same machine, and tabulates each shape's TFLOP/s per turn and the ratio of the medians.
# Run-to-run spread on the H200 is a few percent; a change smaller than that needs the turns.
#
#   bash bench/ab_gpu.sh
#
# Expects .bin/bench.xz (the candidate) and .bin/base.xz (the baseline: `examples/bench` built
# the same way at the commit compared against; see build_gpu_binary.sh). REPEATS (default 2),
# ITERS (default 20) and BENCH_ARGS (default "--only 0-7,9") choose what is timed; ATTN_TUNE=off
# is set, so both run their untuned default tiles. DECODE_REPEATS (default 0) adds that many turns
# of the decode benchmark (`--decode`, DECODE_ARGS), compared by achieved bandwidth; CHECK=0 skips
# the correctness grid; DECODE_COMPARE=1 checks the candidate's first decode turn against float64
# and times the PyTorch anchors on its data (bench/decode.py). Results land in $OUT (or bench/out):
# check.log, ab.log (every timed line) and ab.md (the table); ptxas.txt where the candidate's PTX
# was carried in .bin/ptx.
set -euo pipefail
out=${OUT:-bench/out}
work=$(mktemp -d)
mkdir -p "$out"
source bench/unpack.sh
unpack .bin/bench.xz "$work/candidate"
unpack .bin/base.xz "$work/baseline"
export ATTN_TUNE=off
# The two builds never share compiled kernels: cubecl keys its store of them by the binary's
# build ID, which differs between any two builds of different code.
repeats=${REPEATS:-2}
iters=${ITERS:-20}
args=${BENCH_ARGS:---only 0-7,9}
# Time limits per stage (seconds), as in run_gpu.sh: a hang costs its stage, not the trip.
limit_check=${LIMIT_CHECK:-180}
limit_turn=${LIMIT_TURN:-150}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee "$out/device.txt"
# The candidate's PTX, where it was carried (`bench --ptx .bin/ptx`): registers, spills and any
# serialized warpgroup MMAs (ptxas C75xx) per kernel, assembled as the driver loads it (no -c).
ptxas=$(command -v ptxas || echo /usr/local/cuda/bin/ptxas)
if [ -d .bin/ptx ] && [ -x "$ptxas" ]; then
  echo "== ptxas on .bin/ptx"
  for ptx in .bin/ptx/*.ptx; do
    echo "-- $(basename "$ptx" .ptx)"
    timeout 60 "$ptxas" -arch=sm_90a -v "$ptx" -o /dev/null 2>&1 | grep -E 'registers|spill|C75' || true
  done | tee "$out/ptxas.txt"
fi
if [ "${CHECK:-1}" != 0 ]; then
  echo "== correctness grid of the candidate against float64"
  timeout "$limit_check" "$work/candidate" --check 2>&1 | grep --line-buffered -v '^.*: seed ' \
    | tee "$out/check.log" || echo "CHECK FAILED (or over ${limit_check} s)"
fi
: >"$out/ab.log"
for turn in $(seq 1 "$repeats"); do
  for build in candidate baseline; do
    echo "== $build $turn" | tee -a "$out/ab.log"
    # shellcheck disable=SC2086 # BENCH_ARGS is a list of options
    timeout "$limit_turn" "$work/$build" --out "$work/$build-$turn" --iters "$iters" $args 2>&1 \
      | grep --line-buffered 'TFLOP/s' | tee -a "$out/ab.log" \
      || echo "TIMING FAILED (or over ${limit_turn} s)" | tee -a "$out/ab.log"
  done
done
for turn in $(seq 1 "${DECODE_REPEATS:-0}"); do
  for build in candidate baseline; do
    echo "== $build $turn" | tee -a "$out/ab.log"
    # shellcheck disable=SC2086 # DECODE_ARGS is a list of options
    timeout "$limit_turn" "$work/$build" --decode --out "$work/$build-decode-$turn" --iters "$iters" \
      ${DECODE_ARGS:-} 2>&1 | grep --line-buffered 'TB/s' | tee -a "$out/ab.log" \
      || echo "TIMING FAILED (or over ${limit_turn} s)" | tee -a "$out/ab.log"
  done
done
if [ "${DECODE_COMPARE:-0}" != 0 ] && [ -d "$work/candidate-decode-1" ]; then
  # The candidate's first decode turn against float64 and the PyTorch anchors, on its data.
  echo "== decode: float64 check and anchors (candidate)"
  PYTHONUNBUFFERED=1 timeout "$limit_check" python3 bench/decode.py --dir "$work/candidate-decode-1" \
    --commit "${COMMIT:-candidate}" --iters "$iters" --json "$out/decode_results.json" \
    --md "$out/decode_table.md" 2>&1 | grep -v 'Warning\|return F.scaled' \
    | tee "$out/decode_compare.log" || echo "DECODE COMPARE FAILED (or over ${limit_check} s)"
fi
python3 - "$out/ab.log" "$out/ab.md" <<'EOF'
"""Tabulates ab.log: per shape, each turn's TFLOP/s (prefill) or TB/s (decode, the default plan)
and the ratio of the medians."""
import re
import statistics
import sys

runs = {"candidate": {}, "baseline": {}}
build = None
for line in open(sys.argv[1], encoding="utf-8"):
    head = re.match(r"== (candidate|baseline) \d+", line)
    if head:
        build = head.group(1)
        continue
    timed = re.match(r"(\S+): .*median [\d.]+ ms, ([\d.]+) TFLOP/s", line) or re.match(
        r"(\S+): default \S+ [\d.]+ ms \(([\d.]+) TB/s\)", line)
    if timed and build:
        runs[build].setdefault(timed.group(1), []).append(float(timed.group(2)))

rows = ["| shape | candidate TFLOP/s (TB/s) | baseline | candidate / baseline (medians) |",
        "|---|---|---|---:|"]
for shape, cand in runs["candidate"].items():
    base = runs["baseline"].get(shape, [])
    ratio = f"{statistics.median(cand) / statistics.median(base):.3f}" if base else "—"
    fmt = lambda xs: ", ".join(f"{x:.1f}" for x in xs) or "—"
    rows.append(f"| {shape} | {fmt(cand)} | {fmt(base)} | {ratio} |")
table = "\n".join(rows) + "\n"
open(sys.argv[2], "w", encoding="utf-8").write(table)
print(table)
EOF
