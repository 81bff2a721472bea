#!/usr/bin/env bash
# One command from a fresh clone: set up, lint, then run the Rust unit tests
# and the Python suites (which start their own redis-server on a free port).
# Prints how long each phase took.
set -euo pipefail
cd "$(dirname "$0")/.."
phases=()
phase() {
    local name=$1 started=$SECONDS
    shift
    echo "== $name"
    "$@"
    phases+=("$(printf '%-10s %4ds' "$name" $((SECONDS - started)))")
}
phase setup bash scripts/setup.sh test,lint
. .venv/bin/activate
phase lint bash scripts/lint.sh
phase cargo-test cargo test --manifest-path rust/Cargo.toml
phase pytest python -m pytest "$@"
echo "== phase times"
printf '%s\n' "${phases[@]}"
