from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pytest_mtserve.benchmarks import (
    DEFAULT_REGISTRY,
    Benchmark,
    BenchmarkRegistry,
    UnknownBenchmarkError,
    default_registry,
)

REQUIRED = {"mmlu", "arc_challenge", "arc_easy", "hellaswag", "winogrande", "gsm8k"}


def _framework_tasks() -> dict[str, dict]:
    """nvidia-lm-eval's task definitions, by nemo-evaluator task type."""
    import core_evals.lm_evaluation_harness as harness

    framework = yaml.safe_load((Path(harness.__file__).parent / "framework.yml").read_text())
    return {entry["defaults"]["config"]["type"]: entry["defaults"]["config"] for entry in framework["evaluations"]}


def test_default_registry_has_the_common_benchmarks_and_a_chat_one() -> None:
    names = set(DEFAULT_REGISTRY.names())
    assert REQUIRED <= names
    assert any(DEFAULT_REGISTRY.get(name).endpoint_type == "chat" for name in names)


@pytest.mark.parametrize("name", DEFAULT_REGISTRY.names())
def test_builtin_benchmarks_match_the_installed_harness(name: str) -> None:
    benchmark = DEFAULT_REGISTRY.get(name)
    if benchmark.task.startswith("lm-evaluation-harness."):
        return  # ad hoc: any lm-eval task name is accepted
    config = _framework_tasks()[benchmark.task]
    assert benchmark.endpoint_type in config["supported_endpoint_types"]
    # Tasks scored by log-likelihood need log-probs and therefore the client-side tokenizer.
    assert benchmark.needs_tokenizer == ("logprobs" in config.get("required_capabilities", []))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownBenchmarkError) as error:
        DEFAULT_REGISTRY.get("mmlu_pro_max")
    message = str(error.value)
    assert "mmlu_pro_max" in message and "arc_challenge" in message
    assert "lm-evaluation-harness.<lm-eval task>" in message


def test_any_lm_eval_task_can_be_named_ad_hoc() -> None:
    benchmark = DEFAULT_REGISTRY.get("lm-evaluation-harness.piqa")
    assert benchmark.task == "lm-evaluation-harness.piqa"
    assert benchmark.name == "lm-evaluation-harness.piqa"  # never collides with a registered name
    assert (benchmark.metric, benchmark.needs_tokenizer) == ("acc", True)
    with pytest.raises(UnknownBenchmarkError):
        DEFAULT_REGISTRY.get("lm-evaluation-harness.")


def test_register_refuses_a_taken_name_unless_replacing() -> None:
    registry = default_registry()
    custom = Benchmark("mmlu", "mmlu_logits", "completions", "acc", 0, True, "binary")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(custom)
    registry.register(custom, replace=True)
    assert registry.get("mmlu") is custom
    assert DEFAULT_REGISTRY.get("mmlu") is not custom  # default_registry() is a copy


def test_registry_keeps_registration_order() -> None:
    first = Benchmark("b", "arc_challenge", "completions", "acc", 0, True, "binary")
    second = Benchmark("a", "hellaswag", "completions", "acc", 0, True, "binary")
    assert BenchmarkRegistry((first, second)).names() == ["b", "a"]


@pytest.mark.parametrize(
    ("metric", "name", "filter_name"),
    [("acc_norm", "acc_norm", "none"), ("exact_match__strict-match", "exact_match", "strict-match")],
)
def test_metric_splits_into_lm_eval_metric_and_filter(metric: str, name: str, filter_name: str) -> None:
    benchmark = Benchmark("x", "gsm8k", "completions", metric, 5, False, "binary")
    assert (benchmark.metric_name, benchmark.metric_filter) == (name, filter_name)
