#!/usr/bin/env bash
# Runs every example's demo.py (each starts its own private redis-server) as
# a smoke test; stops at the first that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
for demo in examples/*/demo.py; do
    echo "-- $demo"
    (cd "$(dirname "$demo")" && python demo.py)
done
