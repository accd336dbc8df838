#!/usr/bin/env bash
# GPU checks and measurements in one go, on a host with NGPU GPUs and no network:
#   benchmarks/gpu_suite.sh NGPU [BUNDLE.tar.xz]
# Installs the offline bundle (`mtserve bundle`), checks the served stack at TP=NGPU
# (gpu_check.py), then measures raw forward throughput at TP1 (forward_perf.py).
# Logs and JSON go to $OUT (default /tmp/mtserve-gpu). DATASETS: a folder with
# allenai/ai2_arc (the demo cache's datasets/).
set -euo pipefail
ngpu="${1:?usage: gpu_suite.sh NGPU [BUNDLE.tar.xz]}"
bundle="${2:-.bundle/mtserve-bundle-py312.tar.xz}"
out="${OUT:-/tmp/mtserve-gpu}"
datasets="${DATASETS:?set DATASETS to a folder holding allenai/ai2_arc}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree's code over the bundled wheel's

tar -xJf "$bundle" -C /tmp
/tmp/mtserve-bundle-py*/install.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
python3 -c 'import torch, megatron.core, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "megatron-core", megatron.core.__version__, "numpy", numpy.__version__)'

status=0
python3 benchmarks/gpu_check.py --tp "$ngpu" --out /tmp/gpu-check --datasets "$datasets" | tee "$out/gpu_check.jsonl" || status=1
cp /tmp/gpu-check/server-*.log "$out/" 2>/dev/null || true
python3 benchmarks/forward_perf.py --out "$out/forward_perf.json" ${PERF_MODELS:+--models "$PERF_MODELS"} || status=1
exit $status
