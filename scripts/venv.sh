#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned stack; sourced by scripts/demo.sh and scripts/test.sh.
# Reinstalls only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MTSERVE_VENV:-$root/.venv}"
stamp="$venv/.mtserve-installed"
wanted="$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "mtserve: installing the pinned environment into $venv (a few minutes, once)" >&2
    "$venv/bin/python" -m pip install -q --upgrade pip
    # torch first, by exact version: this pin is the CPU build; anything else pulls GBs of CUDA.
    "$venv/bin/python" -m pip install -q "torch==2.13.0"
    "$venv/bin/python" -m pip install -q -c "$root/constraints.txt" -e "$root[server,eval,demo,test]"
    echo "$wanted" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
