from pytest_mtserve.benchmarks import Benchmark


def pytest_mtserve_register_benchmarks(registry):
    # Any lm-eval task works ad hoc as lm-evaluation-harness.<task> (log-likelihood, acc);
    # register one to give it a short name, another metric or a few-shot count.
    registry.register(
        Benchmark(
            name="piqa",
            task="piqa",
            endpoint_type="completions",
            metric="acc_norm",
            num_fewshot=0,
            needs_tokenizer=True,
            outcome="binary",
        )
    )
