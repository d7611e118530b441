"""The controller over a real registry and the real telemetry store: triggers fire, a
candidate is trained, gated and registered, decisions survive a restart, one controller at
a time acts on a model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.auth import AuditLog
from hybridml.cloud.controller import Controller, model_lock
from hybridml.cloud.data import load_csv
from hybridml.cloud.evidence import epoch
from hybridml.cloud.labelled import Labelled, from_dataset
from hybridml.cloud.policy import Policy
from hybridml.cloud.registry import Registry
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.train import train
from tests.conftest import write_orders_csv

CLOUD = str(Path(sys.executable).parent / "hybridml-cloud")
DAY = 86400.0


@pytest.fixture
def source(tmp_path: Path, orders_csv: Path) -> Path:
    """A private copy of the orders CSV: v1's training source, which a test may append to."""
    return Path(shutil.copy(orders_csv, tmp_path / "orders.csv"))


def _v1(tmp_path: Path, source: Path, model: str, params: dict[str, object]) -> Registry:
    reg = Registry(tmp_path / "reg")
    train(reg, "late", data=source, target="late", drop=["delivery_minutes"], model=model,
          params=params)
    return reg


def _created(reg: Registry, version: int = 1) -> float:
    return epoch(reg.versions("late")[version - 1].created)


def _fresh(tmp_path: Path, n: int = 150) -> Labelled:
    path = write_orders_csv(tmp_path / "fresh.csv", n=n, seed=21)
    ds = load_csv(path, "late", drop=["delivery_minutes"])
    return from_dataset(ds, np.arange(len(ds)))


def _feed(reg: Registry, rows: Labelled, at: float) -> None:
    """Labelled rows arriving through the telemetry store's feedback path at ``at``."""
    store = TelemetryStore(reg, clock=lambda: at)
    result = store.add_feedback("late", "dev-1", [
        {"format": 1, "id": f"fb:{i}", "features": row, "label": label}
        for i, (row, label) in enumerate(zip(rows.rows, rows.labels))])
    assert not result.refused, result.refused[:1]


def test_time_trigger_trains_gates_and_registers_a_finetune_then_the_cooldown_holds(
        tmp_path: Path, source: Path) -> None:
    reg = _v1(tmp_path, source, "hgb", {"max_iter": 20})
    t1 = _created(reg)
    _feed(reg, _fresh(tmp_path), t1 + 60)
    reg.set_policy("late", Policy(every_s=7 * DAY, auto_promote=True).to_json())
    now = t1 + 8 * DAY
    steps = Controller(reg, clock=lambda: now).run_once()
    assert [(s.name, s.fired) for s in steps] == [("late", True)]
    out = steps[0].outcome
    assert out is not None and out["candidate"] == 2 and out["label"] == "v1.1"
    assert out["mode"] == {"mode": "finetune", "requested": "auto",
                           "reason": "hgb continues by boosting_rounds and the schema is "
                                     "unchanged"}
    assert out["data"]["new"] == 150
    manifest = reg.manifest("late", 2)
    gate = manifest["gate"]
    assert gate["against"] == 1 and gate["holdout"]["rows"] == 80
    assert gate["recent"]["rows"] + gate["recent"]["trained"] == 150
    assert out["blessed"] == gate["blessed"] and out["promoted"] == gate["blessed"]
    assert reg.aliases("late")["stable"] == (2 if gate["blessed"] else 1)
    # Its training data is a CSV under the registry, fingerprinted like any training data.
    training = manifest["training"]
    assert Path(training["source"]).parent == reg.root / "training" / "late"
    assert Path(training["source"]).stat().st_mode & 0o077 == 0  # owner-only, as the registry
    assert len(training["data_sha256"]) == 64
    (decision,) = reg.decisions("late")
    assert decision["fired"] and decision["outcome"] == out
    assert [t["name"] for t in decision["triggers"] if t["fired"]] == ["time"]
    # A restarted controller (new objects, same database) is held by the cooldown.
    again = Controller(Registry(tmp_path / "reg"), clock=lambda: now + 3600).run_once()
    assert not again[0].fired
    newest = Registry(tmp_path / "reg").decisions("late")[0]
    assert newest["held"] is True and newest["outcome"] is None
    assert len(reg.versions("late")) == 2


def test_a_blessed_candidate_is_promoted_through_the_audited_promote(tmp_path: Path) -> None:
    # v1 learned from 100 orders; 300 more labelled orders arrive: the data trigger fires
    # (300 >= 50% of 100), the fine-tune is better on the recent rows and not worse on the
    # holdout, and auto_promote makes it stable.
    small = write_orders_csv(tmp_path / "small.csv", n=100, seed=0)
    reg = _v1(tmp_path, small, "mlp", {})
    t1 = _created(reg)
    _feed(reg, _fresh(tmp_path, n=300), t1 + 60)
    reg.set_policy("late", Policy(new_data_fraction=0.5, auto_promote=True).to_json())
    out = Controller(reg, clock=lambda: t1 + 120).run_once()[0].outcome
    assert out is not None and (out["label"], out["blessed"], out["promoted"]) == \
        ("v1.1", True, True)
    gate = reg.manifest("late", 2)["gate"]
    assert gate["recent"]["candidate"] > gate["recent"]["active"]
    # The candidate's training split (new rows plus as many rehearsed old ones) took most of
    # the 300 new rows: the gate scores the recent slice only on the rest.
    recent = gate["recent"]
    assert recent["rows"] + recent["trained"] == 300 and 0 < recent["rows"] < 150
    assert reg.aliases("late") == {"stable": 2}
    assert AuditLog(reg.root).replaced("late", "stable") == (1, 2)
    assert AuditLog(reg.root).entries("late")[-1]["by"] == "controller"


