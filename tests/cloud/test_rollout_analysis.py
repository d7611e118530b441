"""The rollout analysis on real stores: telemetry ingested as devices send it (summaries,
shadow, interleave, health, feedback) into a real TelemetryStore, a real registry and a real
Rollouts, on a clock the test moves (docs/rollouts.md §5)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.controller import Controller
from hybridml.cloud.facts import ModelFacts
from hybridml.cloud.rollout_analysis import Analysis, analyse, tick
from hybridml.cloud.rollouts import Rollout, Rollouts
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.shared.clock import utc_iso
from tests.cloud.rolloutkit import Clock, with_candidates
from tests.summarykit import summary

HOUR = 3600.0
EDGES = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


class World:
    """A registry (iris v1 stable; v3, v4 blessed), its rollouts and telemetry, one clock."""

    def __init__(self, root: Path) -> None:
        self.clock = Clock()
        self.reg = with_candidates(root)
        self.rollouts = Rollouts(self.reg, clock=self.clock)
        self.store = TelemetryStore(self.reg, clock=self.clock)
        self.facts = ModelFacts.from_manifest(self.reg.manifest("iris", 1))
        self.classes = [str(c) for c in self.facts.classes]
        self.ids = itertools.count(1)
        self.rows = [{"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
                      "petal_width_cm": 0.2}] * 10

    def send(self, device: str, kind: str, body: dict[str, Any]) -> None:
        """Upload one record from ``device``; it must be accepted."""
        rec = {"id": f"0a1b2c3d4e:{next(self.ids)}", "kind": kind, "body": body}
        answer = self.store.ingest_summaries(device, [rec])
        assert answer.accepted, answer.refused

    def window(self) -> tuple[float, float]:
        """The last ten minutes before now."""
        return self.clock.now - 600, self.clock.now

    def summary(self, device: str, version: int, rows: int = 200, degraded: int = 0,
                local_errors: int = 0, latency_bin: int = 3) -> None:
        """A summary of ``rows`` rows of ``version``; calls in latency bin ``latency_bin``."""
        start, end = self.window()
        body = summary(self.reg.manifest("iris", version), self.rows, start=start, end=end)
        body["rows"] = rows
        body["by_source"] = {"edge": rows}
        body["degraded"] = {k: n for k, n in (("out_of_range", degraded),
                                              ("local_error", local_errors)) if n}
        counts = [0] * (len(EDGES) + 1)
        counts[latency_bin] = rows
        body["latency_ms"] = {"edges": EDGES, "counts": counts}
        self.send(device, "summary", body)

    def shadow(self, device: str, r: Rollout, rows: int, agree: int, latency_bin: int = 3,
               role: str = "canary") -> None:
        """A shadow record of rollout ``r``."""
        start, end = self.window()
        served, other = (r.candidate, r.stable) if role == "canary" else (r.stable,
                                                                          r.candidate)
        counts = [0] * (len(EDGES) + 1)
        counts[latency_bin] = max(1, rows // 10)
        self.send(device, "shadow", {
            "format": 1, "model": "iris", "rollout": r.id, "role": role, "served": served,
            "shadow": other, "task": "multiclass",
            "window": {"start": utc_iso(start), "end": utc_iso(end)},
            "calls": rows, "sampled": rows // 10, "skipped": 0, "rows": rows, "errors": 0,
            "agree": agree, "prob_diff": None, "abs_diff": None,
            "latency_ms": {"edges": EDGES, "counts": counts}})

    def feedback(self, device: str, version: int, n: int, correct: int) -> None:
        """``n`` labels of ``version``'s predictions, ``correct`` of them right."""
        for i in range(n):
            label = self.classes[i % 3]
            pred = label if i < correct else self.classes[(i + 1) % 3]
            self.send(device, "feedback", {
                "format": 1, "model": "iris", "prediction_id": f"{device}:iris:{i}",
                "label": label, "prediction": pred, "version": version})

    def health_failed(self, device: str, r: Rollout) -> None:
        """A load_failed health record for the candidate of ``r``."""
        assert r.candidate is not None
        self.send(device, "health", {"format": 1, "model": "iris", "event": "load_failed",
                                     "version": r.candidate, "rollout": r.id,
                                     "error": {"code": "model_load", "message": "bad"}})

    def cohorts(self, r: Rollout, n: int) -> tuple[list[str], list[str]]:
        """Assign devices ``dev-0``... ``dev-<n-1>``: (cohort, others)."""
        arms = {f"dev-{i}": self.rollouts.assign("iris", f"dev-{i}") for i in range(n)}
        cohort = [d for d, a in arms.items() if a is not None and a.arm == "candidate"]
        return cohort, [d for d in arms if d not in cohort]

    def analyse(self) -> Analysis:
        """The analysis of the running rollout now."""
        r = self.rollouts.active("iris")
        assert r is not None
        return analyse(r, self.rollouts, self.store, self.clock.now)

    def tick(self) -> Analysis:
        """One controller look."""
        a = tick(self.rollouts, self.store, "iris", self.clock.now)
        assert a is not None
        return a


