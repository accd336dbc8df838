#!/usr/bin/env bash
# The demo model's full-test-set scores on a GPU, through the product itself:
#   benchmarks/gpu_demo_scores.sh CACHE SERVER_PYTHON EVAL_PYTHON REPORT.json
# CACHE is a demo cache (pytest_mtserve.demo.assets) holding at least the GGUF and
# datasets/ (no network needed); the tokenizer and Megatron checkpoint are converted there
# if missing. The built-in suite then records every benchmark without --limit-samples
# (bf16 on the GPU) into a scratch baselines folder; REPORT.json holds the scores with
# their standard errors. MAX_BATCH_SIZE (default 32) sets the server's batch limit and
# PARALLELISM the requests in flight (default: the plugin's, twice the batch limit);
# DEMO_BENCHMARKS picks the benchmarks.
set -euo pipefail
cache="$1" server_python="$2" eval_python="$3" report="$4"
"$server_python" -c 'import sys; from pytest_mtserve.demo.assets import ensure_demo_assets; ensure_demo_assets(sys.argv[1])' "$cache"
"$eval_python" -m pytest --pyargs pytest_mtserve.suite -p no:cacheprovider -q \
    "--checkpoint=$cache/checkpoint" --device cuda "--server-python=$server_python" \
    "--datasets-dir=$cache/datasets" "--baselines-dir=$(dirname "$report")/demo-baselines" \
    --benchmarks "${DEMO_BENCHMARKS:-arc_easy,arc_challenge,mmlu}" --max-batch-size "${MAX_BATCH_SIZE:-32}" ${PARALLELISM:+--parallelism "$PARALLELISM"} \
    --update-baselines "--mtserve-report=$report"
