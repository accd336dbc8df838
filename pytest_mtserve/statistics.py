"""The score gate: is the candidate checkpoint significantly and meaningfully worse?

Choice of test, best first:

* Both sides have per-question outcomes, paired on the questions they share:
  - every outcome 0/1 -> exact McNemar test on the discordant pairs ``b`` (baseline right,
    candidate wrong) and ``c`` (the reverse). The exact two-sided binomial p is used for
    every ``b + c``: in integer arithmetic it costs milliseconds even at MMLU size, so the
    chi-square approximation (and the question of where it becomes good enough) is never
    needed.
  - otherwise -> paired t test on the per-question differences.
* Otherwise -> unpaired z test from the two standard errors (a standard error missing on a
  side is estimated from that side's outcomes).

The 95% CI of ``delta = candidate - baseline`` uses the same standard error as the test:
for paired data ``sqrt(var(differences) / n)`` with Student's t critical value.

Verdict: ``fail`` only when the candidate is significantly worse (two-sided ``p < alpha``
and ``delta < 0``, i.e. a one-sided test of the drop at ``alpha / 2``) AND the drop is larger
than ``min_effect`` (metric units: 0.01 is one point of accuracy). A significant rise is
``improved``; anything else passes. Higher values are taken to be better.

An optional plain tolerance mode (vLLM style) fails when
``candidate < baseline * (1 - tolerance)`` and does no statistics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from statistics import NormalDist  # the standard library's module (imports are absolute)
from typing import Literal, Protocol

Verdict = Literal["pass", "fail", "improved"]

# Outcomes are keyed by lm-eval's doc_hash (64 hex digits of sha256); 16 hex digits
# (64 bits) cannot collide by chance within a benchmark and keep baseline files short.
PAIRING_KEY_LENGTH = 16
# A question a benchmark holds twice: its repeat is keyed <doc_hash>#2 (then #3...).
REPEAT_MARK = "#"
CONFIDENCE = 0.95


class Scored(Protocol):
    """A benchmark score: a baseline or a fresh evaluation result."""

    @property
    def value(self) -> float: ...
    @property
    def stderr(self) -> float | None: ...
    @property
    def n(self) -> int: ...
    @property
    def outcomes(self) -> Mapping[str, float]: ...


@dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    method: str  # "mcnemar-exact" | "paired-t" | "unpaired-z" | "tolerance" | "none"
    delta: float  # candidate - baseline, metric units
    ci_low: float | None  # 95% CI of delta; None where no test was possible
    ci_high: float | None
    p_value: float | None  # two-sided
    n_paired: int
    discordant: tuple[int, int] | None  # (b, c) for McNemar
    reason: str


@dataclass(frozen=True)
class _Evidence:
    """What a test found, before the verdict rules are applied."""

    method: str
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    n_paired: int
    discordant: tuple[int, int] | None
    description: str  # e.g. "McNemar exact, 1000 paired questions (b=12, c=3)"


def pairing_keys(outcomes: Mapping[str, float]) -> dict[str, float]:
    """Outcomes re-keyed by doc_hash prefix, the key baselines store and pairing uses.

    A question that a benchmark holds twice is keyed ``doc_hash#2`` for its repeat (see
    ``evaluation``); the repeat number stays on the shortened key, so both are kept."""
    shortened: dict[str, float] = {}
    for question_id, value in outcomes.items():
        doc_hash, mark, repeat = question_id.partition(REPEAT_MARK)
        key = doc_hash[:PAIRING_KEY_LENGTH] + mark + repeat
        if key in shortened:
            raise ValueError(
                f"two questions share the doc_hash prefix {key!r}; outcomes must be keyed by "
                "lm-eval's full doc_hash (sha256 hex), not by a shorter id"
            )
        shortened[key] = float(value)
    return shortened


def proportion_stderr(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` questions: sqrt(p(1-p)/n)."""
    if n <= 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"need 0 <= p <= 1 and n > 0, got p={p}, n={n}")
    return math.sqrt(p * (1.0 - p) / n)


def exact_mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p: binomial test of ``b`` vs ``c`` discordant pairs at 1/2."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    # Exact integers: sum C(n, k) for k <= min(b, c); big-int true division rounds correctly.
    term, tail = 1, 1
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)
        tail += term
    return min(1.0, 2 * tail / (1 << n))


