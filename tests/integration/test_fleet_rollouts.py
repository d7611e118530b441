"""A simulated fleet, for real: one gunicorn cloud, 60 edge runtimes with their own device
tokens, every rollout strategy decided by the controller's look on a clock the test moves.

Devices sync (taking their role from the manifest endpoint), predict generated orders, send
the true labels and push telemetry over loopback HTTP; only time is simulated
(:mod:`hybridml.cloud.fleetsim`). The scenarios run in order on one fleet and one model
(``late``): each leaves every device back on ``stable``.

Versions: v1 stable (spring orders); v2 *bad* (the same rows with shuffled labels, unblessed);
v3 *good* (twice the boosting rounds, blessed by the gate against v1); v4 a retrain of v1 from
the same rows and seed (the same model under another number: shadow and A/A); v5 the same
for v3.
"""

from __future__ import annotations

import csv
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.demo_loop import orders
from hybridml.cloud.fleetsim import Day, Fleet, Labelled, SimClock, drive, labelled, shuffled
from hybridml.cloud.gate import gate_hook
from hybridml.cloud.registry import Registry
from hybridml.cloud.rollout_analysis import tick
from hybridml.cloud.rollouts import Rollouts
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.tokens import TokenStore
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.manifest import Manifest
from tests.conftest import CloudServer, start_cloud

NAME = "late"
DEVICES = 60
ROWS_PER_DAY = 40  # per device
FEATURES = ["restaurant", "hour", "distance_km", "rain", "items"]
DAY = 86400.0


def _csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[*FEATURES, "late"])
        w.writeheader()
        w.writerows(rows)
    return path


@dataclass
class Site:
    """The cloud, its registry, the fleet and the simulated clock."""

    cloud: CloudServer
    root: Path
    fleet: Fleet
    clock: SimClock

    @property
    def registry(self) -> Registry:
        """A fresh handle on the registry the server serves."""
        return Registry(self.root)

    def rollouts(self) -> Rollouts:
        """The registry's rollouts, on the simulated clock."""
        return Rollouts(self.registry, clock=self.clock)

    def look(self, now: float) -> tuple[str | None, str, int | None, list[str]]:
        """The controller's tick at ``now``: (action, state after, step, reasons)."""
        rollouts = self.rollouts()
        running = rollouts.active(NAME)
        a = tick(rollouts, TelemetryStore(self.registry), NAME, now)
        assert a is not None and running is not None
        after = rollouts.get(running.id)
        return a.action, after.state, after.step, list(a.reasons)

    def traffic(self, day_seed: int) -> Callable[[int], Labelled]:
        """Spring orders, different for each device and day."""
        return lambda i: labelled(orders(ROWS_PER_DAY, autumn=False,
                                         seed=day_seed * 1000 + i), "late")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("fleet")
    root = base / "reg"
    reg = Registry(root)
    spring = orders(1200, autumn=False, seed=1)
    params = {"max_iter": 40}
    v1 = _csv(base / "spring.csv", spring)
    train(reg, NAME, data=v1, target="late", model="hgb", params=params)
    bad = _csv(base / "shuffled.csv", shuffled(spring, "late"))
    train(reg, NAME, data=bad, target="late", model="hgb", params=params,
          gate=gate_hook(reg, NAME, against=1))
    train(reg, NAME, data=v1, target="late", model="hgb", params={"max_iter": 80},
          gate=gate_hook(reg, NAME, against=1))
    train(reg, NAME, data=v1, target="late", model="hgb", params=params)
    train(reg, NAME, data=v1, target="late", model="hgb", params={"max_iter": 80})
    assert reg.manifest(NAME, 2)["gate"]["blessed"] is False
    assert reg.manifest(NAME, 3)["gate"]["blessed"] is True
    reg.close()
    KeyRing(root).init()
    TokenStore(root).create("admin", "ops")
    cloud = start_cloud(root, insecure=False)
    clock = SimClock(float(int(__import__("time").time())))
    fleet = Fleet(cloud.url, root, NAME, DEVICES, base / "devices", clock=clock, workers=8)
    try:
        assert fleet.sync() == {1: DEVICES}
        yield Site(cloud, root, fleet, clock)
    finally:
        fleet.close()
        cloud.stop()
        shutil.rmtree(base / "devices", ignore_errors=True)


