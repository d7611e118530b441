"""The rollout statistics (hybridml.cloud.stats): hand-worked values, A/A error rates, power.

Simulations are seeded and vectorised: every run of an A/A or power study is drawn at once with
numpy, and only the final per-run test goes through the library function. The sequential test
is looked at hundreds of times per run, so its simulation scores all looks with the library's
vectorised core (``msprt_log_lr``) after a test pins it to the scalar functions.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from scipy import stats as sps

from hybridml.cloud.stats import (
    DEFAULT_TAU_SD,
    holm,
    holm_reject,
    msprt_log_lr,
    msprt_mean,
    msprt_proportion,
    sample_size_mean,
    sample_size_proportion,
    sign_test,
    srm,
    two_proportion,
    welch,
)
from hybridml.shared.errors import InputError

ALPHA = 0.05
RUNS = 2000


@pytest.fixture(autouse=True)
def no_warnings() -> Iterator[None]:
    """Every function here must answer without a numpy or scipy warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# --------------------------------------------------------------------------------------------
# Hand-worked values.


def test_two_proportion_matches_the_hand_worked_z_test() -> None:
    r = two_proportion(500, 1000, 550, 1000)
    pooled_se = math.sqrt(0.525 * 0.475 * (2 / 1000))
    assert r.statistic == pytest.approx(0.05 / pooled_se)
    assert r.p_value == pytest.approx(2 * sps.norm.sf(0.05 / pooled_se))
    assert r.p_value == pytest.approx(0.02516, abs=1e-5)
    half = 1.959964 * math.sqrt(0.25 / 1000 + 0.2475 / 1000)
    assert (r.ci_low, r.ci_high) == pytest.approx((0.05 - half, 0.05 + half))
    assert r.effect == pytest.approx(0.05) and r.significant


def test_two_proportion_with_identical_outcomes_has_no_evidence() -> None:
    r = two_proportion(0, 10, 0, 12)
    assert (r.p_value, r.significant, r.effect) == (1.0, False, 0.0)


def test_welch_matches_scipy_on_raw_samples() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 40), rng.normal(0.5, 2, 60)
    r = welch(a.mean(), a.var(ddof=1), 40, b.mean(), b.var(ddof=1), 60)
    ref = sps.ttest_ind(b, a, equal_var=False)
    assert r.statistic == pytest.approx(ref.statistic)
    assert r.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low, ci.high))


def test_welch_without_variance_is_exact() -> None:
    assert welch(1.0, 0.0, 5, 1.0, 0.0, 5).p_value == 1.0
    assert welch(1.0, 0.0, 5, 2.0, 0.0, 5).p_value == 0.0


def test_sign_test_matches_the_binomial_by_hand_and_scipy() -> None:
    r = sign_test(0, 10)
    assert r.p_value == pytest.approx(2 * 0.5**10)
    assert r.effect == 0.5 and r.significant
    r = sign_test(40, 60)
    ref = sps.binomtest(60, 100)
    ci = ref.proportion_ci(0.95, method="exact")
    assert r.p_value == pytest.approx(ref.pvalue)
    assert (r.ci_low, r.ci_high) == pytest.approx((ci.low - 0.5, ci.high - 0.5))
    assert r.effect == pytest.approx(0.1) and not r.significant


def test_holm_adjusts_step_down_monotone_and_capped() -> None:
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_reject([0.01, 0.04, 0.03, 0.005]) == [True, False, False, True]
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
    assert holm([0.2]) == [0.2]


def test_srm_flags_a_52_48_split_of_10000_units() -> None:
    r = srm([5200, 4800], [0.5, 0.5])
    assert r.statistic == pytest.approx(16.0) and r.mismatch
    assert r.expected == (5000.0, 5000.0)
    assert not srm([5030, 4970], [50, 50]).mismatch
    assert not srm([1000, 2000, 7000], [10, 20, 70]).mismatch