def compare(
    baseline: Scored,
    candidate: Scored,
    *,
    alpha: float = 0.05,
    min_effect: float = 0.01,
    tolerance: float | None = None,
) -> GateResult:
    """Gate ``candidate`` against ``baseline`` (see the module docstring for the rules)."""
    _check_parameters(alpha, min_effect, tolerance)
    if tolerance is not None:
        return _tolerance_gate(baseline, candidate, tolerance)
    base_outcomes = pairing_keys(baseline.outcomes)
    cand_outcomes = pairing_keys(candidate.outcomes)
    note = _pairing_note(base_outcomes, cand_outcomes)
    evidence = _paired_evidence(base_outcomes, cand_outcomes) or _unpaired_evidence(
        baseline, candidate
    )
    if evidence is None:
        return _undecidable(baseline, candidate, note)
    return _decide(evidence, alpha, min_effect, note)


def _check_parameters(alpha: float, min_effect: float, tolerance: float | None) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    if min_effect < 0.0:
        raise ValueError(f"min_effect must be >= 0 (metric units), got {min_effect}")
    if tolerance is not None and not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance}")


def _tolerance_gate(baseline: Scored, candidate: Scored, tolerance: float) -> GateResult:
    threshold = baseline.value * (1.0 - tolerance)
    # A score equal to the threshold passes even when float rounding puts it a hair below.
    failed = candidate.value < threshold and not math.isclose(candidate.value, threshold)
    relation = "below" if failed else "at or above"
    return _untested(
        "fail" if failed else "pass",
        "tolerance",
        baseline,
        candidate,
        f"current {candidate.value:.4f} is {relation} the threshold {threshold:.4f} "
        f"(baseline {baseline.value:.4f} x (1 - {tolerance:g}))",
    )


def _paired_evidence(base: dict[str, float], cand: dict[str, float]) -> _Evidence | None:
    """Paired test on the questions both sides answered; None if fewer than two."""
    pairs = [(base[key], cand[key]) for key in sorted(base.keys() & cand.keys())]
    if len(pairs) < 2:  # a variance needs two differences
        return None
    differences = [new - old for old, new in pairs]
    n = len(differences)
    delta = math.fsum(differences) / n
    stderr = _stderr_of_mean(differences)
    half_width = _t_critical(CONFIDENCE, df=n - 1) * stderr
    if all(value in (0.0, 1.0) for pair in pairs for value in pair):
        b, c = differences.count(-1.0), differences.count(1.0)
        method, p_value, discordant = "mcnemar-exact", exact_mcnemar(b, c), (b, c)
        description = f"exact McNemar on {n} paired questions (b={b}, c={c})"
    else:
        method, p_value, discordant = "paired-t", _t_test_p(delta, stderr, df=n - 1), None
        description = f"paired t test on {n} paired questions"
    return _Evidence(
        method=method,
        delta=delta,
        ci_low=delta - half_width,
        ci_high=delta + half_width,
        p_value=p_value,
        n_paired=n,
        discordant=discordant,
        description=description,
    )


def _unpaired_evidence(baseline: Scored, candidate: Scored) -> _Evidence | None:
    base_se, cand_se = _stderr_or_estimate(baseline), _stderr_or_estimate(candidate)
    if base_se is None or cand_se is None:
        return None
    delta = candidate.value - baseline.value
    stderr = math.hypot(base_se, cand_se)
    half_width = _normal_critical(CONFIDENCE) * stderr
    return _Evidence(
        method="unpaired-z",
        delta=delta,
        ci_low=delta - half_width,
        ci_high=delta + half_width,
        p_value=_z_test_p(delta, stderr),
        n_paired=0,
        discordant=None,
        description=f"unpaired z test (stderr baseline {base_se:.4f}, current {cand_se:.4f})",
    )


def _stderr_or_estimate(score: Scored) -> float | None:
    if score.stderr is not None and math.isfinite(score.stderr):
        return score.stderr
    values = list(score.outcomes.values())
    return _stderr_of_mean(values) if len(values) >= 2 else None


