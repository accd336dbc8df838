#!/usr/bin/env bash
# The plugin's regression gate end to end on a GPU, as a user runs it:
#   benchmarks/gpu_gate.sh SERVER_PYTHON EVAL_PYTHON DATASETS WORKDIR [CHECKPOINT]
# Records baselines of the built-in suite (--update-baselines), then gates a second run
# against them under pytest-xdist (-n 2, one shared server): with bf16 on a GPU the
# per-question outcomes must repeat exactly, so the gate passes with no discordant pairs.
# Without CHECKPOINT the tiny test checkpoint is written to WORKDIR. GATE_BENCHMARKS and
# GATE_LIMITS override --benchmarks / --limit-samples (DATASETS must hold their data);
# GATE_PARALLELISM sets --parallelism (default 16; "default" leaves the plugin's own, two
# batches in flight). GATE_DEVICE=cpu makes it a dry run without a GPU.
set -euo pipefail
server_python="$1" eval_python="$2" datasets="$3" work="$4"
checkpoint="${5:-$work/tiny}"
mkdir -p "$work"
[ -e "$checkpoint" ] || "$server_python" -m pytest_mtserve.cli make-tiny-checkpoint "$checkpoint"
suite=("$eval_python" -m pytest --pyargs pytest_mtserve.suite -p no:cacheprovider -q
       "--checkpoint=$checkpoint" --device "${GATE_DEVICE:-cuda}" "--server-python=$server_python"
       "--datasets-dir=$datasets" "--baselines-dir=$work/baselines"
       --benchmarks "${GATE_BENCHMARKS:-arc_challenge,arc_easy,mmlu}"
       --limit-samples "${GATE_LIMITS:-300,mmlu=2}")
parallelism="${GATE_PARALLELISM:-16}"
[ "$parallelism" = default ] || suite+=(--parallelism "$parallelism")
"${suite[@]}" --update-baselines "--mtserve-report=$work/record.json"
"${suite[@]}" -n 2 "--mtserve-report=$work/gate.json"
"$eval_python" - "$work/record.json" "$work/gate.json" <<'EOF'
import json, sys
record, gate = (json.load(open(path)) for path in sys.argv[1:])
print(json.dumps({"recorded": record, "gated": gate})[:4000])
EOF