def test_a_blessed_candidate_ships_by_the_policys_rollout_not_at_once(tmp_path: Path
                                                                      ) -> None:
    small = write_orders_csv(tmp_path / "small.csv", n=100, seed=0)
    reg = _v1(tmp_path, small, "mlp", {})
    t1 = _created(reg)
    _feed(reg, _fresh(tmp_path, n=300), t1 + 60)
    reg.set_policy("late", Policy(new_data_fraction=0.5, auto_promote=True,
                                  rollout="canary").to_json())
    out = Controller(reg, clock=lambda: t1 + 120).run_once()[0].outcome
    assert out is not None and (out["blessed"], out["promoted"], out["strategy"]) == \
        (True, False, "canary")
    assert reg.aliases("late") == {"stable": 1}  # the canary decides, not the gate alone
    from hybridml.cloud.rollouts import Rollouts

    r = Rollouts(reg).active("late")
    assert r is not None and (r.id, r.candidate, r.stable) == (out["rollout"], 2, 1)
    assert Rollouts(reg).events(r.id)[0]["actor"] == "controller"
    with pytest.raises(Exception, match="rollout"):
        Policy(rollout="ab")


def test_auto_mode_retrains_logreg_only_when_there_is_new_data(tmp_path: Path,
                                                               source: Path) -> None:
    reg = _v1(tmp_path, source, "logreg", {})
    t1 = _created(reg)
    reg.set_policy("late", Policy(every_s=DAY, cooldown_s=0).to_json())
    step = Controller(reg, clock=lambda: t1 + 2 * DAY).run_once()[0]
    assert step.fired and step.outcome is not None and step.outcome["candidate"] is None
    assert step.outcome["skipped"].startswith("nothing new since v1's line was trained")
    # The user appends rows to the training CSV: the source changed, so a retrain has data.
    extra = write_orders_csv(tmp_path / "more.csv", n=100, seed=9).read_text().splitlines()[1:]
    with source.open("a") as fh:
        fh.write("\n".join(extra) + "\n")
    step = Controller(reg, clock=lambda: t1 + 3 * DAY).run_once()[0]
    out = step.outcome
    assert out is not None and out["candidate"] == 2 and out["label"] == "v2"
    assert out["mode"]["mode"] == "retrain" and "logreg model, which cannot be fine-tuned" in \
        out["mode"]["reason"]
    assert out["data"]["source_changed"] is True and out["data"]["reservoir"] == 500
    m = reg.manifest("late", 2)
    assert (m["lineage"], m["parent"], m["training"]["rows"]) == ("retrain", 1, 500)
    assert m["gate"]["against"] == 1 and m["gate"]["holdout"]["trained"] > 0
    assert reg.aliases("late") == {"stable": 1}  # auto_promote is off


def test_a_model_whose_lock_is_held_is_skipped_and_nothing_is_recorded(
        tmp_path: Path, source: Path) -> None:
    reg = _v1(tmp_path, source, "logreg", {})
    reg.set_policy("late", Policy(every_s=60).to_json())
    with model_lock(reg, "late") as mine:
        assert mine
        steps = Controller(Registry(reg.root), clock=lambda: _created(reg) + DAY).run_once()
    assert steps[0].skipped == "another controller holds its lock" and not steps[0].fired
    assert reg.decisions("late") == []


def test_two_controllers_at_once_train_one_candidate(tmp_path: Path, source: Path) -> None:
    reg = _v1(tmp_path, source, "sgd", {})
    t1 = _created(reg)
    _feed(reg, _fresh(tmp_path), t1 + 60)
    reg.set_policy("late", Policy(new_data_rows=100).to_json())
    start = threading.Barrier(2)
    results: list[object] = []

    def run() -> None:
        ctl = Controller(Registry(reg.root), clock=lambda: t1 + 120)
        start.wait()
        results.extend(ctl.run_once())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2
    assert [v.version for v in reg.versions("late")] == [1, 2]
    made = [d for d in reg.decisions("late") if d["outcome"] and d["outcome"]["candidate"]]
    assert len(made) == 1 and made[0]["outcome"]["label"] == "v1.1"