def _labels(site: Site, version: int, rows: list[dict[str, Any]]) -> np.ndarray:
    reg = site.registry
    m = Manifest.from_json(reg.manifest(NAME, version))
    art = m.artifact("model")
    assert art is not None
    out = ModelSession(reg.blob_path(art.sha256), m.schema, m.task).run(m.schema.encode(rows))
    assert out.labels is not None
    return out.labels


def _shadow_totals(site: Site, rollout_id: int) -> dict[str, int]:
    events = TelemetryStore(site.registry).events(NAME, "shadow")
    mine = [e for e in events if e.get("rollout") == rollout_id]
    return {k: sum(int(b[k]) for b in mine) for k in ("rows", "agree", "skipped", "errors")}


def _timeline(days: list[Day], fleet: Fleet | None = None) -> str:
    errors = [] if fleet is None else [f"{d.name}: {d.errors[-1]}" for d in fleet if d.errors]
    return "\n".join([*errors[:5]] + [
        f"day {d.day}: versions {d.versions} roles {d.roles} -> {d.action} ({d.state}, step "
        f"{d.step}): {'; '.join(d.reasons)}" for d in days])


# ------------------------------------------------------------------------------- shadow
def test_shadow_of_the_same_model_agrees_on_every_row(site: Site) -> None:
    r = site.rollouts().start(NAME, "shadow", candidate=4, force=True,
                              config={"min_predictions": 500}, actor="test")
    days = drive(site.fleet, site.look, site.traffic(1), days=1)
    totals = _shadow_totals(site, r.id)
    assert totals["rows"] >= 500 and totals["errors"] == 0
    assert totals["agree"] == totals["rows"], totals
    assert days[-1].action == "ready", _timeline(days, site.fleet)
    assert days[0].roles == {"shadow": DEVICES}
    site.rollouts().abort(NAME, actor="test", reason="shadow checked")
    assert site.fleet.sync() == {1: DEVICES} and site.fleet.roles() == {"stable": DEVICES}


def test_shadow_of_a_different_model_reports_the_agreement_both_models_give(site: Site
                                                                              ) -> None:
    r = site.rollouts().start(NAME, "shadow", candidate=2, force=True,
                              config={"min_predictions": 500}, actor="test")
    days = drive(site.fleet, site.look, site.traffic(2), days=1)
    totals = _shadow_totals(site, r.id)
    rows = [row for i in range(DEVICES) for row, _ in site.traffic(2)(i)]
    expected = float(np.mean(_labels(site, 1, rows) == _labels(site, 2, rows)))
    measured = totals["agree"] / totals["rows"]
    print(f"shadow of v2: {totals['agree']} of {totals['rows']} rows agree ({measured:.4f}); "
          f"both models on the same rows directly: {expected:.4f}")
    # every row was compared unless a device's shadow queue was full
    assert totals["rows"] + totals["skipped"] >= len(rows) * 0.95
    assert abs(measured - expected) < 0.02, (measured, expected)
    assert measured < 0.9
    assert days[-1].action == "abort" and days[-1].state == "aborted", _timeline(days, site.fleet)
    assert site.fleet.versions() == {1: DEVICES} and site.fleet.roles() == {"stable": DEVICES}


# ------------------------------------------------------------------------------- canary
def test_a_bad_canary_is_aborted_at_its_first_step_and_the_fleet_returns_to_stable(
        site: Site) -> None:
    r = site.rollouts().start(NAME, "canary", candidate=2, force=True, actor="test",
                              config={"steps": [10, 50, 100], "dwell_s": DAY})
    days = drive(site.fleet, site.look, site.traffic(3), days=3)
    print("bad canary:\n" + _timeline(days))  # shown with -s: the closing note's timeline
    assert days[-1].state == "aborted" and not any(d.step for d in days), \
        _timeline(days, site.fleet)
    first_cohort = days[0].versions.get(2, 0)
    assert 1 <= first_cohort <= DEVICES * 0.25
    ever = site.fleet.ever(2)
    assert len(ever) == first_cohort  # nobody beyond the first cohort ever served it
    events = site.rollouts().events(r.id)
    abort = events[-1]
    assert (abort["to_state"], abort["actor"]) == ("aborted", "controller")
    assert abort["evidence"]["ever_served"] == first_cohort
    assert site.fleet.versions() == {1: DEVICES}  # everyone is back after one sync


