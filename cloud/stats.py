"""The statistics of rollouts: fixed-horizon tests, the mSPRT, SRM, Holm and sample sizes.

Pure functions over counts and moments (docs/rollouts.md §5–6); each returns a frozen dataclass
with ``to_json()`` (floats to 6 significant digits). Bad inputs — negative counts, more
successes than trials, empty arms, a level outside (0, 1) — raise
:class:`~hybridml.shared.errors.InputError` naming the argument, never a numpy warning or NaN.

* :func:`two_proportion` and :func:`welch` are the fixed-horizon tests of an A/B arm against
  the control. They are valid at one look only.
* :func:`msprt_proportion` and :func:`msprt_mean` are the mixture sequential probability ratio
  test (Johari, Pekelis & Walsh, "Always valid inference", 2017; Optimizely's Stats Engine):
  their p-value may be looked at after every batch. The caller keeps the running minimum of
  the per-look p-values (the rollout's ``memo``) and rejects when it drops below ``alpha``.
* :func:`sign_test` judges interleaving wins; :func:`srm` checks the assignment split;
  :func:`holm` corrects for several arms; :func:`sample_size_proportion` and
  :func:`sample_size_mean` size an experiment.
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats as _st

from hybridml.shared.errors import InputError

__all__ = [
    "DEFAULT_TAU_SD",
    "SRMResult",
    "SequentialResult",
    "TestResult",
    "holm",
    "holm_reject",
    "msprt_log_lr",
    "msprt_mean",
    "msprt_proportion",
    "sample_size_mean",
    "sample_size_proportion",
    "sign_test",
    "srm",
    "two_proportion",
    "welch",
]

#: The mSPRT's default mixing scale, in per-unit standard deviations: τ = 0.1·σ.
#: The normal mixture N(0, τ²) is most powerful for effects of about τ, so τ says which effect
#: sizes the test is tuned for. A tenth of a standard deviation (Cohen's d = 0.1, half of his
#: "small") is the typical effect an online experiment looks for and the smallest one the
#: ``min_samples`` scale of a rollout (hundreds to tens of thousands of units per arm) can
#: hope to find; a larger τ finds big effects sooner and small ones later. The rule uses only
#: the pooled per-unit spread (p̄(1 − p̄) for proportions), never the observed difference, so
#: it does not bias the test — the same rule Eppo and Optimizely follow with a fixed
#: effect-size prior.
DEFAULT_TAU_SD = 0.1


def _round(value: Any) -> Any:
    if isinstance(value, float):
        if math.isinf(value):
            return sys.float_info.max if value > 0 else -sys.float_info.max
        return float(f"{value:.6g}")
    if isinstance(value, (list, tuple)):
        return [_round(v) for v in value]
    return value


def _to_json(obj: Any) -> dict[str, Any]:
    return {k: _round(v) for k, v in asdict(obj).items()}


@dataclass(frozen=True)
class TestResult:
    """A fixed-horizon comparison of arm B against arm A (the control).

    ``effect`` is B − A (difference of proportions or means; for the sign test B's share of
    wins minus 0.5), ``ci_low``/``ci_high`` its two-sided ``1 − alpha`` interval, ``p_value``
    two-sided, ``significant`` is ``p_value < alpha``. ``statistic`` is z or t (the sign test:
    B's wins).
    """

    __test__ = False  # not a pytest class despite the name

    test: str
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    significant: bool
    alpha: float
    n_a: int
    n_b: int
    statistic: float

    def to_json(self) -> dict[str, Any]:
        """JSON form, floats to 6 significant digits."""
        return _to_json(self)


@dataclass(frozen=True)
class SequentialResult:
    """One look of the mSPRT: B − A with an always-valid p-value and confidence sequence.

    ``p_value`` is this look's ``min(1, 1/likelihood_ratio)``; the experiment's p-value is the
    running minimum over all looks so far, which the caller keeps. ``significant`` says this
    look alone is below ``alpha`` (once true, the running minimum is too). ``ci_low`` and
    ``ci_high`` bound the always-valid ``1 − alpha`` confidence sequence at this look (the
    experiment's interval is the intersection over looks).
    """

    test: str
    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    likelihood_ratio: float
    tau: float
    significant: bool
    alpha: float
    n_a: int
    n_b: int

    def to_json(self) -> dict[str, Any]:
        """JSON form, floats to 6 significant digits."""
        return _to_json(self)


@dataclass(frozen=True)
class SRMResult:
    """A sample-ratio-mismatch check: ``mismatch`` when ``p_value < threshold``."""

    statistic: float
    p_value: float
    mismatch: bool
    threshold: float
    observed: tuple[int, ...]
    expected: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """JSON form, floats to 6 significant digits."""
        return _to_json(self)


# ---------------------------------------------------------------------------------------------
# Input checks: one rule per kind of argument.


def _count(name: str, value: Any, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a whole number, got {value!r}", field=name)
    as_float = float(value)
    if not (math.isfinite(as_float) and as_float.is_integer()):
        raise InputError(f"{name} must be a whole number, got {value!r}", field=name)
    out = int(value) if isinstance(value, numbers.Integral) else int(as_float)
    if out < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {out}", field=name)
    return out


def _real(name: str, value: Any, *, nonnegative: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r}", field=name)
    out = float(value)
    if not math.isfinite(out):
        raise InputError(f"{name} must be finite, got {out}", field=name)
    if nonnegative and out < 0:
        raise InputError(f"{name} must be >= 0, got {out}", field=name)
    return out


def _level(name: str, value: Any) -> float:
    out = _real(name, value)
    if not 0.0 < out < 1.0:
        raise InputError(f"{name} must be strictly between 0 and 1, got {out}", field=name)
    return out


def _trials(x_name: str, x: Any, n_name: str, n: Any) -> tuple[int, int]:
    xi, ni = _count(x_name, x), _count(n_name, n, minimum=1)
    if xi > ni:
        raise InputError(
            f"{x_name}={xi} exceeds {n_name}={ni}; successes cannot outnumber trials",
            field=x_name,
        )
    return xi, ni


def _z(alpha: float) -> float:
    return float(_st.norm.isf(alpha / 2))


# ---------------------------------------------------------------------------------------------
# Fixed-horizon tests.


def two_proportion(x_a: int, n_a: int, x_b: int, n_b: int, alpha: float = 0.05) -> TestResult:
    """Two-sided two-proportion z-test of B against A.

    z = (p̂_b − p̂_a) / sqrt(p̄(1 − p̄)(1/n_a + 1/n_b)) with the pooled p̄ = (x_a + x_b)/(n_a + n_b)
    (the null's variance); the interval of p_b − p_a uses the unpooled standard error
    sqrt(p̂_a(1 − p̂_a)/n_a + p̂_b(1 − p̂_b)/n_b) (Wald). When every unit of both arms has the
    same outcome the test has no evidence: z = 0, p = 1.
    """
    xa, na = _trials("x_a", x_a, "n_a", n_a)
    xb, nb = _trials("x_b", x_b, "n_b", n_b)
    alpha = _level("alpha", alpha)
    pa, pb = xa / na, xb / nb
    pooled = (xa + xb) / (na + nb)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / na + 1 / nb))
    effect = pb - pa
    z = effect / se0 if se0 > 0 else 0.0
    p = float(2 * _st.norm.sf(abs(z)))
    se = math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    half = _z(alpha) * se
    return TestResult("two_proportion_z", effect, effect - half, effect + half, p, p < alpha,
                      alpha, na, nb, z)


def _welch_df(va: float, na: int, vb: float, nb: int) -> float:
    """Welch–Satterthwaite degrees of freedom."""
    sa, sb = va / na, vb / nb
    denom = sa * sa / (na - 1) + sb * sb / (nb - 1)
    return (sa + sb) ** 2 / denom if denom > 0 else float(na + nb - 2)


def welch(
    mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int,
    alpha: float = 0.05,
) -> TestResult:
    """Welch's two-sided t-test of mean_b − mean_a from each arm's mean, sample variance, size.

    t = (m_b − m_a) / sqrt(v_a/n_a + v_b/n_b) with the Welch–Satterthwaite degrees of freedom
    ν = (v_a/n_a + v_b/n_b)² / ((v_a/n_a)²/(n_a − 1) + (v_b/n_b)²/(n_b − 1)) (Welch 1947); the
    interval is (m_b − m_a) ± t_{ν, 1−α/2}·SE. Each arm needs at least two units. With zero
    variance in both arms the difference is exact: p = 1 when the means agree, else 0.
    """
    ma, mb = _real("mean_a", mean_a), _real("mean_b", mean_b)
    va, vb = _real("var_a", var_a, nonnegative=True), _real("var_b", var_b, nonnegative=True)
    na, nb = _count("n_a", n_a, minimum=2), _count("n_b", n_b, minimum=2)
    alpha = _level("alpha", alpha)
    effect = mb - ma
    se = math.sqrt(va / na + vb / nb)
    if se == 0:
        p = 1.0 if effect == 0 else 0.0
        t = 0.0 if effect == 0 else math.copysign(math.inf, effect)
        return TestResult("welch_t", effect, effect, effect, p, p < alpha, alpha, na, nb, t)
    df = _welch_df(va, na, vb, nb)
    t = effect / se
    p = float(2 * _st.t.sf(abs(t), df))
    half = float(_st.t.isf(alpha / 2, df)) * se
    return TestResult("welch_t", effect, effect - half, effect + half, p, p < alpha, alpha,
                      na, nb, t)


def sign_test(wins_a: int, wins_b: int, alpha: float = 0.05) -> TestResult:
    """Exact two-sided sign test of interleaving wins (binomial, H0: each side wins half).

    Ties are the caller's to leave out. ``effect`` is wins_b/(wins_a + wins_b) − 0.5 and the
    interval is the Clopper–Pearson interval of B's share minus 0.5 (``scipy.stats.binomtest``
    and its ``proportion_ci(method="exact")``). ``n_a``/``n_b`` are the wins. Needs at least
    one win.
    """
    wa, wb = _count("wins_a", wins_a), _count("wins_b", wins_b)
    alpha = _level("alpha", alpha)
    n = wa + wb
    if n == 0:
        raise InputError("sign_test needs at least one impression with a winner; "
                         "wait for clicks", field="wins_a")
    res = _st.binomtest(wb, n, 0.5, alternative="two-sided")
    ci = res.proportion_ci(confidence_level=1 - alpha, method="exact")
    p = float(min(1.0, res.pvalue))
    return TestResult("sign_test", wb / n - 0.5, float(ci.low) - 0.5, float(ci.high) - 0.5,
                      p, p < alpha, alpha, wa, wb, float(wb))


# ---------------------------------------------------------------------------------------------
# The mixture SPRT (always-valid p-values).


def msprt_log_lr(effect: ArrayLike, variance: ArrayLike, tau: ArrayLike) -> np.ndarray:
    """log Λ of the normal-mixture SPRT, elementwise: the one formula behind the mSPRT.

    log Λ = ½·log(V/(V + τ²)) + τ²θ̂²/(2V(V + τ²)) for the estimate θ̂ (``effect``), its
    variance V > 0 and the mixing scale τ > 0 (Johari, Pekelis & Walsh 2017, eq. 11). Takes
    arrays so simulations and many arms can be scored at once; :func:`msprt_proportion` and
    :func:`msprt_mean` check their inputs and call it. The look's p-value is
    ``min(1, exp(-log Λ))``.
    """
    th, v, t = np.asarray(effect, float), np.asarray(variance, float), np.asarray(tau, float)
    t2 = t * t
    return np.asarray(0.5 * np.log(v / (v + t2)) + t2 * th * th / (2 * v * (v + t2)))


def _msprt(test: str, effect: float, v: float, tau: float, alpha: float, na: int,
           nb: int) -> SequentialResult:
    """Λ = sqrt(V/(V+τ²))·exp(τ²θ̂²/(2V(V+τ²))), p = min(1, 1/Λ), and its confidence sequence."""
    if v <= 0:  # no noise left: the difference is exact
        lr = 1.0 if effect == 0 else sys.float_info.max
        p = 1.0 if effect == 0 else 0.0
        return SequentialResult(test, effect, effect, effect, p, lr, tau, p < alpha, alpha,
                                na, nb)
    t2 = tau * tau
    log_lr = float(msprt_log_lr(effect, v, tau))
    p = math.exp(min(0.0, -log_lr))
    lr = math.exp(min(log_lr, 700.0))
    # θ0 stays in the sequence while Λ(θ0) < 1/α (Johari et al. 2017, §4).
    half = math.sqrt(2 * v * (v + t2) / t2 * (math.log(1 / alpha)
                                             + 0.5 * math.log((v + t2) / v)))
    return SequentialResult(test, effect, effect - half, effect + half, p, lr, tau, p < alpha,
                            alpha, na, nb)


def _tau(tau: float | None, sd: float) -> float:
    if tau is None:
        return DEFAULT_TAU_SD * sd
    out = _real("tau", tau)
    if out <= 0:
        raise InputError(f"tau must be > 0, got {out}; or leave it None for the default",
                         field="tau")
    return out


def msprt_proportion(
    x_a: int, n_a: int, x_b: int, n_b: int, tau: float | None = None, alpha: float = 0.05
) -> SequentialResult:
    """One look of the mSPRT on a difference of proportions (Johari, Pekelis & Walsh 2017).

    θ̂ = p̂_b − p̂_a, V = p̂_a(1 − p̂_a)/n_a + p̂_b(1 − p̂_b)/n_b (the pooled variance when that
    is zero), normal mixture N(0, τ²) over the effect:
    Λ = sqrt(V/(V + τ²))·exp(τ²θ̂²/(2V(V + τ²))), and this look's always-valid p-value is
    min(1, 1/Λ). Keep the running minimum over looks and reject when it is below ``alpha``;
    by Ville's inequality the chance that it ever is, under H0, is at most ``alpha`` however
    often you look. ``tau`` defaults to ``DEFAULT_TAU_SD``·sqrt(p̄(1 − p̄)) with the pooled
    p̄ (see :data:`DEFAULT_TAU_SD` for why).
    """
    xa, na = _trials("x_a", x_a, "n_a", n_a)
    xb, nb = _trials("x_b", x_b, "n_b", n_b)
    alpha = _level("alpha", alpha)
    pa, pb = xa / na, xb / nb
    pooled = (xa + xb) / (na + nb)
    pooled_var = pooled * (1 - pooled)
    v = pa * (1 - pa) / na + pb * (1 - pb) / nb
    if v == 0:
        v = pooled_var * (1 / na + 1 / nb)
    t = _tau(tau, math.sqrt(pooled_var))
    if t == 0:  # every unit had the same outcome: nothing to mix over, no evidence
        return SequentialResult("msprt_proportion", pb - pa, -1.0, 1.0, 1.0, 1.0, 0.0, False,
                                alpha, na, nb)
    return _msprt("msprt_proportion", pb - pa, v, t, alpha, na, nb)


def msprt_mean(
    mean_a: float, var_a: float, n_a: int, mean_b: float, var_b: float, n_b: int,
    tau: float | None = None, alpha: float = 0.05,
) -> SequentialResult:
    """One look of the mSPRT on a difference of means (Johari, Pekelis & Walsh 2017).

    θ̂ = m_b − m_a, V = v_a/n_a + v_b/n_b, Λ = sqrt(V/(V + τ²))·exp(τ²θ̂²/(2V(V + τ²))) and the
    look's always-valid p-value min(1, 1/Λ); keep the running minimum across looks and reject
    when it is below ``alpha``. ``tau`` defaults to ``DEFAULT_TAU_SD`` times the pooled
    standard deviation sqrt(((n_a − 1)v_a + (n_b − 1)v_b)/(n_a + n_b − 2)).
    """
    ma, mb = _real("mean_a", mean_a), _real("mean_b", mean_b)
    va, vb = _real("var_a", var_a, nonnegative=True), _real("var_b", var_b, nonnegative=True)
    na, nb = _count("n_a", n_a, minimum=2), _count("n_b", n_b, minimum=2)
    alpha = _level("alpha", alpha)
    pooled_sd = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    v = va / na + vb / nb
    if tau is None and pooled_sd == 0:
        p = 1.0 if mb == ma else 0.0
        return SequentialResult("msprt_mean", mb - ma, mb - ma, mb - ma, p,
                                1.0 if p else sys.float_info.max, 0.0, p < alpha, alpha, na, nb)
    return _msprt("msprt_mean", mb - ma, v, _tau(tau, pooled_sd), alpha, na, nb)


# ---------------------------------------------------------------------------------------------
# Assignment checks and multiple comparisons.


def srm(
    observed: Sequence[int], expected_shares: Sequence[float], threshold: float = 0.001
) -> SRMResult:
    """Sample-ratio-mismatch check: Pearson's chi-square goodness of fit of the arm counts.

    ``expected_shares`` are the configured split (any positive scale; normalised to sum 1);
    expected counts are share × total (``scipy.stats.chisquare``). ``mismatch`` when the p-value
    is below ``threshold`` — 0.001 by convention (Fabijan et al., "Diagnosing sample ratio
    mismatch", KDD 2019), so a healthy experiment is flagged about once in a thousand checks.
    """
    counts = tuple(_count(f"observed[{i}]", v) for i, v in enumerate(observed))
    shares = [_real(f"expected_shares[{i}]", v) for i, v in enumerate(expected_shares)]
    threshold = _level("threshold", threshold)
    if len(counts) < 2 or len(counts) != len(shares):
        raise InputError(
            f"srm needs one expected share per arm and at least two arms; got {len(counts)} "
            f"counts and {len(shares)} shares", field="expected_shares")
    if any(s <= 0 for s in shares):
        raise InputError(f"expected shares must be > 0, got {shares}", field="expected_shares")
    total = sum(counts)
    if total == 0:
        raise InputError("srm needs at least one assigned unit", field="observed")
    scale = sum(shares)
    expected = tuple(total * s / scale for s in shares)
    res = _st.chisquare(counts, f_exp=expected)
    p = float(res.pvalue)
    return SRMResult(float(res.statistic), p, p < threshold, threshold, counts, expected)


def holm(p_values: Sequence[float], alpha: float = 0.05) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input's order (Holm 1979).

    With p₍₁₎ ≤ … ≤ p₍ₘ₎ sorted, p̃₍ᵢ₎ = max_{j ≤ i} min(1, (m − j + 1)·p₍ⱼ₎): the step-down
    multipliers, made monotone and capped at 1. Reject hypothesis i when p̃ᵢ ≤ ``alpha``
    (:func:`holm_reject`); this controls the family-wise error rate at ``alpha``. ``alpha``
    is only checked here, so both functions take the same arguments.
    """
    _level("alpha", alpha)
    ps = [_real(f"p_values[{i}]", p) for i, p in enumerate(p_values)]
    for i, p in enumerate(ps):
        if not 0.0 <= p <= 1.0:
            raise InputError(f"p_values[{i}] must be within [0, 1], got {p}",
                             field=f"p_values[{i}]")
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda j: ps[j])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def holm_reject(p_values: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level ``alpha``."""
    return [p <= alpha for p in holm(p_values, alpha)]


# ---------------------------------------------------------------------------------------------
# Sample sizes.


def sample_size_proportion(
    p_a: float, p_b: float, alpha: float = 0.05, power: float = 0.8
) -> int:
    """Units per arm for the two-sided two-proportion z-test to detect p_a → p_b.

    n = (z_{1−α/2}·sqrt(2p̄(1 − p̄)) + z_{power}·sqrt(p_a(1 − p_a) + p_b(1 − p_b)))² / (p_b − p_a)²
    with p̄ = (p_a + p_b)/2 (Fleiss, Levin & Paik, *Statistical Methods for Rates and
    Proportions*, §4.2, without continuity correction — matching :func:`two_proportion`'s
    pooled test statistic), rounded up.
    """
    pa, pb = _level("p_a", p_a), _level("p_b", p_b)
    alpha, power = _level("alpha", alpha), _level("power", power)
    if pa == pb:
        raise InputError("p_a and p_b are equal: there is no effect to detect", field="p_b")
    bar = (pa + pb) / 2
    za, zb = _z(alpha), float(_st.norm.ppf(power))
    top = za * math.sqrt(2 * bar * (1 - bar)) + zb * math.sqrt(pa * (1 - pa) + pb * (1 - pb))
    return math.ceil(top * top / (pb - pa) ** 2)


def _t_power(n: int, d: float, alpha: float) -> float:
    """Power of the two-sided two-sample t-test with n per arm and standardised effect d."""
    df = 2 * n - 2
    ncp = d * math.sqrt(n / 2)
    crit = float(_st.t.isf(alpha / 2, df))
    return float(_st.nct.sf(crit, df, ncp) + _st.nct.cdf(-crit, df, ncp))


def sample_size_mean(delta: float, sd: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Units per arm for the two-sided two-sample t-test to detect a mean difference ``delta``.

    Starts from the normal approximation n = 2(z_{1−α/2} + z_{power})²·sd²/delta² and raises it
    until the exact power from the noncentral t distribution (df = 2n − 2,
    ncp = (delta/sd)·sqrt(n/2)) reaches ``power`` (Cohen, *Statistical Power Analysis*, ch. 2).
    Assumes equal variances in both arms; Welch's test then has the same power.
    """
    d_raw, s = _real("delta", delta), _real("sd", sd)
    alpha, power = _level("alpha", alpha), _level("power", power)
    if d_raw == 0:
        raise InputError("delta is 0: there is no effect to detect", field="delta")
    if s <= 0:
        raise InputError(f"sd must be > 0, got {s}", field="sd")
    d = abs(d_raw) / s
    n = max(2, math.ceil(2 * (_z(alpha) + float(_st.norm.ppf(power))) ** 2 / (d * d)))
    while _t_power(n, d, alpha) < power:
        n += 1
    return n
