#!/usr/bin/env bash
# One command from a fresh clone: set up, then enqueue and drain 100k no-op
# tasks on a private redis-server, printing the rates.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
flumeq demo "$@"
