#!/usr/bin/env bash
# ruff, mypy (also for the lowest supported Python, 3.9), stubtest, cargo fmt
# --check, clippy -D warnings. Expects scripts/setup.sh lint.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check python tests benches examples scripts
ruff format --check python tests benches examples scripts
mypy
# Python 3.9 with the dependency versions pip installs there (mypy reads
# their types from that interpreter's site-packages).
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
py39=$(ls -d "$root"/versions/3.9.*/bin/python3 2>/dev/null | sort -V | tail -1 || true)
if [ -n "$py39" ]; then
    [ -x .venv-py39/bin/python ] || "$py39" -m venv .venv-py39
    deps=$(python - <<'PY'
try:
    import tomllib
except ImportError:  # Python < 3.11: mypy brings tomli
    import tomli as tomllib
with open("pyproject.toml", "rb") as project:
    meta = tomllib.load(project)["project"]
extras = meta["optional-dependencies"]
print("\n".join(meta["dependencies"] + extras["web"] + extras["metrics"] + extras["otel"] + extras["postgres"]))
PY
)
    # Installed again only when the dependency list changed.
    if [ "$(cat .venv-py39/deps.txt 2>/dev/null)" != "$deps" ]; then
        printf '%s\n' "$deps" > .venv-py39/requirements.txt
        .venv-py39/bin/python -m pip install -q --disable-pip-version-check typing_extensions types-croniter \
            -r .venv-py39/requirements.txt
        printf '%s' "$deps" > .venv-py39/deps.txt
    fi
    mypy --python-version 3.9 --python-executable .venv-py39/bin/python
else
    echo "lint: no CPython 3.9 under $root/versions: mypy for 3.9 skipped"
fi
python -m mypy.stubtest flumeq._core
cargo fmt --all --check
cargo clippy --all-targets --features python -q -- -D warnings
