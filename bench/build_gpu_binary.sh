#!/usr/bin/env bash
# Builds the CUDA binaries here (no GPU needed): the benchmark and `attn-tune`, stripped and
# xz-compressed into .bin/ (together under the 64 MiB a GPU machine's transfer takes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --cuda
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
cargo build --release --no-default-features --features cuda --example bench
cargo build --release -p attn-tune --no-default-features --features cuda
mkdir -p .bin
rm -f .bin/bench.gz .bin/bench.xz .bin/attn-tune.xz
strip -o .bin/bench "${CARGO_TARGET_DIR:-target}/release/examples/bench"
strip -o .bin/attn-tune "${CARGO_TARGET_DIR:-target}/release/attn-tune"
xz -f -T2 -6 .bin/bench .bin/attn-tune
ls -l .bin/