def _stderr_of_mean(values: list[float]) -> float:
    """Sample standard deviation / sqrt(n), as lm-eval reports it."""
    mean = math.fsum(values) / len(values)
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return math.sqrt(variance / len(values))


def _pairing_note(base: dict[str, float], cand: dict[str, float]) -> str:
    """Say so when the two sides were not measured on the same questions."""
    if not base or not cand or base.keys() == cand.keys():
        return ""
    shared = len(base.keys() & cand.keys())
    return (
        f"; only {shared} questions are shared (baseline {len(base)}, current {len(cand)}): "
        "the baseline was recorded on other questions, re-record it with --update-baselines"
    )


def _untested(verdict: Verdict, method: str, baseline: Scored, candidate: Scored, reason: str) -> GateResult:
    """A verdict reached without a statistical test: no p-value, no interval."""
    return GateResult(
        verdict=verdict,
        method=method,
        delta=candidate.value - baseline.value,
        ci_low=None,
        ci_high=None,
        p_value=None,
        n_paired=0,
        discordant=None,
        reason=reason,
    )


def _undecidable(baseline: Scored, candidate: Scored, note: str) -> GateResult:
    return _untested(
        "fail",
        "none",
        baseline,
        candidate,
        "cannot test: no shared per-question outcomes and no standard error on both sides; "
        "re-record the baseline with --update-baselines, or gate with a tolerance" + note,
    )


def _decide(evidence: _Evidence, alpha: float, min_effect: float, note: str) -> GateResult:
    significant = evidence.p_value < alpha
    summary = (
        f"delta {evidence.delta:+.4f} (95% CI {evidence.ci_low:+.4f} to {evidence.ci_high:+.4f}), "
        f"p={evidence.p_value:.3g}, {evidence.description}"
    )
    verdict: Verdict
    if significant and evidence.delta < -min_effect:
        verdict, why = "fail", f"significant drop larger than the min effect {min_effect:g}"
    elif significant and evidence.delta < 0:
        verdict, why = "pass", f"significant drop within the min effect {min_effect:g}"
    elif significant and evidence.delta > 0:
        verdict, why = "improved", "significant improvement"
    else:
        verdict, why = "pass", f"no significant change at alpha {alpha:g}"
    return GateResult(
        verdict=verdict,
        method=evidence.method,
        delta=evidence.delta,
        ci_low=evidence.ci_low,
        ci_high=evidence.ci_high,
        p_value=evidence.p_value,
        n_paired=evidence.n_paired,
        discordant=evidence.discordant,
        reason=f"{why}: {summary}{note}",
    )


# --- distributions (stdlib only: the plugin must stay light) -------------------------------


def _z_test_p(delta: float, stderr: float) -> float:
    if stderr == 0.0:  # no noise at all: any difference is certain
        return 1.0 if delta == 0.0 else 0.0
    return math.erfc(abs(delta / stderr) / math.sqrt(2.0))


def _t_test_p(delta: float, stderr: float, df: int) -> float:
    if stderr == 0.0:
        return 1.0 if delta == 0.0 else 0.0
    return 2.0 * _student_t_sf(abs(delta / stderr), df)


def _normal_critical(confidence: float) -> float:
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _t_critical(confidence: float, df: int) -> float:
    """Two-sided critical value of Student's t, by bisection on the survival function."""
    tail = (1.0 - confidence) / 2.0
    low, high = 0.0, 1.0
    while _student_t_sf(high, df) > tail:
        high *= 2.0
    for _ in range(100):
        middle = (low + high) / 2.0
        low, high = (middle, high) if _student_t_sf(middle, df) > tail else (low, middle)
    return (low + high) / 2.0


def _student_t_sf(t: float, df: int) -> float:
    """P(T > t) for t >= 0: half the regularized incomplete beta I_{df/(df+t^2)}(df/2, 1/2)."""
    return 0.5 * _regularized_incomplete_beta(df / (df + t * t), df / 2.0, 0.5)


def _regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only below the mean; use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """Modified Lentz evaluation of the incomplete beta continued fraction."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 100_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < epsilon:
            return result
    raise ArithmeticError(f"incomplete beta did not converge (x={x}, a={a}, b={b})")