def test_two_controller_processes_at_once_train_one_candidate(tmp_path: Path,
                                                              source: Path) -> None:
    reg = _v1(tmp_path, source, "sgd", {})
    _feed(reg, _fresh(tmp_path, n=60), _created(reg) + 1)
    reg.set_policy("late", Policy(new_data_rows=50).to_json())
    cmd = [CLOUD, "controller", "--once", "--json", "--registry", str(reg.root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    steps = [json.loads(o)[0] for o, _ in outs]
    trained = [s for s in steps if s["outcome"] and s["outcome"]["candidate"]]
    assert len(trained) == 1 and trained[0]["outcome"]["candidate"] == 2
    assert [v.version for v in reg.versions("late")] == [1, 2]


def test_labels_judging_the_active_version_fire_the_performance_trigger(
        tmp_path: Path, source: Path) -> None:
    from hybridml.cloud.evidence import gather, open_telemetry
    from hybridml.cloud.policy import evaluate
    from hybridml.shared.clock import utc_iso

    reg = _v1(tmp_path, source, "logreg", {})
    t1 = _created(reg)
    store = TelemetryStore(reg, clock=lambda: t1 + 60)
    # 60 labels from devices running v1: it predicted "on_time", the truth was "late" 40 times.
    store.add_feedback("late", "dev-1", [
        {"format": 1, "id": f"p:{i}", "prediction_id": f"s:late:{i}", "version": 1,
         "prediction": "on_time", "label": "late" if i < 40 else "on_time",
         "created": utc_iso(t1 + 30)} for i in range(60)])
    policy = Policy(min_metric=0.9, min_labels=50)
    decision = evaluate(policy, gather(reg, open_telemetry(reg, lambda: t1 + 90), "late",
                                       policy, t1 + 90))
    (perf,) = [t for t in decision.triggers if t.name == "performance"]
    assert decision.fired and perf.fired
    assert perf.evidence["labels"] == 60 and perf.evidence["value"] == 0.5  # balanced acc.
    quiet = Policy(min_metric=0.4, min_labels=50)
    assert not evaluate(quiet, gather(reg, open_telemetry(reg), "late", quiet, t1 + 90)).fired


def test_fleet_drift_in_two_consecutive_windows_fires_the_drift_trigger(
        tmp_path: Path, source: Path) -> None:
    from hybridml.cloud.evidence import gather, open_telemetry
    from hybridml.cloud.policy import Decision, evaluate
    from tests.summarykit import records, shifted, summary

    reg = _v1(tmp_path, source, "logreg", {})
    manifest = reg.manifest("late")
    rows = list(_fresh(tmp_path, n=1400).rows)[:600]
    far = shifted(rows, "distance_km", 6.0)  # the drifting device's roads got longer
    now = _created(reg) + 3 * 3600
    hour = 3600.0

    def upload(device: str, seq: int, sample: list[dict[str, object]], window: int) -> None:
        start = now - (window + 1) * hour + 1
        store = TelemetryStore(reg, clock=lambda: now)
        body = summary(manifest, sample, start=start, end=start + hour - 2)
        assert not store.ingest_summaries(device, records(device, [body], seq)).refused

    policy = Policy(drift_devices=0.2, drift_window_s=hour)

    def decision() -> Decision:
        return evaluate(policy, gather(reg, open_telemetry(reg, lambda: now), "late", policy,
                                       now))

    # One device (most of the traffic) drifted in the last window only: not yet.
    upload("pi-1", 1, far, 0)
    upload("pi-2", 1, rows[:200], 0)
    upload("pi-1", 2, rows, 1)
    upload("pi-2", 2, rows[:200], 1)
    first = decision()
    assert not first.fired
    # The same device drifted in the window before too: two consecutive windows, 75% of the
    # reporting traffic in dataset drift >= 20%: the trigger fires, with its evidence.
    reg2 = _v1(tmp_path / "again", source, "logreg", {})
    manifest = reg2.manifest("late")
    reg, now = reg2, _created(reg2) + 3 * 3600
    upload("pi-1", 1, far, 0)
    upload("pi-1", 2, far, 1)
    upload("pi-2", 1, rows[:200], 0)
    upload("pi-2", 2, rows[:200], 1)
    fired = decision()
    (drift,) = [t for t in fired.triggers if t.name == "drift"]
    assert fired.fired and drift.fired, drift.evidence


def test_quiet_decisions_are_pruned_after_30_days_and_fired_ones_kept(
        tmp_path: Path, source: Path) -> None:
    from hybridml.shared.clock import utc_iso

    reg = _v1(tmp_path, source, "logreg", {})
    t1 = _created(reg)
    now = t1 + 3600
    old = utc_iso(now - 40 * DAY)
    quiet = reg.add_decision("late", {"time": old, "fired": False, "triggers": []})
    fired = reg.add_decision("late", {"time": old, "fired": True, "triggers": []})
    recent = reg.add_decision("late", {"time": utc_iso(now - DAY), "fired": False})
    reg.set_policy("late", Policy(every_s=7 * DAY).to_json())  # does not fire an hour in
    step = Controller(reg, clock=lambda: now).run_once()[0]
    assert not step.fired
    kept = {d["id"] for d in reg.decisions("late")}
    assert quiet not in kept and {fired, recent, step.decision} <= kept
