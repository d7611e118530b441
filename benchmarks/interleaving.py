"""Interleaving vs A/B: impressions needed to detect a better ranker (issue 12).

``python -m benchmarks.interleaving [--quick] [--results DIR]`` (or
``python benchmarks/interleaving.py``) prints a table and writes
``benchmarks/results/interleaving.json``.

The model. Each impression is a query with a pool of ``items`` candidates whose true relevance
grade is 0, 1 or 2 (probabilities ``GRADES``). Ranker A scores each item as its grade plus a
Gaussian error shared by both rankers (s.d. ``shared``) plus its own error of s.d. ``noise_a``;
the better ranker B has the smaller own error ``noise_b`` (``SCENARIOS``). The user
follows the position-based click model (Craswell et al. 2008): position i (0-based) is examined
with probability 1/(i + 1) and an examined item is clicked with probability ``CLICK[grade]``.

* **A/B**: half the impressions see A's top ``k``, half B's; the metric is the per-impression
  click-through ("at least one click"), judged by :func:`hybridml.cloud.stats.two_proportion`.
* **Interleaving**: every impression sees the team-draft interleaving of both top-``k`` lists
  (:func:`hybridml.shared.interleave.team_draft`); clicks are credited with
  :func:`~hybridml.shared.interleave.credit` and the wins judged by
  :func:`hybridml.cloud.stats.sign_test`, ties and click-less impressions left out.

Impressions are independent and identically distributed, so the simulation runs in two stages:
it first simulates ``calibration`` impressions of each kind through the real code to measure
the outcome probabilities (A/B click-through per arm; interleaving's win/loss/tie/no-click
shares), then, for each candidate size n, draws ``reps`` experiments of n impressions from those
probabilities and runs the real tests. The smallest n detecting B (significant, B better) in at
least ``power`` of the experiments is found by bisection for each method. The ratio is the A/B
total (both arms) over the interleaving total.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, log, save
from hybridml.cloud.stats import sign_test, two_proportion
from hybridml.shared.interleave import credit, team_draft

#: (shared noise, noise A, noise B). Independent rankers that differ a lot, then the usual
#: case of a candidate that is a small change of stable: both share most of their scoring
#: error and differ in a little of it, so most impressions show much the same list.
SCENARIOS = ((0.0, 1.0, 0.5), (1.0, 0.5, 0.3), (1.0, 0.4, 0.2))
GRADES = (0.7, 0.2, 0.1)  # P(relevance grade 0, 1, 2)
CLICK = (0.05, 0.5, 0.9)  # P(click | examined, grade)


def _queries(rng: np.random.Generator, n: int, items: int, noise_a: float, noise_b: float,
             shared: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grades (n, items) and both rankers' orderings (n, items), best first."""
    grades = rng.choice(3, size=(n, items), p=GRADES)
    common = grades + rng.normal(0.0, shared, size=(n, items)) if shared else grades
    score_a = common + rng.normal(0.0, noise_a, size=(n, items))
    score_b = common + rng.normal(0.0, noise_b, size=(n, items))
    return grades, np.argsort(-score_a, axis=1), np.argsort(-score_b, axis=1)


def _clicks(uniform: np.ndarray, shown_grades: np.ndarray) -> np.ndarray:
    """Position-based model: examine position i w.p. 1/(i+1), click w.p. CLICK[grade]."""
    examine = 1.0 / np.arange(1, shown_grades.shape[1] + 1)
    return uniform < examine * np.asarray(CLICK)[shown_grades]


def click_through(seed: int, n: int, items: int, k: int, noise_a: float, noise_b: float,
                  shared: float = 0.0) -> tuple[float, float]:
    """Share of impressions with at least one click when showing A's, and B's, top k.

    Both arms see the same queries and the same user (one uniform per position decides a
    click): common random numbers, so the difference is estimated far more precisely than each
    rate, while each rate is still an unbiased estimate of its arm's click-through.
    """
    rng = np.random.default_rng(seed)
    grades, order_a, order_b = _queries(rng, n, items, noise_a, noise_b, shared)
    rows = np.arange(n)[:, None]
    user = rng.random((n, k))
    ctr_a = _clicks(user, grades[rows, order_a[:, :k]]).any(axis=1).mean()
    ctr_b = _clicks(user, grades[rows, order_b[:, :k]]).any(axis=1).mean()
    return float(ctr_a), float(ctr_b)


def interleaved_outcomes(seed: int, n: int, items: int, k: int, noise_a: float,
                         noise_b: float, shared: float = 0.0) -> dict[str, float]:
    """Shares of interleaved impressions won by A, won by B, tied, and without clicks."""
    rng = np.random.default_rng(seed)
    coin = random.Random(seed)
    grades, order_a, order_b = _queries(rng, n, items, noise_a, noise_b, shared)
    shown = np.empty((n, k), dtype=np.int64)
    teams: list[tuple[str, ...]] = []
    for q in range(n):
        out = team_draft(order_a[q, :k].tolist(), order_b[q, :k].tolist(), k, coin)
        shown[q] = out.items
        teams.append(out.teams)
    clicked = _clicks(rng.random((n, k)), grades[np.arange(n)[:, None], shown])
    tally = {"A": 0, "B": 0, "tie": 0, None: 0}
    for q in range(n):
        tally[credit(teams[q], np.flatnonzero(clicked[q]).tolist()).winner] += 1
    return {"a": tally["A"] / n, "b": tally["B"] / n, "tie": tally["tie"] / n,
            "none": tally[None] / n}


