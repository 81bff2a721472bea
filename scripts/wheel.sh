#!/usr/bin/env bash
# Builds flumeq's one wheel into dist/: abi3 (any CPython >= 3.9), tagged
# manylinux2014 (glibc >= 2.17). No Docker: zig, from the `ziglang` package,
# links the extension against glibc 2.17's symbols, and auditwheel checks the
# tag independently of maturin.
#   usage: scripts/wheel.sh            (uses .venv, made if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# Pinned: zig changes between minor versions in ways that break linking;
# 0.15.2 is the one maturin's own CI links with.
python -m pip install -q "maturin[zig]==1.16.0" "ziglang==0.15.2" "auditwheel==6.8.2"
rm -rf dist
maturin build --release --strip --zig --compatibility manylinux2014 --out dist
wheel=$(ls dist/flumeq-*.whl)
auditwheel show "$wheel" | grep -q 'manylinux_2_17_x86_64' || {
    auditwheel show "$wheel"
    echo "wheel.sh: $wheel is not manylinux_2_17 compatible" >&2
    exit 1
}
echo "wheel.sh: built $wheel (auditwheel: manylinux_2_17_x86_64)"
