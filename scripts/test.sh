#!/usr/bin/env bash
# One command from a fresh clone: build the wheel, install it (not the source
# tree) into .venv with the test tools, lint, then run the Rust unit tests,
# the Python suites against the installed wheel (they start their own
# redis-server on a free port), the examples, and the wheel's smoke test on
# CPython 3.9 and 3.13 without a Rust toolchain. Prints how long each phase
# took.
set -euo pipefail
cd "$(dirname "$0")/.."
phases=()
phase() {
    local name=$1 started=$SECONDS
    shift
    echo "== $name"
    "$@"
    phases+=("$(printf '%-11s %4ds' "$name" $((SECONDS - started)))")
}
phase wheel bash scripts/wheel.sh
FLUMEQ_WHEEL=$(ls "$PWD"/dist/flumeq-*.whl)
export FLUMEQ_WHEEL
phase setup bash scripts/setup.sh test,lint
. .venv/bin/activate
phase lint bash scripts/lint.sh
phase cargo-test cargo test --manifest-path rust/Cargo.toml
FLUMEQ_EXPECT_WHEEL=1 phase pytest python -m pytest "$@"
phase examples bash scripts/examples.sh
phase wheel-smoke bash scripts/wheel_smoke.sh
echo "== phase times"
printf '%s\n' "${phases[@]}"