@pytest.fixture
def world(iris_copy: Path) -> Iterator[World]:
    """A fresh world per test."""
    w = World(iris_copy)
    yield w
    w.store.close()


def check(a: Analysis, name: str) -> bool | None:
    """The ``passed`` of the check ``name``."""
    return next(c.passed for c in a.checks if c.name == name)


CANARY = {"steps": [50, 100], "dwell_s": HOUR, "report_timeout_s": 2 * HOUR,
          "min_devices": 2}


def canary(world: World, n: int = 12, **config: Any) -> tuple[Rollout, list[str], list[str]]:
    """A canary of v3 at 50 % then 100 %, its cohort and the other devices."""
    r = world.rollouts.start("iris", "canary", candidate=3, config={**CANARY, **config},
                             actor="test")
    cohort, others = world.cohorts(r, n)
    assert len(cohort) >= 3 and len(others) >= 2, (cohort, others)
    return r, cohort, others


def healthy(world: World, r: Rollout, cohort: list[str], others: list[str]) -> None:
    """Every device reports, candidate and stable alike, and the candidate agrees."""
    for d in cohort:
        world.summary(d, 3)
        world.shadow(d, r, 100, 100)
    for d in others:
        world.summary(d, 1)


def test_canary_aborts_when_the_candidate_fails_to_load_on_two_devices(
        world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    for d in cohort[:2]:
        world.health_failed(d, r)
    a = world.tick()
    assert a.action == "abort" and check(a, "failures") is False
    done = world.rollouts.get(r.id)
    assert done.state == "aborted"
    evidence = world.rollouts.events(r.id)[-1]["evidence"]
    assert evidence["ever_served"] == len(cohort)
    assert evidence["ever_assigned"] == len(cohort)
    assert world.reg.resolve("iris", "stable") == 1


def test_canary_aborts_on_local_inference_failures_in_summaries(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    for d in cohort[:2]:
        world.summary(d, 3, local_errors=5, degraded=0)
    a = world.analyse()
    assert a.action == "abort" and check(a, "failures") is False
    assert a.arms["candidate"]["failing"] == 2


def test_the_controller_ticks_a_running_rollout_without_a_policy(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    for d in cohort[:2]:
        world.health_failed(d, r)
    [step] = Controller(world.reg, telemetry=world.store, clock=world.clock).run_once()
    assert step.skipped == "no policy" and step.rollout is not None
    assert step.rollout["action"] == "abort"
    assert world.rollouts.get(r.id).state == "aborted"


def test_canary_aborts_when_its_error_rate_exceeds_stables_by_the_margin(
        world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    for d in cohort:
        world.summary(d, 3, degraded=10)  # 5 % degraded
        world.shadow(d, r, 100, 100)
    for d in others:
        world.summary(d, 1, degraded=2)  # 1 %
    a = world.analyse()
    assert a.action == "abort" and check(a, "error_rate") is False
    assert check(a, "failures") is True


def test_canary_aborts_when_its_p99_latency_is_over_the_ratio(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    for d in cohort:
        world.summary(d, 3, latency_bin=8)  # 10-20 ms
        world.shadow(d, r, 100, 100)
    for d in others:
        world.summary(d, 1, latency_bin=3)  # 0.2-0.5 ms
    a = world.analyse()
    assert a.action == "abort" and check(a, "latency_p99") is False
    lat = next(c for c in a.checks if c.name == "latency_p99")
    # interpolated in the bins (all calls in one bin: 99 % of the way up it); stable's 0.497
    # plus the 0.5 ms floor, above 1.5 x 0.497
    assert lat.value == pytest.approx(19.9) and lat.bound == pytest.approx(0.497 + 0.5)


def test_a_p99_of_too_few_calls_is_not_judged_and_holds_the_step(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    world.summary(cohort[0], 3, rows=50, latency_bin=8)  # the slowest of 50 calls is no p99
    for d in cohort:
        world.shadow(d, r, 100, 100)
    for d in others:
        world.summary(d, 1, latency_bin=3)
    world.clock.advance(2 * 86400)
    a = world.analyse()
    assert a.action == "hold" and check(a, "latency_p99") is None
    assert "200 calls a side needed" in next(c.detail for c in a.checks
                                             if c.name == "latency_p99")


@pytest.mark.parametrize(("stable", "bound"), [(0.1, 0.6), (2.0, 3.0), (None, None)])
def test_the_latency_bound_is_the_ratio_but_never_under_the_floor(
        stable: float | None, bound: float | None) -> None:
    from hybridml.cloud.rollout_canary import latency_bound

    assert latency_bound(stable, 1.5, 0.5) == bound


def test_canary_aborts_when_it_disagrees_with_stable(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    world.shadow(cohort[0], r, 1000, 500)
    a = world.analyse()
    assert a.action == "abort" and check(a, "agreement") is False


def test_canary_aborts_when_its_realised_metric_is_worse(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    world.feedback(cohort[0], 3, 60, 30)
    world.feedback(others[0], 1, 60, 60)
    a = world.analyse()
    assert a.action == "abort" and check(a, "metric") is False


def test_canary_holds_while_the_candidate_has_too_few_labels(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(2 * HOUR)
    healthy(world, r, cohort, others)
    world.feedback(cohort[0], 3, 10, 10)
    world.feedback(others[0], 1, 60, 60)
    a = world.analyse()
    assert a.action == "hold" and check(a, "metric") is None


def test_canary_holds_on_too_few_reports(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(HOUR + 1)
    world.summary(cohort[0], 3)
    world.shadow(cohort[0], r, 100, 100)
    for d in others:
        world.summary(d, 1)
    a = world.tick()
    assert a.action == "hold"
    assert any("too few reports" in x for x in a.reasons)
    assert world.rollouts.get(r.id).step == 0


def test_a_silent_cohort_device_holds_the_step(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(2 * HOUR + 1)  # past the dwell and the report timeout
    healthy(world, r, cohort[1:], others)
    a = world.analyse()
    assert a.action == "hold"
    assert a.arms["candidate"]["silent"] == [cohort[0]]
    assert all(c.passed for c in a.checks)


def test_canary_holds_before_the_dwell_then_advances_and_promotes(world: World) -> None:
    r, cohort, others = canary(world)
    world.clock.advance(600)
    healthy(world, r, cohort, others)
    first = world.tick()
    assert first.action == "hold" and any("dwelt" in x for x in first.reasons)
    world.clock.advance(HOUR)
    healthy(world, r, cohort, others)
    assert world.tick().action == "advance"
    moved = world.rollouts.get(r.id)
    assert moved.step == 1 and moved.step_started == world.clock.now
    cohort, others = world.cohorts(moved, 12)  # 100 %: every device
    assert not others
    world.clock.advance(HOUR + 1)
    healthy(world, moved, cohort, [])
    for d in ("old-1", "old-2"):  # stable devices that have not synced yet
        world.summary(d, 1)
    last = world.tick()
    assert last.action == "promote" and last.winner == 3
    assert world.rollouts.get(r.id).state == "promoted"
    assert world.reg.resolve("iris", "stable") == 3


# ------------------------------------------------------------------------------- shadow
def shadow_rollout(world: World, **config: Any) -> Rollout:
    """A shadow rollout of v3 needing 300 rows from 2 devices."""
    return world.rollouts.start("iris", "shadow", candidate=3, actor="test", config={
        "min_predictions": 300, "min_devices": 2, **config})


def test_shadow_is_ready_on_enough_agreeing_rows_and_auto_promotes(world: World) -> None:
    r = shadow_rollout(world)
    world.clock.advance(600)
    for d in ("dev-a", "dev-b"):
        world.summary(d, 1)
        world.shadow(d, r, 100, 99, role="shadow")
    assert world.tick().action == "hold"  # 200 rows of 300
    world.clock.advance(600)
    world.shadow("dev-a", r, 200, 196, role="shadow")
    a = world.tick()
    assert a.action == "ready" and a.winner == 3
    assert world.rollouts.get(r.id).state == "running"  # a person promotes

    world.rollouts.finish(r.id, "aborted", actor="test")
    r2 = shadow_rollout(world, auto_promote=True)
    world.clock.advance(600)
    for d in ("dev-a", "dev-b"):
        world.summary(d, 1)
        world.shadow(d, r2, 200, 199, role="shadow")
    assert world.tick().action == "ready"
    assert world.rollouts.get(r2.id).state == "promoted"


def test_shadow_aborts_when_enough_rows_disagree(world: World) -> None:
    r = shadow_rollout(world)
    world.clock.advance(600)
    for d in ("dev-a", "dev-b"):
        world.summary(d, 1)
        world.shadow(d, r, 200, 120, role="shadow")
    a = world.tick()
    assert a.action == "abort" and check(a, "agreement") is False
    assert world.rollouts.get(r.id).state == "aborted"


# ------------------------------------------------------------------------------------ A/B
def ab(world: World, n: int, **config: Any) -> tuple[Rollout, dict[str, list[str]]]:
    """An A/B test of v1 (A) against v3 (B), and ``n`` devices by arm."""
    r = world.rollouts.start("iris", "ab", arms=[1, 3], actor="test",
                             config={"min_samples": 200, **config})
    by_arm: dict[str, list[str]] = {"A": [], "B": []}
    for i in range(n):
        a = world.rollouts.assign("iris", f"dev-{i}")
        assert a is not None
        by_arm[a.arm].append(f"dev-{i}")
    return r, by_arm


def labels_per_device(world: World, devices: list[str], version: int, total: int,
                      accuracy: float, seed: int) -> None:
    """``total`` labels spread over ``devices``, right with chance ``accuracy``."""
    rng = np.random.default_rng(seed)
    per = total // len(devices)
    for d in devices:
        world.feedback(d, version, per, int(rng.binomial(per, accuracy)))


def test_ab_promotes_an_arm_that_is_truly_better(world: World) -> None:
    r, arms = ab(world, 20)
    world.clock.advance(HOUR)
    labels_per_device(world, arms["A"], 1, 400, 0.6, 1)
    labels_per_device(world, arms["B"], 3, 400, 0.9, 2)
    a = world.tick()
    assert a.action == "promote" and a.winner == 3, a.reasons
    assert a.tests["B"]["msprt"]["p_value"] < 0.05
    assert world.rollouts.get(r.id).memo["msprt_min"]["B"] < 0.05
    assert world.reg.resolve("iris", "stable") == 3


def test_ab_does_not_promote_on_an_aa_test(world: World) -> None:
    r, arms = ab(world, 20)
    world.clock.advance(HOUR)
    labels_per_device(world, arms["A"], 1, 400, 0.8, 3)
    labels_per_device(world, arms["B"], 3, 400, 0.8, 4)
    a = world.tick()
    assert a.action == "hold", a.reasons
    assert world.rollouts.get(r.id).state == "running"


def test_ab_sample_ratio_mismatch_blocks_the_readout(world: World) -> None:
    _, arms = ab(world, 60)
    world.clock.advance(HOUR)
    labels_per_device(world, arms["A"], 1, 600, 0.6, 5)
    labels_per_device(world, arms["B"][:3], 3, 600, 0.95, 6)  # few B units report
    a = world.tick()
    assert a.action == "hold"
    assert check(a, "srm_reporting") is False and check(a, "srm_assigned") is True
    assert any("sample ratio mismatch" in x for x in a.reasons)


def test_ab_is_inconclusive_after_its_max_duration(world: World) -> None:
    r, arms = ab(world, 20, max_duration_s=2 * HOUR)
    world.clock.advance(3 * HOUR)
    labels_per_device(world, arms["A"], 1, 400, 0.8, 7)
    labels_per_device(world, arms["B"], 3, 400, 0.8, 8)
    assert world.tick().action == "inconclusive"
    assert world.rollouts.get(r.id).state == "inconclusive-held"


# ----------------------------------------------------------------------------- interleave
def interleave(world: World, wins: list[tuple[int, int]], **config: Any) -> Analysis:
    """An interleaving of v3 against v1 with one record of (wins_a, wins_b) per device."""
    r = world.rollouts.start("iris", "interleave", candidate=3, actor="test",
                             config={"min_samples": 100, **config})
    world.clock.advance(HOUR)
    start, end = world.window()
    for i, (wa, wb) in enumerate(wins):
        world.send(f"dev-{i}", "interleave", {
            "format": 1, "model": "iris", "rollout": r.id, "a": 1, "b": 3,
            "window": {"start": utc_iso(start), "end": utc_iso(end)},
            "impressions": 2 * (wa + wb) + 5, "clicks": wa + wb + 5, "credited_a": wa,
            "credited_b": wb, "wins_a": wa, "wins_b": wb, "ties": 5, "late_clicks": 0})
    return world.tick()


def test_interleave_promotes_when_b_wins(world: World) -> None:
    a = interleave(world, [(20, 45), (25, 50)])
    assert a.action == "promote" and a.winner == 3
    assert a.tests["sign_test"]["p_value"] < 0.05
    assert world.reg.resolve("iris", "stable") == 3


def test_interleave_aborts_when_a_wins(world: World) -> None:
    assert interleave(world, [(45, 20), (50, 25)]).action == "abort"


def test_interleave_holds_on_too_few_and_is_inconclusive_after_max_duration(
        world: World) -> None:
    assert interleave(world, [(10, 12), (11, 9)]).action == "hold"
    world.rollouts.finish(world.rollouts.latest("iris").id, "aborted", actor="test")  # type: ignore[union-attr]
    a = interleave(world, [(50, 52), (49, 51)], max_duration_s=HOUR)
    assert a.action == "inconclusive"


@pytest.mark.parametrize(("agree", "rows", "judged"), [
    (0, 0, None),        # nothing compared
    (12, 12, True),      # reaches the bound
    (10, 12, None),      # under it, but 12 rows cannot say so: more rows are needed
    (7, 12, False),      # even the interval's top is under 0.9
    (880, 1000, False),  # 0.88 on 1,000 rows: confidently under
    (895, 1000, None),   # 0.895: the interval still reaches 0.9
])
def test_agreement_fails_only_when_confidently_below_its_bound(agree: int, rows: int,
                                                               judged: bool | None) -> None:
    from hybridml.cloud.rollout_canary import judge_agreement

    assert judge_agreement(agree, rows, 0.9) is judged


def _labels(correct: int, n: int) -> Any:
    from hybridml.cloud.rollout_facts import Labels

    return Labels(n, correct, 0.0, 0.0, correct / n, "accuracy", 1)


@pytest.mark.parametrize(("candidate", "stable", "passes"), [
    # a good candidate's unlucky day (true accuracies 0.966 and 0.968, measured in the fleet
    # test): 3 points under on 169 labels is noise under repeated looks, not a loss
    ((158, 169), (979, 1014), True),
    ((31, 62), (1115, 1162), False),     # labels shuffled: 0.50 against 0.96
    ((35, 62), (1115, 1162), False),     # 0.56: caught on the first step's 62 labels
    ((9000, 10000), (9700, 10000), False),  # 7 points under on 10,000 labels each
    ((9640, 10000), (9660, 10000), True),   # within the 0.5-point margin, on any sample
])
def test_the_metric_fails_only_when_confidently_worse_by_more_than_the_margin(
        candidate: tuple[int, int], stable: tuple[int, int], passes: bool) -> None:
    from hybridml.cloud.rollout_canary import judge_metric

    ok, seq = judge_metric(_labels(*stable), _labels(*candidate), False, 0.005)
    assert ok is passes, seq.to_json()
