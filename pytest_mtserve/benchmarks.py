"""The benchmark registry: what to run through nemo-evaluator and which metric gates it.

Task names, endpoint types, metrics and few-shot counts are those of nvidia-lm-eval 26.3
(``core_evals/lm_evaluation_harness/framework.yml`` and the lm-eval task YAMLs). A metric is
named the way nemo-evaluator reports it: ``<metric>`` for lm-eval's filter ``none``
(``acc``, ``acc_norm``), else ``<metric>__<filter>`` (``exact_match__strict-match``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AD_HOC_PREFIX = "lm-evaluation-harness."


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: a nemo-evaluator task and the metric a baseline gates on."""

    name: str  # id in test ids and baseline file names, e.g. "mmlu"
    task: str  # nemo-evaluator task: "mmlu", "arc_challenge", "lm-evaluation-harness.xyz"
    endpoint_type: Literal["completions", "chat"]
    metric: str  # e.g. "acc", "acc_norm", "exact_match__strict-match"
    num_fewshot: int | None  # None: the harness's default
    needs_tokenizer: bool  # log-likelihood tasks: lm-eval tokenizes on the client
    outcome: Literal["binary", "continuous"]  # per-question values 0/1, or any real

    @property
    def metric_name(self) -> str:
        """The metric's key in lm-eval's per-sample records (``exact_match``)."""
        return self.metric.split("__", 1)[0]

    @property
    def metric_filter(self) -> str:
        """lm-eval's filter that produced the metric (``none``, ``strict-match``)."""
        _, _, filter_name = self.metric.partition("__")
        return filter_name or "none"


def _log_likelihood(name: str, task: str, metric: str, num_fewshot: int | None) -> Benchmark:
    return Benchmark(name, task, "completions", metric, num_fewshot, True, "binary")


def _generation(
    name: str, task: str, endpoint: Literal["completions", "chat"], metric: str, num_fewshot: int
) -> Benchmark:
    return Benchmark(name, task, endpoint, metric, num_fewshot, False, "binary")


BUILTIN_BENCHMARKS: tuple[Benchmark, ...] = (
    # mmlu: lm-eval's mmlu_str, 57 subjects, hails/mmlu_no_train, answer letter generated.
    _generation("mmlu", "mmlu", "completions", "exact_match", 5),
    # mmlu_logits: lm-eval's mmlu, log-likelihood of the letters, cais/mmlu.
    _log_likelihood("mmlu_logits", "mmlu_logits", "acc", 5),
    _log_likelihood("arc_challenge", "arc_challenge", "acc_norm", 0),
    # arc_easy has no entry in framework.yml: run lm-eval's task of that name directly.
    _log_likelihood("arc_easy", AD_HOC_PREFIX + "arc_easy", "acc", 0),
    _log_likelihood("hellaswag", "hellaswag", "acc_norm", 10),
    _log_likelihood("winogrande", "winogrande", "acc", 5),
    _generation("gsm8k", "gsm8k", "completions", "exact_match__strict-match", 5),
    # Chat variants: the server's chat template is applied, 0-shot, answer letter generated.
    _generation("mmlu_instruct", "mmlu_instruct", "chat", "exact_match", 0),
    _generation(
        "arc_challenge_chat", "arc_challenge_chat", "chat", "exact_match__remove_whitespace", 0
    ),
)


class UnknownBenchmarkError(KeyError):
    """A benchmark name that is neither registered nor ``lm-evaluation-harness.<task>``."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class BenchmarkRegistry:
    """Benchmarks by name; ``lm-evaluation-harness.<task>`` names any lm-eval task ad hoc."""

    def __init__(self, benchmarks: tuple[Benchmark, ...] = ()) -> None:
        self._benchmarks: dict[str, Benchmark] = {}
        for benchmark in benchmarks:
            self.register(benchmark)

    def register(self, benchmark: Benchmark, replace: bool = False) -> None:
        """Add ``benchmark``; a name already taken is an error unless ``replace``."""
        if benchmark.name in self._benchmarks and not replace:
            raise ValueError(
                f"benchmark {benchmark.name!r} is already registered; "
                "pass replace=True to override it"
            )
        self._benchmarks[benchmark.name] = benchmark

    def get(self, name: str) -> Benchmark:
        """The benchmark called ``name``, or an ad hoc log-likelihood ``acc`` benchmark."""
        if name in self._benchmarks:
            return self._benchmarks[name]
        if name.startswith(AD_HOC_PREFIX) and len(name) > len(AD_HOC_PREFIX):
            # Most lm-eval tasks are multiple choice scored by log-likelihood with `acc`;
            # anything else needs a registered Benchmark with its own metric.
            return _log_likelihood(name, name, "acc", None)
        raise UnknownBenchmarkError(
            f"unknown benchmark {name!r}; known: {', '.join(self.names())}, "
            f"or {AD_HOC_PREFIX}<lm-eval task> for any lm-eval task"
        )

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._benchmarks)


DEFAULT_REGISTRY = BenchmarkRegistry(BUILTIN_BENCHMARKS)


def default_registry() -> BenchmarkRegistry:
    """A fresh registry with the built-in benchmarks, safe to extend without side effects."""
    return BenchmarkRegistry(BUILTIN_BENCHMARKS)
