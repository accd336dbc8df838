def test_regression(check_benchmark, benchmark_name):  # run with --benchmarks piqa,mmlu
    check_benchmark(benchmark_name)


def test_piqa_is_better_than_chance(run_benchmark):  # a plain score check, no baseline
    assert run_benchmark("piqa").value > 0.5
