#!/usr/bin/env bash
# The demo from nothing: pinned venv, SmolLM2-135M + MMLU/ARC prepared once (pip), then the gate.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/venv.sh"
exec mtserve demo "$@"