def test_a_good_canary_reaches_every_device_and_becomes_stable(site: Site) -> None:
    # The latency check compares real timings of 60 runtimes sharing a loaded CI machine with
    # the cloud (and another test worker): a 50 ms floor keeps this test about promotion; the
    # latency gate itself is tested on recorded telemetry (tests/cloud/test_rollout_canary.py).
    site.rollouts().start(NAME, "canary", candidate=3, actor="test",
                          config={"steps": [10, 50, 100], "dwell_s": DAY,
                                  "latency_floor_ms": 50.0})
    days = drive(site.fleet, site.look, site.traffic(4), days=8)
    print("good canary:\n" + _timeline(days))
    actions = [d.action for d in days]
    assert actions[-1] == "promote" and days[-1].state == "promoted", _timeline(days, site.fleet)
    cohorts = [d.versions.get(3, 0) for d in days]
    assert cohorts == sorted(cohorts) and cohorts[0] < DEVICES and cohorts[-1] == DEVICES
    assert site.registry.resolve(NAME, "stable") == 3
    assert site.fleet.versions() == {3: DEVICES}


# ------------------------------------------------------------------------------------ A/B
def test_ab_detects_a_true_effect(site: Site) -> None:
    site.rollouts().start(NAME, "ab", arms=[3, 2], force=True, actor="test",
                          config={"min_samples": 200, "max_duration_s": 5 * DAY})
    days = drive(site.fleet, site.look, site.traffic(5), days=5)
    assert days[-1].state == "aborted", _timeline(days, site.fleet)  # the control beats the bad arm
    assert any("significant" in r or "beats" in r for r in days[-1].reasons), days[-1].reasons
    assert site.fleet.versions() == {3: DEVICES}


def test_ab_between_two_copies_of_one_model_finds_nothing(site: Site) -> None:
    site.rollouts().start(NAME, "ab", arms=[3, 5], force=True, actor="test",
                          config={"min_samples": 200, "max_duration_s": 3 * DAY})
    days = drive(site.fleet, site.look, site.traffic(6), days=4)
    assert [d.action for d in days][-1] == "inconclusive", _timeline(days, site.fleet)
    assert days[-1].state == "inconclusive-held"
    assert site.registry.resolve(NAME, "stable") == 3
    assert site.fleet.versions() == {3: DEVICES}


# --------------------------------------------------------------------------- interleaving
def test_interleaving_prefers_the_better_ranker(site: Site) -> None:
    rollouts = site.rollouts()
    r = rollouts.start(NAME, "interleave", candidate=2, force=True, actor="test",
                       config={"min_samples": 100})
    site.fleet.clock.advance(3600)
    site.fleet.sync()
    assert site.fleet.roles() == {"interleave": DEVICES}
    rng = random.Random(9)
    for k, d in enumerate(site.fleet):
        for q in range(8):
            pool = orders(20, autumn=False, seed=50_000 + k * 100 + q)
            items = [{c: o[c] for c in FEATURES} for o in pool]
            ranking = d.runtime.rank(items, k=10, positive="late")
            for pos, i in enumerate(ranking.indices):
                # a dispatcher looks down the list, less and less, and opens the late orders
                if rng.random() < 1.0 / (1 + pos) and pool[i]["late"] == "late":
                    d.runtime.click(ranking.id, pos)
    site.fleet.report()
    action, state, _, reasons = site.look(site.fleet.clock.advance(DAY))
    assert (action, state) == ("abort", "aborted"), reasons
    events = TelemetryStore(site.registry).events(NAME, "interleave")
    wins_a = sum(e["wins_a"] for e in events if e["rollout"] == r.id)
    wins_b = sum(e["wins_b"] for e in events if e["rollout"] == r.id)
    assert wins_a > 2 * wins_b
    site.fleet.sync()
    assert site.fleet.roles() == {"stable": DEVICES}
