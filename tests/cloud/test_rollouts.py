"""Rollouts in the registry: the state machine, its audit trail, sequences and assignment."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hybridml.cloud.auth import AuditLog
from hybridml.cloud.registry import SCHEMA_VERSION, Registry
from hybridml.cloud.rollouts import Rollouts
from hybridml.shared.errors import ConfigError, ConflictError, NotFoundError
from tests.cloud.rolloutkit import Clock, with_candidates

ALICE = "cli:alice"


@pytest.fixture
def reg(iris_copy: Path) -> Registry:
    """iris: v1 stable, v2 not blessed, v3 and v4 blessed."""
    return with_candidates(iris_copy)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rollouts(reg: Registry, clock: Clock) -> Rollouts:
    return Rollouts(reg, clock=clock)


def test_a_canary_starts_running_audited_and_raises_the_sequence(
        reg: Registry, rollouts: Rollouts, clock: Clock) -> None:
    before = reg.sequence("iris")
    r = rollouts.start("iris", "canary", candidate=3, config={"steps": [5, 20, 100]},
                       actor=ALICE, reason="weekly retrain")
    assert (r.state, r.stable, r.candidate, r.arms, r.step, r.percent) == \
        ("running", 1, 3, (1, 3), 0, 5.0)
    assert r.config.steps == (5.0, 20.0, 100.0) and r.config.sample == 0.1
    assert r.config.dwell_s == 86400 and r.config.steps is not None and not r.forced
    assert r.started == clock.now == r.step_started
    assert reg.sequence("iris") == before + 1
    assert rollouts.active("iris") == r == rollouts.latest("iris") == rollouts.get(r.id)
    [event] = rollouts.events(r.id)
    assert (event["actor"], event["action"], event["from_state"], event["to_state"],
            event["reason"]) == (ALICE, "start", None, "running", "weekly retrain")
    assert r.to_json()["config"]["steps"] == [5.0, 20.0, 100.0]


def test_only_one_rollout_runs_per_model(rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "shadow", candidate=3, actor=ALICE)
    with pytest.raises(ConflictError) as err:
        rollouts.start("iris", "canary", candidate=4, actor=ALICE)
    assert f"rollout {r.id} (shadow)" in err.value.message
    assert err.value.details["rollout"] == r.id


def test_the_candidate_must_differ_from_stable_and_exist(rollouts: Rollouts) -> None:
    with pytest.raises(ConflictError) as err:
        rollouts.start("iris", "canary", candidate=1, actor=ALICE)
    assert err.value.details["field"] == "candidate"
    with pytest.raises(NotFoundError):
        rollouts.start("iris", "canary", candidate=9, actor=ALICE)
    with pytest.raises(NotFoundError):
        rollouts.start("ghost", "canary", candidate=2, actor=ALICE)
    with pytest.raises(ConfigError) as cfg:
        rollouts.start("iris", "canary", actor=ALICE)
    assert cfg.value.details["field"] == "candidate"


def test_an_unblessed_candidate_needs_force_and_is_recorded_as_forced(
        rollouts: Rollouts) -> None:
    with pytest.raises(ConflictError) as err:
        rollouts.start("iris", "canary", candidate=2, actor=ALICE)
    assert "--force" in err.value.message and "v2" in err.value.message
    r = rollouts.start("iris", "canary", candidate=2, force=True, actor=ALICE)
    assert r.forced
    assert rollouts.events(r.id)[0]["evidence"] == {"forced": True, "unblessed": [2]}
    with pytest.raises(ConflictError):
        rollouts.start("iris", "ab", arms=[1, 2, 3], actor=ALICE)  # (one is running anyway)


@pytest.mark.parametrize(("strategy", "kwargs", "field", "words"), [
    ("canary", {"candidate": 3, "config": {"steps": [5, 5, 100]}}, "config.steps", "increase"),
    ("canary", {"candidate": 3, "config": {"steps": [5, 50]}}, "config.steps", "end at 100"),
    ("canary", {"candidate": 3, "config": {"sample": 0}}, "config.sample", "(0, 1]"),
    ("shadow", {"candidate": 3, "config": {"sample": 1.5}}, "config.sample", "(0, 1]"),
    ("shadow", {"candidate": 3, "config": {"steps": [100]}}, "config.steps", "canary"),
    ("shadow", {"candidate": 3, "config": {"colour": 1}}, "config.colour", "unknown"),
    ("canary", {"candidate": 3, "config": {"dwell_s": "1d"}}, "config.dwell_s", "number"),
    ("ab", {"arms": [1, 3], "config": {"split": [60, 30]}}, "config.split", "sum to 100"),
    ("ab", {"arms": [1, 3], "config": {"split": [100]}}, "config.split", "2 arms"),
    ("ab", {"arms": [3, 3]}, "arms", "twice"),
    ("ab", {"arms": [3]}, "arms", "2 to 26"),
    ("ab", {"candidate": 3}, "candidate", "arms"),
    ("shadow", {"candidate": 3, "arms": [1, 3]}, "arms", "candidate"),
    ("blue-green", {"candidate": 3}, "strategy", "one of"),
])
def test_bad_settings_are_config_errors_naming_the_field(
        rollouts: Rollouts, strategy: str, kwargs: dict[str, object], field: str,
        words: str) -> None:
    with pytest.raises(ConfigError) as err:
        rollouts.start("iris", strategy, actor=ALICE, **kwargs)  # type: ignore[arg-type]
    assert err.value.details["field"] == field and words in err.value.message
    assert rollouts.active("iris") is None


def test_an_ab_test_needs_no_candidate_and_splits_its_arms(rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "ab", arms=[1, 3, 4], actor=ALICE)
    assert r.candidate is None and r.arms == (1, 3, 4) and r.percent == 100
    assert r.config.split is not None and sum(r.config.split) == pytest.approx(100)
    assert r.config.metric == "accuracy" and r.config.min_samples == 200
    arms = {rollouts.assign("iris", f"dev-{i}").arm for i in range(200)}  # type: ignore
    assert arms == {"A", "B", "C"}


def test_an_ab_metric_is_one_its_two_sample_test_can_judge(rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "ab", arms=[3, 4], actor="test")
    assert r.config.metric == "accuracy"  # not balanced accuracy: no per-label proportion
    rollouts.abort("iris", actor="test")
    with pytest.raises(ConfigError) as err:
        rollouts.start("iris", "ab", arms=[3, 4], config={"metric": "f1"}, actor="test")
    assert err.value.details["field"] == "config.metric"
    assert "accuracy or error_rate" in err.value.message


def test_advancing_a_canary_records_the_step_and_raises_the_sequence(
        reg: Registry, rollouts: Rollouts, clock: Clock) -> None:
    r = rollouts.start("iris", "canary", candidate=3, actor=ALICE)
    seq = reg.sequence("iris")
    clock.advance(3600)
    moved = rollouts.advance(r.id, 1, actor="controller", reason="dwell passed",
                             evidence={"action": "advance"})
    assert (moved.step, moved.percent, moved.step_started) == (1, 5.0, clock.now)
    assert reg.sequence("iris") == seq + 1
    event = rollouts.events(r.id)[-1]
    assert (event["actor"], event["action"], event["step"], event["reason"],
            event["evidence"]) == ("controller", "advance", 1, "dwell passed",
                                   {"action": "advance"})
    with pytest.raises(ConfigError):
        rollouts.advance(r.id, 1, actor="controller")  # already there
    with pytest.raises(ConfigError):
        rollouts.advance(r.id, 9, actor="controller")


def test_promoting_moves_stable_through_the_audited_promote(
        reg: Registry, rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "canary", candidate=3, actor=ALICE)
    seq = reg.sequence("iris")
    done = rollouts.finish(r.id, "promoted", actor="controller", reason="all checks passed",
                           evidence={"action": "promote"})
    assert done.state == "promoted" and done.ended is not None
    assert reg.resolve("iris", "stable") == 3
    assert reg.sequence("iris") >= seq + 2  # the alias move, then the rollout's end
    audit = AuditLog(reg.root).entries("iris")[-1]
    assert (audit["action"], audit["alias"], audit["from"], audit["to"], audit["by"]) == \
        ("promote", "stable", 1, 3, "controller")
    event = rollouts.events(r.id)[-1]
    assert (event["action"], event["from_state"], event["to_state"]) == \
        ("promote", "running", "promoted")
    assert event["evidence"] == {"action": "promote", "winner": 3}
    assert rollouts.active("iris") is None and rollouts.latest("iris") == done
    with pytest.raises(ConflictError, match="already promoted"):
        rollouts.finish(r.id, "aborted", actor=ALICE)


def test_a_held_rollout_is_promoted_only_with_force(reg: Registry,
                                                     rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "ab", arms=[1, 4], actor=ALICE)
    rollouts.finish(r.id, "inconclusive-held", actor="controller", reason="14 days passed")
    with pytest.raises(ConflictError) as err:
        rollouts.promote("iris", actor=ALICE, version=4)
    assert "--force" in err.value.message
    done = rollouts.promote("iris", actor=ALICE, version=4, force=True, reason="ops call")
    assert done.state == "promoted" and reg.resolve("iris", "stable") == 4
    assert rollouts.events(r.id)[-1]["evidence"]["forced"] is True
    with pytest.raises(NotFoundError, match="no running or held rollout"):
        rollouts.abort("iris", actor=ALICE)


def test_a_person_promotes_a_running_rollout_when_the_analysis_says_so(
        reg: Registry, rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "shadow", candidate=3, actor=ALICE)
    with pytest.raises(ConflictError, match="force"):
        rollouts.promote("iris", actor=ALICE)
    rollouts.record_decision(r.id, {"action": "ready", "reasons": ["agreement 0.99"]},
                             {"n": 1})
    assert rollouts.get(r.id).decision == {"action": "ready", "reasons": ["agreement 0.99"]}
    assert rollouts.get(r.id).memo == {"n": 1}
    done = rollouts.promote("iris", actor=ALICE, reason="looks good")
    assert done.state == "promoted" and reg.resolve("iris", "stable") == 3
    event = rollouts.events(r.id)[-1]
    assert event["actor"] == ALICE and event["reason"] == "looks good"
    assert event["evidence"]["analysis"]["action"] == "ready"


def test_abort_ends_the_rollout_and_raises_the_sequence(reg: Registry,
                                                        rollouts: Rollouts) -> None:
    r = rollouts.start("iris", "canary", candidate=3, actor=ALICE)
    seq = reg.sequence("iris")
    done = rollouts.abort("iris", actor="token:ops", reason="p99 doubled")
    assert done.state == "aborted" and reg.resolve("iris", "stable") == 1
    assert reg.sequence("iris") == seq + 1
    assert rollouts.events(r.id)[-1]["actor"] == "token:ops"
    assert [x.id for x in rollouts.list("iris")] == [r.id]
    assert rollouts.assign("iris", "dev-1") is None


def test_assign_records_each_unit_at_most_once_a_minute(rollouts: Rollouts,
                                                        clock: Clock) -> None:
    assert rollouts.assign("iris", "dev-1") is None  # nothing running
    r = rollouts.start("iris", "canary", candidate=3, config={"steps": [50, 100]},
                       actor=ALICE)
    places = {f"dev-{i}": rollouts.assign("iris", f"dev-{i}") for i in range(40)}
    inside = sorted(u for u, p in places.items() if p is not None and p.in_cohort)
    assert 5 < len(inside) < 35
    p = places[inside[0]]
    assert p is not None
    assert (p.arm, p.role, p.serve, p.companion, p.sample) == ("candidate", "canary", 3, 1, 0.1)
    first = {u.unit: u for u in rollouts.units(r.id)}
    assert len(first) == 40 and first[inside[0]].candidate_since == clock.now
    outside = next(u for u in places if u not in inside)
    assert first[outside].arm == "stable" and first[outside].candidate_since is None
    clock.advance(30)
    rollouts.assign("iris", inside[0])
    assert {u.unit: u for u in rollouts.units(r.id)}[inside[0]].last_seen == first[
        inside[0]].last_seen  # not written again within the minute
    clock.advance(31)
    rollouts.assign("iris", inside[0])
    again = {u.unit: u for u in rollouts.units(r.id)}[inside[0]]
    assert again.last_seen == clock.now and again.first_seen == first[inside[0]].first_seen
    rollouts.advance(r.id, 1, actor="controller")  # 100 %: everyone is a canary now
    later = rollouts.assign("iris", outside)
    assert later is not None and later.role == "canary"
    moved = {u.unit: u for u in rollouts.units(r.id)}[outside]
    assert moved.arm == "candidate" and moved.candidate_since == clock.now
    assert rollouts.cohorts(r.id)["candidate"] >= len(inside) + 1


def test_the_running_rollout_is_seen_by_other_objects_at_once(reg: Registry,
                                                              rollouts: Rollouts) -> None:
    other = Rollouts(Registry(reg.root))
    assert other.assign("iris", "dev-1") is None  # cached: no rollout
    rollouts.start("iris", "shadow", candidate=3, actor=ALICE)
    place = other.assign("iris", "dev-1")
    assert place is not None and place.role == "shadow" and place.serve == 1
    rollouts.abort("iris", actor=ALICE)
    assert other.assign("iris", "dev-1") is None


def test_a_schema_3_registry_gains_the_rollout_tables_when_opened(iris_copy: Path) -> None:
    conn = sqlite3.connect(iris_copy / "registry.db")
    for table in ("rollouts", "rollout_events", "rollout_units"):
        conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    reg = with_candidates(iris_copy)
    assert [v.version for v in reg.versions("iris")] == [1, 2, 3, 4]  # nothing lost
    r = Rollouts(reg).start("iris", "canary", candidate=3, actor=ALICE)
    assert Rollouts(reg).get(r.id).state == "running"
    conn = sqlite3.connect(iris_copy / "registry.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
    indexes = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE "
                                              "type = 'index'")}
    assert "one_running" in indexes
    conn.close()


def test_a_stored_config_reads_back_as_it_was_stored() -> None:
    from hybridml.cloud.rollout_config import Config

    regression = {"output": {"task": "regression"}, "metrics": {"edge_test": {"rmse": 4.0}}}
    cfg = Config.from_json("ab", {"metric": "mse", "split": [30, 70]}, stable=regression)
    assert cfg.metric == "mse" and cfg.split == (30.0, 70.0)
    # read back without the model's manifest, and whatever this release would now refuse
    assert Config.stored(cfg.to_json()) == cfg
    assert Config.stored({**cfg.to_json(), "from_a_newer_release": 1}) == cfg
