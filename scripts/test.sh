#!/usr/bin/env bash
# Run the project's tests from nothing: pinned venv, then pytest (slow end-to-end tests included).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/venv.sh"
cd "$root"
exec python -m pytest "$@"