def test_msprt_is_the_mixture_formula_and_its_confidence_sequence_agrees() -> None:
    r = msprt_proportion(500, 1000, 560, 1000, tau=0.05)
    v = 0.25 / 1000 + 0.56 * 0.44 / 1000
    t2 = 0.05**2
    lr = math.sqrt(v / (v + t2)) * math.exp(t2 * 0.06**2 / (2 * v * (v + t2)))
    assert r.likelihood_ratio == pytest.approx(lr)
    assert r.p_value == pytest.approx(min(1.0, 1 / lr))
    # zero is outside the confidence sequence exactly when this look rejects
    for x_b in range(480, 640, 7):
        look = msprt_proportion(500, 1000, x_b, 1000)
        assert (look.ci_low > 0 or look.ci_high < 0) == look.significant


def test_msprt_default_tau_is_a_tenth_of_the_pooled_sd() -> None:
    assert msprt_proportion(100, 1000, 100, 1000).tau == pytest.approx(DEFAULT_TAU_SD * 0.3)
    assert msprt_mean(0, 4.0, 50, 1, 4.0, 50).tau == pytest.approx(DEFAULT_TAU_SD * 2)
    assert msprt_proportion(0, 10, 0, 10).p_value == 1.0


def test_results_serialise_to_json_at_six_significant_digits() -> None:
    doc = two_proportion(1, 3, 2, 3).to_json()
    assert doc["effect"] == 0.333333
    json.dumps(doc, allow_nan=False)
    json.dumps(msprt_proportion(0, 100, 100, 100).to_json(), allow_nan=False)
    json.dumps(srm([3, 4], [1, 1]).to_json(), allow_nan=False)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: two_proportion(-1, 10, 1, 10), "x_a"),
        (lambda: two_proportion(11, 10, 1, 10), "x_a"),
        (lambda: two_proportion(0, 0, 1, 10), "n_a"),
        (lambda: two_proportion(1, 10, 1, 10, alpha=1.5), "alpha"),
        (lambda: two_proportion(1.5, 10, 1, 10), "x_a"),
        (lambda: welch(0, 1, 1, 0, 1, 10), "n_a"),
        (lambda: welch(float("nan"), 1, 10, 0, 1, 10), "mean_a"),
        (lambda: welch(0, -1, 10, 0, 1, 10), "var_a"),
        (lambda: msprt_proportion(1, 10, 1, 10, tau=0), "tau"),
        (lambda: sign_test(0, 0), "wins_a"),
        (lambda: sign_test(-2, 3), "wins_a"),
        (lambda: srm([10, 20], [1.0]), "expected_shares"),
        (lambda: srm([0, 0], [1, 1]), "observed"),
        (lambda: srm([-1, 3], [1, 1]), "observed[0]"),
        (lambda: holm([0.2, 1.2]), "p_values[1]"),
        (lambda: sample_size_proportion(0.5, 0.5), "p_b"),
        (lambda: sample_size_mean(0.0, 1.0), "delta"),
        (lambda: sample_size_mean(1.0, 0.0), "sd"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_argument(
    call: Callable[[], object], field: str
) -> None:
    with pytest.raises(InputError) as err:
        call()
    assert err.value.field == field
    assert err.value.code == "bad_input"


# --------------------------------------------------------------------------------------------
# A/A: the false-positive rate at alpha.


def test_two_proportion_a_a_false_positive_rate_is_alpha() -> None:
    rng = np.random.default_rng(20261201)
    xa, xb = rng.binomial(1000, 0.3, (2, RUNS))
    fpr = np.mean([two_proportion(a, 1000, b, 1000).significant for a, b in zip(xa, xb)])
    assert abs(fpr - ALPHA) <= 0.015, fpr


def test_welch_a_a_false_positive_rate_is_alpha() -> None:
    rng = np.random.default_rng(20261202)
    a = rng.normal(5.0, 1.0, (RUNS, 30))
    b = rng.normal(5.0, 3.0, (RUNS, 50))  # unequal variances and sizes: Welch's case
    ma, va, mb, vb = a.mean(1), a.var(1, ddof=1), b.mean(1), b.var(1, ddof=1)
    fpr = np.mean([welch(ma[i], va[i], 30, mb[i], vb[i], 50).significant for i in range(RUNS)])
    assert abs(fpr - ALPHA) <= 0.015, fpr


def geometric_looks(first: int, last: int, growth: float) -> np.ndarray:
    """Look after every ``growth`` relative increase of the sample: near-continuous monitoring."""
    k = math.ceil(math.log(last / first) / math.log1p(growth))
    return np.unique(np.round(first * (1 + growth) ** np.arange(k + 1)).astype(np.int64))


def msprt_proportion_a_a(looks: np.ndarray, p: float, seed: int, runs: int = RUNS) -> float:
    """Share of A/A runs whose running-minimum mSPRT p-value ever drops below alpha.

    Units per arm at each look are ``looks``; the counts grow by binomial increments, so a
    look schedule of any horizon costs only its number of looks. V and τ follow
    msprt_proportion's documented rules (checked against it below).
    """
    rng = np.random.default_rng(seed)
    inc = np.diff(looks, prepend=0)
    xa = rng.binomial(inc, p, (runs, looks.size)).cumsum(1)
    xb = rng.binomial(inc, p, (runs, looks.size)).cumsum(1)
    return float((_proportion_log_lr(xa, xb, looks) >= math.log(1 / ALPHA)).any(1).mean())


def _proportion_log_lr(xa: np.ndarray, xb: np.ndarray, n: np.ndarray) -> np.ndarray:
    pa, pb, pooled = xa / n, xb / n, (xa + xb) / (2 * n)
    v = pa * (1 - pa) / n + pb * (1 - pb) / n
    v = np.where(v > 0, v, pooled * (1 - pooled) * 2 / n)
    tau = DEFAULT_TAU_SD * np.sqrt(pooled * (1 - pooled))
    ok = (v > 0) & (tau > 0)
    return np.where(ok, msprt_log_lr(pb - pa, np.where(ok, v, 1), np.where(ok, tau, 1)), 0.0)


def test_the_vectorised_msprt_core_is_what_the_scalar_functions_compute() -> None:
    rng = np.random.default_rng(5)
    n = rng.integers(20, 5000, 50)
    xa, xb = rng.binomial(n, 0.4), rng.binomial(n, 0.45)
    got = np.exp(np.minimum(0, -_proportion_log_lr(xa, xb, n)))
    want = [msprt_proportion(a, m, b, m).p_value for a, b, m in zip(xa, xb, n)]
    assert got == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("p", [0.5, 0.1])
def test_msprt_under_near_continuous_monitoring_keeps_the_fpr_near_alpha(p: float) -> None:
    # ~930 looks, one after every 1 % growth of the sample, from 100 to 10^6 units per arm:
    # the running minimum p is below alpha in about 4 % of A/A runs (Ville's bound is 5 %;
    # measured 0.0425 at p=0.5 and 0.041 at p=0.1 over 20,000 runs).
    fpr = msprt_proportion_a_a(geometric_looks(100, 1_000_000, 0.01), p, seed=77)
    assert 0.035 <= fpr <= ALPHA + 0.015, fpr


def test_msprt_under_daily_looks_is_conservative() -> None:
    # 14 daily looks of 1,000 units per arm per day: far fewer chances to cross, FPR about 1 %.
    fpr = msprt_proportion_a_a(np.arange(1000, 14_001, 1000), 0.5, seed=78)
    assert fpr <= 0.025, fpr


def test_msprt_mean_under_near_continuous_monitoring_keeps_the_fpr_near_alpha() -> None:
    rng = np.random.default_rng(79)
    looks = geometric_looks(100, 1_000_000, 0.01)
    inc = np.diff(looks, prepend=0)

    def arm() -> tuple[np.ndarray, np.ndarray]:
        # Exact sufficient statistics of N(0, 2²) samples, drawn increment by increment:
        # the increment's sum, and its sum of squares = sum²/m + σ²·χ²(m − 1).
        s = rng.normal(0.0, 2.0 * np.sqrt(inc), (RUNS, inc.size))
        q = s * s / inc + 4.0 * rng.chisquare(np.maximum(inc - 1, 1), (RUNS, inc.size))
        s, q = s.cumsum(1), q.cumsum(1)
        return s / looks, (q - s * s / looks) / (looks - 1)

    (ma, va), (mb, vb) = arm(), arm()
    v = va / looks + vb / looks
    tau = DEFAULT_TAU_SD * np.sqrt((va + vb) / 2)
    log_lr = msprt_log_lr(mb - ma, v, tau)
    last = msprt_mean(ma[0, -1], va[0, -1], looks[-1], mb[0, -1], vb[0, -1], looks[-1])
    assert min(1.0, float(np.exp(-log_lr[0, -1]))) == pytest.approx(last.p_value)
    fpr = float((log_lr >= math.log(1 / ALPHA)).any(1).mean())
    assert 0.035 <= fpr <= ALPHA + 0.015, fpr


# --------------------------------------------------------------------------------------------
# Power: the sample sizes deliver it.


def test_sample_size_proportion_gives_80_percent_power() -> None:
    n = sample_size_proportion(0.50, 0.55)
    assert n == 1565  # Fleiss' formula, by hand: (1.96·0.7053 + 0.8416·0.7053)² / 0.05²
    rng = np.random.default_rng(20261203)
    xa, xb = rng.binomial(n, 0.50, RUNS), rng.binomial(n, 0.55, RUNS)
    power = np.mean([two_proportion(a, n, b, n).significant for a, b in zip(xa, xb)])
    assert abs(power - 0.8) <= 0.04, power


def test_sample_size_mean_gives_80_percent_power_to_welch() -> None:
    n = sample_size_mean(0.2, 1.0)
    assert n == 394  # the noncentral t: one more than the normal approximation's 393
    rng = np.random.default_rng(20261204)
    a, b = rng.normal(0.0, 1.0, (RUNS, n)), rng.normal(0.2, 1.0, (RUNS, n))
    ma, va, mb, vb = a.mean(1), a.var(1, ddof=1), b.mean(1), b.var(1, ddof=1)
    power = np.mean([welch(ma[i], va[i], n, mb[i], vb[i], n).significant for i in range(RUNS)])
    assert abs(power - 0.8) <= 0.04, power


# --------------------------------------------------------------------------------------------
# SRM over many experiments.


def test_srm_catches_a_biased_split_and_rarely_flags_a_fair_one() -> None:
    rng = np.random.default_rng(20261205)
    # A 52 % assignment on 10,000 units shifts the count by 4 standard deviations on average;
    # its chi-square is noncentral with λ = 16, so about 76 % of such experiments are caught.
    biased = rng.binomial(10_000, 0.52, RUNS)
    caught = np.mean([srm([b, 10_000 - b], [1, 1]).mismatch for b in biased])
    expected = sps.ncx2.sf(sps.chi2.isf(0.001, 1), 1, 16.0)
    assert abs(caught - expected) <= 0.03, (caught, expected)
    biased = rng.binomial(40_000, 0.52, RUNS)  # on 40,000 units: λ = 64, always caught
    assert all(srm([b, 40_000 - b], [1, 1]).mismatch for b in biased)
    fair = rng.binomial(10_000, 0.5, 5000)
    flagged = np.mean([srm([f, 10_000 - f], [1, 1]).mismatch for f in fair])
    assert flagged <= 0.003, flagged  # about 0.001 by construction
