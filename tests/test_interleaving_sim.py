"""Interleaving finds a better ranker with fewer impressions than an A/B test (issue 12).

A small, seeded run of :func:`benchmarks.interleaving.simulate`; the full benchmark is
``python -m benchmarks.interleaving``.
"""

from __future__ import annotations

from benchmarks.interleaving import simulate


def test_interleaving_needs_fewer_impressions_than_ab_for_the_same_rankers() -> None:
    # A candidate that is a small change of stable: most of the scoring error is shared.
    out = simulate(noise_a=0.5, noise_b=0.3, shared=1.0, calibration=40_000, reps=100, seed=3)
    assert out["ab"]["ctr_b"] > out["ab"]["ctr_a"]
    assert out["interleave"]["share_b"] > out["interleave"]["share_a"]
    assert out["ab"]["detection"] >= 0.8 and out["interleave"]["detection"] >= 0.8
    assert out["ratio_ab_vs_interleave"] >= 2, out
