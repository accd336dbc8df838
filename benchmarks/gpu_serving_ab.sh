#!/usr/bin/env bash
# Side by side on one GPU host: serving_overhead.py at 8B (1,024 MMLU-shaped requests, 3
# rounds, 64 clients, batches of 32) once per SIDE, in one call, so every number compares
# on the same card:
#   benchmarks/gpu_serving_ab.sh BUNDLE.tar.xz 'LABEL=OPTIONS' ['LABEL=OPTIONS' ...]
# OPTIONS are serving_overhead.py's, e.g.
#   'default=' 'unfused=--attention-backend=unfused' 'python5=--server-arg=--gil-switch-interval-ms=5'
#   'profiled=--profile-with $PY_SPY --profile-out $OUT/profiles'
# A side labelled "old" imports the package in OLD_PACKAGE (a tar of
# `git archive REV pytest_mtserve`) instead of this tree's. PY_SPY_WHEEL: a py-spy manylinux
# wheel (`pip download py-spy --no-deps --only-binary=:all: --platform manylinux2014_x86_64`),
# unpacked on the host as $PY_SPY. The bundle installs as gpu_suite.sh installs it.
set -uo pipefail
bundle="${1:?usage: gpu_serving_ab.sh BUNDLE.tar.xz 'LABEL=OPTIONS' ...}"
shift
repo="$PWD"
export OUT="${OUT:-/tmp/mtserve-ab}" PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
server_python=/tmp/mtserve-server/bin/python
if [ ! -x "$server_python" ]; then
    DATASETS=benchmarks bash benchmarks/gpu_suite.sh 1 "$bundle" none > "$OUT/install.log" 2>&1
    tail -n 3 "$OUT/install.log"
fi
if [ -n "${PY_SPY_WHEEL:-}" ]; then
    "$server_python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/py-spy')" "$PY_SPY_WHEEL"
    PY_SPY="$(find /tmp/py-spy -name py-spy -type f)"
    chmod +x "$PY_SPY"
    export PY_SPY
fi
if [ -n "${OLD_PACKAGE:-}" ]; then
    mkdir -p /tmp/mtserve-old && tar -xf "$OLD_PACKAGE" -C /tmp/mtserve-old
fi
for side in "$@"; do
    label="${side%%=*}"
    options="$(eval echo "${side#*=}")"  # $PY_SPY and $OUT in a side's options
    package_root="$repo"
    [ "$label" = old ] && package_root=/tmp/mtserve-old
    echo "=== $label ($(date -u +%H:%M:%S)): $options"
    # shellcheck disable=SC2086  # options split into words on purpose
    (cd "$package_root" && PYTHONPATH="$package_root" "$server_python" "$repo/benchmarks/serving_overhead.py" --device cuda \
        --shape llama3-8b --requests 1024 --rounds 3 --clients 64 --max-batch-size 32 $options 2>&1 \
        | tee "$OUT/$label.log" | grep -E '^(served|direct|stream|py-spy|  +[0-9]|  +CPU|  +round|Traceback|[A-Za-z]*Error)')
done
echo "=== done ($(date -u +%H:%M:%S))"
