import hashlib
import math
from dataclasses import dataclass, field

import pytest

from pytest_mtserve.statistics import (
    PAIRING_KEY_LENGTH,
    compare,
    exact_mcnemar,
    pairing_keys,
    proportion_stderr,
)


@dataclass
class Score:
    value: float
    stderr: float | None = None
    n: int = 0
    outcomes: dict[str, float] = field(default_factory=dict)


def doc_hash(index: int) -> str:
    return hashlib.sha256(f"question {index}".encode()).hexdigest()


def scored(outcomes: list[float], stderr: float | None = None) -> Score:
    """A score whose per-question outcomes are keyed like lm-eval's (full sha256 doc_hash)."""
    return Score(
        value=sum(outcomes) / len(outcomes),
        stderr=stderr,
        n=len(outcomes),
        outcomes={doc_hash(i): value for i, value in enumerate(outcomes)},
    )


def flipped(baseline: list[float], right_to_wrong: int, wrong_to_right: int) -> list[float]:
    """``baseline`` with the first b right answers and the first c wrong answers flipped."""
    result = list(baseline)
    right = [i for i, v in enumerate(baseline) if v == 1.0][:right_to_wrong]
    wrong = [i for i, v in enumerate(baseline) if v == 0.0][:wrong_to_right]
    for i in right:
        result[i] = 0.0
    for i in wrong:
        result[i] = 1.0
    return result


ALTERNATING = [float(i % 2) for i in range(2000)]  # 50% accuracy on 2000 questions


@pytest.mark.parametrize(
    ("b", "c", "expected"),
    [
        (0, 0, 1.0),
        (0, 5, 2 * 0.5**5),  # 0.0625
        (1, 9, 2 * 11 / 1024),  # 2 * P(X <= 1), X ~ Bin(10, 1/2)
        (5, 5, 1.0),
        (4, 6, 2 * 386 / 1024),  # 2 * (1 + 10 + 45 + 120 + 210) / 2^10
    ],
)
def test_exact_mcnemar_known_values(b: int, c: int, expected: float) -> None:
    assert exact_mcnemar(b, c) == pytest.approx(expected, rel=1e-12)
    assert exact_mcnemar(c, b) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("b", "c"), [(3, 17), (40, 60), (300, 360), (7000, 7042)])
def test_exact_mcnemar_matches_scipy_binomtest(b: int, c: int) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    expected = scipy_stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
    assert exact_mcnemar(b, c) == pytest.approx(expected, rel=1e-9)


def test_exact_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError, match="discordant"):
        exact_mcnemar(-1, 3)


@pytest.mark.parametrize(
    ("p", "n", "expected_pp"),
    [(0.65, 14042, 0.40), (0.50, 1172, 1.46), (0.60, 2376, 1.01)],
)
def test_proportion_stderr_matches_published_figures(p: float, n: int, expected_pp: float) -> None:
    assert 100 * proportion_stderr(p, n) == pytest.approx(expected_pp, abs=0.005)


def test_proportion_stderr_rejects_impossible_inputs() -> None:
    with pytest.raises(ValueError):
        proportion_stderr(1.2, 10)
    with pytest.raises(ValueError):
        proportion_stderr(0.5, 0)


def test_identical_outcomes_pass_with_p_one() -> None:
    gate = compare(scored(ALTERNATING), scored(ALTERNATING))
    assert (gate.verdict, gate.method, gate.p_value) == ("pass", "mcnemar-exact", 1.0)
    assert (gate.delta, gate.ci_low, gate.ci_high) == (0.0, 0.0, 0.0)
    assert gate.discordant == (0, 0)
    assert gate.n_paired == 2000


def test_big_drop_fails() -> None:
    gate = compare(scored(ALTERNATING), scored(flipped(ALTERNATING, 80, 10)))
    assert gate.verdict == "fail"
    assert gate.discordant == (80, 10)
    assert gate.delta == pytest.approx(-70 / 2000)
    assert gate.p_value == pytest.approx(exact_mcnemar(80, 10))
    assert gate.ci_low < gate.delta < gate.ci_high < 0
    assert "min effect" in gate.reason


def test_significant_drop_below_min_effect_passes() -> None:
    baseline = [float(i % 2) for i in range(14000)]
    gate = compare(scored(baseline), scored(flipped(baseline, 100, 30)), min_effect=0.01)
    assert gate.p_value < 1e-6
    assert gate.delta == pytest.approx(-70 / 14000)  # half a point: real but small
    assert gate.verdict == "pass"
    assert "within the min effect" in gate.reason


def test_drop_that_is_not_significant_passes() -> None:
    gate = compare(scored(ALTERNATING), scored(flipped(ALTERNATING, 6, 2)), min_effect=0.0)
    assert gate.p_value > 0.05
    assert gate.verdict == "pass"


def test_significant_improvement_is_reported() -> None:
    gate = compare(scored(ALTERNATING), scored(flipped(ALTERNATING, 5, 60)))
    assert gate.verdict == "improved"
    assert gate.delta > 0


