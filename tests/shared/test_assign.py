"""Rollout assignment: stable buckets, independent rollouts, uniform spread, growing cohorts."""

from __future__ import annotations

import itertools

import pytest

from hybridml.shared.assign import (
    BUCKETS,
    OUTSIDE,
    Role,
    bucket,
    fnv1a32,
    role_for,
    threshold,
)

UNITS = [f"dev-{i:05d}" for i in range(100_000)]


def test_fnv1a32_matches_the_published_vectors() -> None:
    assert fnv1a32("") == 0x811C9DC5
    assert fnv1a32("a") == 0xE40C292C
    assert fnv1a32("Hello world") == 1498229191  # Hugo's hash.FNV32a documentation


def test_bucket_is_growthbook_v2_and_the_same_every_time() -> None:
    seed = "hybridml:7:dev-1"
    assert bucket(7, "dev-1") == fnv1a32(str(fnv1a32(seed))) % 10000
    assert [bucket(7, "dev-1") for _ in range(5)] == [bucket(7, "dev-1")] * 5
    assert all(0 <= bucket(3, u) < BUCKETS for u in UNITS[:1000])


def test_buckets_are_uniform_over_100k_units() -> None:
    counts = [0] * 100
    for u in UNITS:
        counts[bucket(1, u) // 100] += 1
    expected = len(UNITS) / 100
    chi2 = sum((c - expected) ** 2 / expected for c in counts)
    assert chi2 < 148.2  # 99 degrees of freedom, p = 0.001


def test_two_rollouts_shuffle_units_independently() -> None:
    units = UNITS[:20_000]
    first = {u for u in units if bucket(1, u) < threshold(10)}
    second = {u for u in units if bucket(2, u) < threshold(10)}
    assert 1700 < len(first) < 2300 and 1700 < len(second) < 2300
    both = len(first & second) / len(units)
    assert 0.006 < both < 0.014  # independent: 10 % of 10 %, not 10 %


def test_raising_a_canary_percent_only_adds_units() -> None:
    units = UNITS[:5000]
    cohorts = [{u for u in units if role_for("canary", bucket(9, u), percent=p).in_cohort}
               for p in (1, 5, 20, 50, 100)]
    for small, large in itertools.pairwise(cohorts):
        assert small < large
    assert cohorts[-1] == set(units)
    assert 150 < len(cohorts[1]) < 350


def test_roles_per_strategy() -> None:
    assert role_for("canary", 499, percent=5) == Role("candidate", "canary")
    assert role_for("canary", 500, percent=5) == OUTSIDE
    assert role_for("shadow", 0, percent=100) == Role("candidate", "shadow")
    assert role_for("interleave", 9999, percent=100).role == "interleave"
    split = (20.0, 30.0, 50.0)
    assert role_for("ab", 1999, split=split) == Role("A", "arm", 0)
    assert role_for("ab", 2000, split=split) == Role("B", "arm", 1)
    assert role_for("ab", 9999, split=split) == Role("C", "arm", 2)
    share = sum(role_for("ab", bucket(4, u), split=(50.0, 50.0)).arm == "A"
                for u in UNITS[:10_000]) / 10_000
    assert 0.48 < share < 0.52


def test_bad_strategy_bucket_or_split_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="strategy"):
        role_for("blue-green", 1)
    with pytest.raises(ValueError, match="bucket"):
        role_for("canary", 10000)
    with pytest.raises(ValueError, match="split"):
        role_for("ab", 1)
