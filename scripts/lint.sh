#!/usr/bin/env bash
# ruff, mypy, cargo fmt --check, clippy -D warnings. Expects scripts/setup.sh lint.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check python tests benches examples scripts
ruff format --check python tests benches examples scripts
mypy
python -m mypy.stubtest flumeq._core
cargo fmt --all --check
cargo clippy --all-targets --features python -q -- -D warnings
