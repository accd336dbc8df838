"""The built-in benchmark suite, for a gate without writing a test:

    pytest --pyargs pytest_mtserve.suite --checkpoint /ckpts/run --benchmarks mmlu,arc_challenge
"""
