#!/usr/bin/env bash
# One command from a fresh clone: set up, lint, then run the Rust unit tests
# and the Python suites (which start their own redis-server on a free port).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test,lint
. .venv/bin/activate
bash scripts/lint.sh
cargo test --manifest-path rust/Cargo.toml
python -m pytest "$@"