def test_paired_ci_uses_the_paired_difference_variance() -> None:
    gate = compare(scored(ALTERNATING), scored(flipped(ALTERNATING, 30, 10)))
    differences = [-1.0] * 30 + [1.0] * 10 + [0.0] * 1960
    mean = sum(differences) / 2000
    sample_variance = sum((d - mean) ** 2 for d in differences) / 1999
    expected_half_width = 1.9612 * math.sqrt(sample_variance / 2000)  # t(0.975, 1999)
    assert (gate.ci_high - gate.ci_low) / 2 == pytest.approx(expected_half_width, rel=1e-3)


def test_continuous_outcomes_use_a_paired_t_test() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    baseline = [((i * 37) % 101) / 100 for i in range(60)]
    candidate = [value - 0.03 + ((i * 13) % 7) / 100 for i, value in enumerate(baseline)]
    gate = compare(scored(baseline), scored(candidate), min_effect=0.0)
    expected = scipy_stats.ttest_rel(candidate, baseline)
    assert gate.method == "paired-t"
    assert gate.discordant is None
    assert gate.p_value == pytest.approx(expected.pvalue, rel=1e-6)
    low, high = expected.confidence_interval(0.95)
    assert (gate.ci_low, gate.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_pairing_matches_stored_prefixes_to_full_doc_hashes() -> None:
    candidate = scored(ALTERNATING)
    baseline = Score(candidate.value, None, candidate.n, pairing_keys(candidate.outcomes))
    assert all(len(key) == PAIRING_KEY_LENGTH for key in baseline.outcomes)
    assert compare(baseline, candidate).n_paired == 2000


def test_without_outcomes_the_standard_errors_are_compared() -> None:
    gate = compare(Score(0.65, 0.004, 14042), Score(0.64, 0.004, 14042), min_effect=0.0)
    z = -0.01 / math.hypot(0.004, 0.004)
    assert gate.method == "unpaired-z"
    assert gate.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)))  # 0.0771
    assert gate.ci_low == pytest.approx(-0.01 - 1.959964 * math.hypot(0.004, 0.004))
    assert gate.verdict == "pass"


def test_questions_not_shared_fall_back_to_unpaired_and_say_so() -> None:
    baseline = scored(ALTERNATING[:1000], stderr=0.0158)
    candidate = scored(ALTERNATING, stderr=0.0112)
    candidate.outcomes = {doc_hash(i + 5000): v for i, v in enumerate(ALTERNATING)}
    gate = compare(baseline, candidate)
    assert gate.method == "unpaired-z"
    assert "only 0 questions are shared" in gate.reason


def test_partly_shared_questions_pair_on_the_shared_ones_and_say_so() -> None:
    gate = compare(scored(ALTERNATING[:1500]), scored(ALTERNATING))
    assert gate.n_paired == 1500
    assert "only 1500 questions are shared (baseline 1500, current 2000)" in gate.reason


def test_missing_standard_error_is_estimated_from_outcomes() -> None:
    baseline = Score(0.5, None, 2000, {doc_hash(i): v for i, v in enumerate(ALTERNATING)})
    gate = compare(baseline, Score(0.5, 0.011, 2000))
    assert gate.method == "unpaired-z"
    assert gate.ci_high == pytest.approx(1.959964 * math.hypot(0.011, proportion_stderr(0.5, 1999)))


def test_nothing_to_test_fails_with_a_reason_instead_of_passing() -> None:
    gate = compare(Score(0.65), Score(0.10))
    assert (gate.verdict, gate.method, gate.p_value) == ("fail", "none", None)
    assert "--update-baselines" in gate.reason


@pytest.mark.parametrize(("current", "verdict"), [(0.60, "pass"), (0.5999, "fail"), (0.7, "pass")])
def test_tolerance_mode_compares_against_a_relative_threshold(current: float, verdict: str) -> None:
    gate = compare(Score(0.75), Score(current), tolerance=0.2)  # threshold 0.75 * 0.8 = 0.60
    assert (gate.verdict, gate.method) == (verdict, "tolerance")
    assert gate.delta == pytest.approx(current - 0.75)
    assert "0.6000" in gate.reason


@pytest.mark.parametrize(
    "options", [{"alpha": 0.0}, {"alpha": 1.5}, {"min_effect": -0.01}, {"tolerance": 1.0}]
)
def test_nonsense_parameters_are_rejected(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        compare(Score(0.5, 0.01), Score(0.5, 0.01), **options)


def test_pairing_keys_refuse_ids_too_short_to_be_doc_hashes() -> None:
    keys = {"0123456789abcdef-a": 1.0, "0123456789abcdef-b": 0.0}
    with pytest.raises(ValueError, match="full doc_hash"):
        pairing_keys(keys)


def test_pairing_keys_keep_a_repeated_question_apart_from_its_first_occurrence() -> None:
    # Real MMLU holds 27 questions twice; evaluation keys the repeat "<doc_hash>#2".
    doc_hash = "0123456789abcdef" * 4
    keys = pairing_keys({doc_hash: 1.0, f"{doc_hash}#2": 0.0})
    assert keys == {"0123456789abcdef": 1.0, "0123456789abcdef#2": 0.0}
    assert pairing_keys(keys) == keys  # baselines store shortened keys; pairing shortens again
