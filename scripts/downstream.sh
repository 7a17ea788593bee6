#!/usr/bin/env bash
# Builds attn as a user's crate gets it: packages the workspace's crates (`cargo package`), then
# builds `downstream/` against those packages and crates.io's cubecl (none of the workspace's
# `[patch]`es) in the shared target folder.
#
#   bash scripts/downstream.sh          # package, run on the default back end, check the cuda feature
#   bash scripts/downstream.sh package  # only package and unpack
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
target=${CARGO_TARGET_DIR:-$root/target}
cargo package --workspace --no-verify --allow-dirty --quiet
# Unpacked where downstream/Cargo.toml's [patch] expects them, wherever the target folder is.
packages=$root/downstream/packages
mkdir -p "$packages"
for crate in attn attn-types attn-dsl attn-macros attn-runtime attn-tune; do
  rm -rf "${packages:?}/$crate-0.1.0"
  tar -xzf "$target/package/$crate-0.1.0.crate" -C "$packages"
  # Packaged files carry a fixed old date: fresh ones, so a rebuild sees what changed.
  find "$packages/$crate-0.1.0" -type f -exec touch {} +
done
[ "${1:-}" = package ] && exit 0
# The workspace's versions of every shared dependency, so its compiled ones are reused.
cp Cargo.lock downstream/Cargo.lock
cd downstream
export CARGO_TARGET_DIR=$target
# The test build makes the program too, with the test's features (the snapshot feature of its
# dev-dependency): running that binary saves a second build of the attn crates.
# `workspace-units` only turns on the features the workspace's build gives the dependencies both
# share, so that their compiled units in the shared target folder are reused, not built again.
echo "== downstream: its kernels' snapshot test"
cargo test --quiet --features workspace-units
echo "== downstream: run on the default back end"
"$target/debug/attn-downstream"
echo "== downstream: cargo check --features cuda (crates.io cubecl, no patches)"
bash "$root/scripts/setup.sh" --cuda >/dev/null
CUDARC_CUDA_VERSION=${CUDARC_CUDA_VERSION:-13000} cargo check --quiet --features cuda
echo "downstream: ok"
