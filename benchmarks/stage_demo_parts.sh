#!/usr/bin/env bash
# Stage the demo model and data for a GPU host reached through 64 MiB-per-call transfers:
#   benchmarks/stage_demo_parts.sh [DEMO_CACHE]
# Writes .gpu_arc (the ARC data, small enough to travel beside the bundle), .gpu_a (the
# GGUF's first 62 MiB) and .gpu_b (the rest of it, with the ARC and MMLU data): one call
# each; docs/performance.md "GPU" has the commands. The folders must be git-ignored
# (.git/info/exclude) so that they travel only when carried.
set -euo pipefail
cache="${1:-$HOME/.cache/pytest-mtserve/demo-v2}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
first=$((62 * 1024 * 1024))
rm -rf .gpu_arc .gpu_a .gpu_b
mkdir -p .gpu_arc/allenai .gpu_a .gpu_b/datasets/allenai .gpu_b/datasets/hails
cp -r "$cache/datasets/allenai/ai2_arc" .gpu_arc/allenai/
cp -r "$cache/datasets/allenai/ai2_arc" .gpu_b/datasets/allenai/
cp -r "$cache/datasets/hails/mmlu_no_train" .gpu_b/datasets/hails/
head -c "$first" "$gguf" > .gpu_a/gguf.part
tail -c +"$((first + 1))" "$gguf" > .gpu_b/gguf.part
cat .gpu_a/gguf.part .gpu_b/gguf.part | cmp -s - "$gguf"
du -sh .gpu_arc .gpu_a .gpu_b
