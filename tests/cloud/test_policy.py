"""Policies and triggers: each trigger fires on its evidence and not without it; cooldown;
decisions recorded in the registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.cli import main
from hybridml.cloud.policy import (
    Evidence,
    Policy,
    data_trigger,
    drift_trigger,
    evaluate,
    parse_new_data,
    parse_share,
    performance_trigger,
    time_trigger,
)
from hybridml.cloud.registry import Registry
from hybridml.shared.errors import ConfigError, NotFoundError

DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15


def ev(**kw: Any) -> Evidence:
    base: dict[str, Any] = {"now": T0, "active": 1, "latest": 1, "last_trained": T0 - DAY,
                            "training_rows": 1000, "labelled_since": 0, "metric": "accuracy"}
    return Evidence(**{**base, **kw})


def window(value: float, labels: int, end: str, *, version: int = 1, estimate: bool = False
           ) -> dict[str, Any]:
    return {"version": version, "start": "", "end": end, "labels": labels, "metric": "accuracy",
            "value": value, "estimate": estimate}


def device(name: str, rows: int, *drifted: bool) -> dict[str, Any]:
    return {"device": name, "windows": [{"rows": rows // len(drifted), "dataset_drift": d}
                                        for d in drifted]}


def test_time_trigger_fires_after_every_s_and_not_before() -> None:
    p = Policy(every_s=7 * DAY)
    assert time_trigger(p, ev(last_trained=T0 - 7 * DAY)).fired
    t = time_trigger(p, ev(last_trained=T0 - 6 * DAY))
    assert not t.fired and t.evidence == {"since_training_s": 6 * DAY, "every_s": 7 * DAY}
    assert time_trigger(Policy(), ev(last_trained=T0 - 99 * DAY)).reason == "off"


def test_performance_trigger_needs_min_labels_of_realised_metric_below_the_bound() -> None:
    p = Policy(min_metric=0.9, min_labels=200)
    low = [window(0.85, 150, "2027-01-15T00:00:00Z"), window(0.80, 100, "2027-01-14T00:00:00Z")]
    t = performance_trigger(p, ev(performance=low))
    assert t.fired and t.evidence["labels"] == 250 and t.evidence["value"] == 0.83
    # The newest windows come first: enough labels there, the old bad window is not used.
    mixed = [window(0.95, 300, "2027-01-15T00:00:00Z"), window(0.5, 900, "2027-01-10T00:00:00Z")]
    assert not performance_trigger(p, ev(performance=mixed)).fired
    few = [window(0.5, 199, "2027-01-15T00:00:00Z")]
    assert not performance_trigger(p, ev(performance=few)).fired
    # Estimates and other versions never count.
    other = [window(0.5, 500, "2027-01-15T00:00:00Z", estimate=True),
             window(0.5, 500, "2027-01-15T00:00:00Z", version=2)]
    assert not performance_trigger(p, ev(performance=other)).fired


def test_performance_trigger_for_rmse_fires_above_the_bound() -> None:
    p = Policy(min_metric=5.0, min_labels=10)
    w = [window(4.0, 10, "b"), window(6.0, 10, "a")]
    t = performance_trigger(p, ev(metric="rmse", performance=[{**x, "metric": "rmse"}
                                                             for x in w]))
    assert not t.fired and t.evidence["value"] == 4.0  # the newest 10 labels suffice
    t = performance_trigger(Policy(min_metric=5.0, min_labels=20),
                            ev(metric="rmse", performance=w))
    assert t.fired and t.evidence["value"] == pytest.approx(5.09902, abs=1e-5)
    assert "above 5.0" in t.reason


def test_data_trigger_fires_on_a_share_or_a_count_of_new_labelled_rows() -> None:
    share = Policy(new_data_fraction=0.05)
    assert data_trigger(share, ev(labelled_since=50)).fired
    assert not data_trigger(share, ev(labelled_since=49)).fired
    count = Policy(new_data_rows=30)
    assert data_trigger(count, ev(labelled_since=30)).fired
    assert not data_trigger(count, ev(labelled_since=29)).fired
    both = Policy(new_data_fraction=0.5, new_data_rows=30)  # whichever comes first
    assert data_trigger(both, ev(labelled_since=30)).evidence["needed"] == 30


def test_drift_trigger_weighs_devices_by_traffic_over_two_windows() -> None:
    p = Policy(drift_devices=0.2)
    fleet = [device("a", 300, True, True), device("b", 900, False, False),
             device("c", 100, True, False)]  # c drifted in one window only
    t = drift_trigger(p, ev(device_drift=fleet))
    assert t.fired and t.evidence["devices"] == ["a"] and t.evidence["share"] == \
        pytest.approx(300 / 1300, abs=1e-6)
    assert not drift_trigger(Policy(drift_devices=0.3), ev(device_drift=fleet)).fired
    quiet = [device("a", 0, True, True)]  # not reporting
    assert not drift_trigger(p, ev(device_drift=quiet)).fired


def test_any_trigger_fires_and_the_cooldown_holds_the_next() -> None:
    p = Policy(every_s=DAY, new_data_rows=10, cooldown_s=6 * 3600)
    d = evaluate(p, ev(labelled_since=10, last_trained=T0 - 3600))
    assert d.fired and [t.name for t in d.triggers if t.fired] == ["data"]
    held = evaluate(p, ev(labelled_since=10, last_fired=T0 - 3600))
    assert not held.fired and held.held and held.cooldown_until == T0 + 5 * 3600
    assert evaluate(p, ev(labelled_since=10, last_fired=T0 - 6 * 3600)).fired
    quiet = evaluate(p, ev(last_trained=T0 - 3600))
    assert not quiet.fired and not quiet.held
    doc = held.to_json()
    assert doc["cooldown_until"] == "2027-01-15T13:00:00Z" and doc["held"] is True
    assert {t["name"] for t in doc["triggers"]} == {"time", "performance", "data", "drift"}


def test_policy_values_are_checked_and_named() -> None:
    with pytest.raises(ConfigError, match="new_data_fraction must be a share") as e:
        Policy(new_data_fraction=5)
    assert e.value.details["field"] == "new_data_fraction"
    with pytest.raises(ConfigError, match="mode 'sometimes'"):
        Policy(mode="sometimes")
    with pytest.raises(ConfigError, match="unknown policy key 'evry_s'"):
        Policy.from_json({"evry_s": 3})
    assert Policy.from_json(Policy(every_s=60.0).to_json()) == Policy(every_s=60.0)
    assert parse_new_data("5%") == (0.05, None) and parse_new_data("500") == (None, 500)
    assert parse_share("20%", "drift") == 0.2 and parse_share("off", "drift") is None
    with pytest.raises(ConfigError, match="--new-data 'lots'"):
        parse_new_data("lots")


def test_decisions_are_recorded_with_evidence_and_survive_reopening(iris_copy: Path) -> None:
    reg = Registry(iris_copy)
    p = Policy(new_data_rows=10)
    reg.set_policy("iris", p.to_json())
    first = reg.add_decision("iris", evaluate(p, ev(labelled_since=12)).to_json())
    reg.add_decision("iris", evaluate(p, ev(labelled_since=3)).to_json())
    reg.finish_decision(first, {"candidate": 3, "label": "v1.1"})
    again = Registry(iris_copy)
    got = again.decisions("iris")
    assert [d["fired"] for d in got] == [False, True]
    assert got[1]["outcome"] == {"candidate": 3, "label": "v1.1"} and got[0]["outcome"] is None
    assert got[1]["triggers"][2]["evidence"]["labelled_since"] == 12
    assert [d["id"] for d in again.decisions("iris", fired_only=True)] == [first]
    assert again.policies() == {"iris": p.to_json()}
    with pytest.raises(NotFoundError):
        again.set_policy("ghost", p.to_json())


def test_policy_set_merges_flags_and_triggers_lists_decisions(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = ["--registry", str(iris_copy)]
    assert main(["policy", "set", "iris", "--every", "7d", "--min-metric", "0.9",
                 "--new-data", "5%", "--drift", "20%", "--cooldown", "6h", *reg]) == 0
    assert main(["policy", "set", "iris", "--mode", "finetune", "--auto-promote", "--every",
                 "off", "--json", *reg]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index('{\n  "name"'):])["policy"]["mode"] == "finetune"
    assert main(["policy", "show", "iris", "--json", *reg]) == 0
    policy = json.loads(capsys.readouterr().out)["policy"]
    assert policy["every_s"] is None and policy["min_metric"] == 0.9
    assert policy["new_data_fraction"] == 0.05 and policy["drift_devices"] == 0.2
    assert policy["mode"] == "finetune" and policy["auto_promote"] is True
    assert policy["cooldown_s"] == 21600
    Registry(iris_copy).add_decision(
        "iris", evaluate(Policy.from_json(policy), ev(labelled_since=80)).to_json())
    assert main(["triggers", "iris", *reg]) == 0
    text = capsys.readouterr().out
    assert "triggers performance, data, drift; mode finetune" in text
    assert "fired" in text and "data" in text and "training (or interrupted)" in text
    assert main(["policy", "set", "iris", "--every", "soon", *reg]) == 2
    assert "every 'soon' is not a duration" in capsys.readouterr().err
    assert main(["triggers", "ghost", *reg]) == 2


def test_a_schema_2_registry_gains_the_policy_tables_when_opened(iris_copy: Path) -> None:
    import sqlite3

    conn = sqlite3.connect(iris_copy / "registry.db")
    conn.execute("DROP TABLE policies")
    conn.execute("DROP TABLE decisions")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    reg = Registry(iris_copy)
    reg.set_policy("iris", Policy(every_s=60.0).to_json())
    assert reg.policies() == {"iris": Policy(every_s=60.0).to_json()}
    assert reg.versions("iris")[0].version == 1  # the versions were kept
