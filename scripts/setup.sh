#!/usr/bin/env bash
# Installs what attn needs on a fresh Debian machine. Idempotent and quick when already done.
#
#   bash scripts/setup.sh          # the portable back end (wgpu on Vulkan; lavapipe without a GPU)
#   bash scripts/setup.sh --cuda   # also the LLVM that cubecl's CUDA back end links against
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sudo=""
[ "$(id -u)" = 0 ] || sudo=sudo

need=()
dpkg -s mesa-vulkan-drivers >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
dpkg -s libvulkan1 >/dev/null 2>&1 || need+=(libvulkan1)
if [ "${1:-}" = "--cuda" ]; then
  dpkg -s llvm-22-dev >/dev/null 2>&1 || need+=(llvm-22-dev)
  dpkg -s libzstd-dev >/dev/null 2>&1 || need+=(libzstd-dev)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ "${1:-}" = "--cuda" ]; then
  bash "$here/prepare-llvm.sh"
fi
echo "setup done"
