#!/usr/bin/env bash
# GPU checks and measurements in one go, on a host with NGPU GPUs and no network:
#   DATASETS=DIR benchmarks/gpu_suite.sh NGPU [BUNDLE.tar.xz] [STEPS]
# Installs the offline bundle (`mtserve bundle --with-eval`) into two environments that
# see the image's packages after their own: the server's (numpy<2 for PyTriton) and the
# evaluation's (the image's numpy 2, which its pandas/scipy need). Then, each step under
# its own time limit, a failed one not stopping the rest:
#   check   served stack at TP=NGPU vs a float32 CPU reference (gpu_check.py)
#   gate    the plugin's record-then-gate run, real nemo-evaluator (gpu_gate.sh)
#   forward raw forward throughput and MFU, engine and Hugging Face peer (forward_perf.py)
#   served  served vs direct vs Hugging Face on an MMLU-shaped stream, Llama-3-8B shape
#           (serving_overhead.py)
# STEPS: comma-separated, run in that order (default: all four). SERVED_ARGS: extra options
# of the served step, e.g. --attention-backend=sdpa or --max-batch-size 8 (default 32, the
# plugin's on GPUs); SERVED_CLIENTS: its concurrent clients (default 64, the plugin's requests
# in flight for batches of 32), spread over SERVED_CLIENT_PROCESSES asyncio processes (default 1,
# as lm-eval's client). DATASETS: a folder holding allenai/ai2_arc
# and hails/mmlu_no_train (the demo cache's datasets/). Logs and JSON go to $OUT.
set -uo pipefail
ngpu="${1:?usage: gpu_suite.sh NGPU [BUNDLE.tar.xz] [STEPS]}"
bundle="${2:-.bundle/mtserve-bundle-py312.tar.xz}"
steps="${3:-check,gate,forward,served}"
out="${OUT:-/tmp/mtserve-gpu}"
datasets="$(realpath "${DATASETS:?set DATASETS to a folder holding allenai/ai2_arc}")"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's code over the bundled wheel's

# A venv whose own site-packages come first and the image's after (a venv made from the
# image's python, itself a venv, would not see the image's packages).
make_env() {
    python3 -m venv --without-pip "$1"
    local image own
    image="$(python3 -c 'import site; print(site.getsitepackages()[0])')"
    own="$("$1/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
    echo "import site; site.addsitedir('$image')" > "$own/_image_packages.pth"
}
server_python=/tmp/mtserve-server/bin/python
eval_python=/tmp/mtserve-eval/bin/python
if [ ! -x "$eval_python" ]; then
    tar -xJf "$bundle" -C /tmp
    make_env /tmp/mtserve-server
    make_env /tmp/mtserve-eval
    PYTHON="$server_python" EVAL_PYTHON="$eval_python" /tmp/mtserve-bundle-py*/install.sh || exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$server_python" -c 'import torch, megatron.core, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "megatron-core", megatron.core.__version__, "numpy", numpy.__version__)'

failed=()
step() {  # step NAME SECONDS COMMAND...
    local name="$1" seconds="$2"
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${seconds}s)"
    local started=$SECONDS
    timeout --kill-after=20 "$seconds" "$@" || failed+=("$name")
    echo "=== $name done in $((SECONDS - started))s"
}
for name in ${steps//,/ }; do
    case "$name" in
    check) step check 200 "$eval_python" benchmarks/gpu_check.py --tp "$ngpu" --server-python "$server_python" --out /tmp/gpu-check ;;
    gate) step gate 420 benchmarks/gpu_gate.sh "$server_python" "$eval_python" "$datasets" /tmp/gpu-gate ;;
    forward) step forward 300 bash -c "'$server_python' benchmarks/forward_perf.py --engines megatron-unfused,megatron-sdpa --out '$out/forward_megatron.json' ${PERF_MODELS:+--models $PERF_MODELS} &&
        python3 benchmarks/forward_perf.py --engines hf-transformers --out '$out/forward_hf.json' ${PERF_MODELS:+--models $PERF_MODELS}" ;;
    served) step served 420 "$server_python" benchmarks/serving_overhead.py --device cuda --shape llama3-8b --peer-python python3 \
        --requests "${SERVED_REQUESTS:-256}" --rounds 2 --clients "${SERVED_CLIENTS:-64}" --client-processes "${SERVED_CLIENT_PROCESSES:-1}" \
        --max-batch-size 32 ${SERVED_ARGS:-} ;;
    *) echo "unknown step $name: use check, gate, forward, served" >&2; exit 2 ;;
    esac
done
for log in /tmp/gpu-check/server-*.log; do [ -e "$log" ] && tail -n 40 "$log"; done
echo "failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
