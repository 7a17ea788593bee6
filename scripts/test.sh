#!/usr/bin/env bash
# The tests of every crate, with the burn and candle adapters: what `cargo test --workspace
# --features burn,candle` runs, in two groups side by side.
#
# Without a GPU the tests spend their time in lavapipe compiling kernels, and a process compiles
# one kernel at a time (its test threads share one device), so a plain `cargo test`, which runs
# its test programs one after another, keeps one core busy. Here the longest program and three
# shorter ones run straight from the build (each in its package's folder, as `cargo test` runs
# it) beside `cargo test` running every other one: about ten minutes each on two cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
args=(--workspace --features burn,candle)
heavy=(backward cache snapshots interop)

# The build `cargo test` makes (examples included), and where it put the heavy programs.
built=$(mktemp)
cargo test "${args[@]}" --no-run --message-format=json-render-diagnostics >"$built"
programs=()
folders=()
for name in "${heavy[@]}"; do
  line=$(grep "\"kind\":\[\"test\"\],\"crate_types\":\[\"bin\"\],\"name\":\"$name\"" "$built")
  program=$(grep -o '"executable":"[^"]*"' <<<"$line" | cut -d'"' -f4)
  [ -n "$program" ] || { echo "test.sh: no test program named $name" >&2; exit 1; }
  programs+=("$program")
  folders+=("$(dirname "$(grep -o '"manifest_path":"[^"]*"' <<<"$line" | cut -d'"' -f4)")")
done
others=()
for file in tests/*.rs attn-*/tests/*.rs; do
  name=$(basename "$file" .rs)
  [[ " ${heavy[*]} " == *" $name "* ]] || others+=(--test "$name")
done

logs=$(mktemp -d)
(
  failed=0
  for i in "${!programs[@]}"; do
    echo "     Running ${programs[$i]}"
    (cd "${folders[$i]}" && "${programs[$i]}") || failed=1
  done
  exit "$failed"
) >"$logs/heavy" 2>&1 &
heavy_pid=$!
status=0
cargo test "${args[@]}" --lib --bins "${others[@]}" 2>&1 | tee "$logs/others" || status=1
cargo test "${args[@]}" --doc 2>&1 | tee -a "$logs/others" || status=1
wait "$heavy_pid" || status=1
cat "$logs/heavy"
exit "$status"
