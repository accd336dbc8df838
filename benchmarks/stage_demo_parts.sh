#!/usr/bin/env bash
# Stage the demo model for a GPU host reached through 64 MiB-per-call transfers:
#   benchmarks/stage_demo_parts.sh [BUNDLE.tar.xz] [DEMO_CACHE]
# Splits the demo GGUF into .gpu_a (with the ARC data, travelling beside the bundle),
# .gpu_b and .gpu_c (one call each); docs/performance.md "GPU" has the three commands.
# The folders must be git-ignored (.git/info/exclude) so they travel only when carried.
set -euo pipefail
bundle="${1:-.bundle/mtserve-bundle-py312.tar.xz}"
cache="${2:-$HOME/.cache/pytest-mtserve/demo-v1}"
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
mib=$((1024 * 1024))
limit=$((64 * mib - 2 * mib))  # headroom for the working tree itself
first=$(( limit - $(stat -c %s "$bundle") - $(du -sb "$cache/datasets/allenai/ai2_arc" | cut -f1) ))
second=$limit
rm -rf .gpu_a .gpu_b .gpu_c
mkdir -p .gpu_a/datasets/allenai .gpu_b .gpu_c
cp -r "$cache/datasets/allenai/ai2_arc" .gpu_a/datasets/allenai/
part() { dd if="$gguf" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count="$3"} status=none; }
part .gpu_a/gguf.part 0 "$first"
part .gpu_b/gguf.part "$first" "$second"
part .gpu_c/gguf.part $((first + second))
cat .gpu_a/gguf.part .gpu_b/gguf.part .gpu_c/gguf.part | cmp -s - "$gguf"
du -sh .gpu_a .gpu_b .gpu_c "$bundle"
