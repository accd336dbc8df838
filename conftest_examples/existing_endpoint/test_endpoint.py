# pytest --endpoint http://gpu-node:8080 --tokenizer /ckpts/run/iter_0001000/tokenizer \
#        --model-id llama3-8b-run42 existing_endpoint/
# --tokenizer is needed by log-likelihood benchmarks (arc_challenge, hellaswag, ...) only.


def test_regression(check_benchmark, benchmark_name):
    check_benchmark(benchmark_name)


def test_served_model(mtserve_endpoint):
    assert mtserve_endpoint.model_name
