#!/usr/bin/env bash
# The tests of every crate, with the burn and candle adapters: what `cargo test --workspace
# --features burn,candle` runs, in two groups side by side.
#
# Without a GPU the tests spend their time in lavapipe compiling kernels, and a process compiles
# one kernel at a time (its test threads share one device), so a plain `cargo test`, which runs
# its test programs one after another, keeps one core busy. Here the two longest programs run
# straight from the build beside `cargo test` running every other one.
set -euo pipefail
cd "$(dirname "$0")/.."
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}
args=(--workspace --features burn,candle)
heavy=(backward decode)

# The build `cargo test` makes (examples included), and where it put the heavy programs.
built=$(mktemp)
cargo test "${args[@]}" --no-run --message-format=json-render-diagnostics >"$built"
programs=()
for name in "${heavy[@]}"; do
  program=$(grep "\"kind\":\[\"test\"\],\"crate_types\":\[\"bin\"\],\"name\":\"$name\"" "$built" |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
  [ -n "$program" ] || { echo "test.sh: no test program named $name" >&2; exit 1; }
  programs+=("$program")
done
others=()
for file in tests/*.rs attn-*/tests/*.rs; do
  name=$(basename "$file" .rs)
  [[ " ${heavy[*]} " == *" $name "* ]] || others+=(--test "$name")
done

logs=$(mktemp -d)
(
  failed=0
  for program in "${programs[@]}"; do
    echo "     Running $program"
    "$program" || failed=1
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
