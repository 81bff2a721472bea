#!/usr/bin/env bash
# Creates one virtualenv per peer system under benches/.work/venvs/<system>
# from benches/requirements/<system>.txt (pinned). benches/run.py installs
# nothing itself; it skips, with a reason, any system whose venv is missing.
#   usage: bash benches/setup_peers.sh [system ...]     (default: all)
set -euo pipefail
cd "$(dirname "$0")"
systems=("$@")
if [ ${#systems[@]} -eq 0 ]; then
    systems=()
    for file in requirements/*.txt; do systems+=("$(basename "$file" .txt)"); done
fi
for system in "${systems[@]}"; do
    venv=".work/venvs/$system"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    "$venv/bin/python" -m pip install -q -U pip
    "$venv/bin/python" -m pip install -q -r "requirements/$system.txt"
    echo "setup_peers: $system ready ($("$venv/bin/python" -m pip freeze | grep -iE "^($system|celery|rq|dramatiq|arq|taskiq|saq|streaq)==" | tr '\n' ' '))"
done