def _detects_ab(ctr: tuple[float, float], alpha: float) -> Callable[[int, np.random.Generator,
                                                                      int], float]:
    def rate(n: int, rng: np.random.Generator, reps: int) -> float:
        xa = rng.binomial(n, ctr[0], size=reps)
        xb = rng.binomial(n, ctr[1], size=reps)
        hits = 0
        for a, b in zip(xa.tolist(), xb.tolist()):
            r = two_proportion(a, n, b, n, alpha)
            hits += r.significant and r.effect > 0
        return hits / reps
    return rate


def _detects_interleave(shares: dict[str, float], alpha: float) -> Callable[
        [int, np.random.Generator, int], float]:
    probs = [shares["a"], shares["b"], shares["tie"] + shares["none"]]

    def rate(n: int, rng: np.random.Generator, reps: int) -> float:
        draws = rng.multinomial(n, probs, size=reps)
        hits = 0
        for wa, wb, _ in draws.tolist():
            if wa + wb:
                r = sign_test(wa, wb, alpha)
                hits += r.significant and r.effect > 0
        return hits / reps
    return rate


def smallest_n(rate: Callable[[int, np.random.Generator, int], float], *, power: float,
               reps: int, seed: int, hi: int = 64) -> tuple[int, float]:
    """Smallest n whose detection rate (``reps`` experiments) reaches ``power``, by bisection.

    Every n is judged on the same seed (common random numbers), which keeps the rate close to
    monotone in n. Returns n and its measured rate.
    """
    def at(n: int) -> float:
        return rate(n, np.random.default_rng(seed), reps)

    while at(hi) < power:
        hi *= 2
        if hi > 1 << 30:
            raise RuntimeError("no n up to 2**30 reaches the power: is B better at all?")
    lo = hi // 2 if hi > 64 else 1
    while hi - lo > max(1, hi // 200):  # 0.5 % resolution is plenty
        mid = (lo + hi) // 2
        if at(mid) >= power:
            hi = mid
        else:
            lo = mid
    return hi, at(hi)


def simulate(*, items: int = 30, k: int = 10, noise_a: float = 1.0, noise_b: float = 0.5,
             shared: float = 0.0, calibration: int = 100_000, reps: int = 400, alpha: float = 0.05,
             power: float = 0.8, seed: int = 12) -> dict[str, Any]:
    """Impressions each method needs to detect the better ranker B; see the module docstring."""
    ctr = click_through(seed, calibration, items, k, noise_a, noise_b, shared)
    shares = interleaved_outcomes(seed + 1, calibration, items, k, noise_a, noise_b, shared)
    n_ab, rate_ab = smallest_n(_detects_ab(ctr, alpha), power=power, reps=reps, seed=seed + 2)
    n_il, rate_il = smallest_n(_detects_interleave(shares, alpha), power=power, reps=reps,
                               seed=seed + 3)
    return {
        "settings": {"items": items, "k": k, "noise_a": noise_a, "noise_b": noise_b,
                     "shared": shared, "grades": list(GRADES), "click": list(CLICK),
                     "examine": "1/(i+1)",
                     "calibration": calibration, "reps": reps, "alpha": alpha,
                     "power": power, "seed": seed},
        "ab": {"ctr_a": round(ctr[0], 5), "ctr_b": round(ctr[1], 5),
               "per_arm": n_ab, "impressions": 2 * n_ab, "detection": rate_ab},
        "interleave": {**{f"share_{key}": round(v, 5) for key, v in shares.items()},
                       "impressions": n_il, "detection": rate_il},
        "ratio_ab_vs_interleave": round(2 * n_ab / n_il, 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios, print a table, save ``interleaving.json``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer impressions and replications")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    calibration, reps = (20_000, 200) if args.quick else (200_000, 500)
    runs = []
    for shared, noise_a, noise_b in SCENARIOS:
        log(f"interleaving: shared noise {shared}, A {noise_a} vs B {noise_b}")
        runs.append(simulate(noise_a=noise_a, noise_b=noise_b, shared=shared,
                             calibration=calibration, reps=reps))
    print(f"{'shared':>7} {'noise A':>8} {'noise B':>8} {'CTR A':>7} {'CTR B':>7} "
          f"{'A/B total':>10} {'interleave':>10} {'ratio':>7}")
    for r in runs:
        s, ab, il = r["settings"], r["ab"], r["interleave"]
        print(f"{s['shared']:>7} {s['noise_a']:>8} {s['noise_b']:>8} {ab['ctr_a']:>7.4f} "
              f"{ab['ctr_b']:>7.4f} "
              f"{ab['impressions']:>10} {il['impressions']:>10} "
              f"{r['ratio_ab_vs_interleave']:>7}")
    doc = {"suite": "interleaving", "mode": "quick" if args.quick else "full",
           "scenarios": runs}
    path = save("interleaving", doc, args.results)
    log(f"wrote {path}")
    print(json.dumps({"ratios": [r["ratio_ab_vs_interleave"] for r in runs]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
