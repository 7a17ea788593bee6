#!/usr/bin/env bash
# Builds the CUDA benchmark binary here (no GPU needed), strips and gzips it into .bin/bench.gz,
# small enough to carry to a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --cuda
export CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000}
cargo build --release --no-default-features --features cuda --example bench
mkdir -p .bin
strip -o .bin/bench "${CARGO_TARGET_DIR:-target}/release/examples/bench"
gzip -f -9 .bin/bench
ls -l .bin/bench.gz
