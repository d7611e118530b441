"""Rollout records at ingest: shadow, interleave and load_failed health bodies are checked
strictly (docs/rollouts.md §4); a bad one is refused alone, naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.telemetry import TelemetryStore

WINDOW = {"start": "2026-12-01T15:00:00Z", "end": "2026-12-01T16:00:00Z"}
LATENCY = {"edges": [0.05, 0.1, 0.2, 0.5, 1, 2], "counts": [0, 1, 2, 3, 4, 0, 0]}


@pytest.fixture
def store(iris_copy: Path) -> Iterator[TelemetryStore]:
    """A telemetry store over a private iris registry (v1, v2; multiclass)."""
    s = TelemetryStore(Registry(iris_copy))
    yield s
    s.close()


def shadow_body(**change: Any) -> dict[str, Any]:
    """A good multiclass shadow body, with ``change`` applied (None removes a key)."""
    body: dict[str, Any] = {
        "format": 1, "model": "iris", "rollout": 7, "role": "canary", "served": 2,
        "shadow": 1, "task": "multiclass", "window": WINDOW, "calls": 50, "sampled": 5,
        "skipped": 0, "rows": 40, "errors": 0, "agree": 39,
        "prob_diff": {"edges": [0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5],
                      "counts": [30, 5, 1, 1, 1, 1, 1, 0]},
        "abs_diff": None, "latency_ms": LATENCY}
    body.update(change)
    return {k: v for k, v in body.items() if v is not None or k == "abs_diff"}


def interleave_body(**change: Any) -> dict[str, Any]:
    """A good interleave body, with ``change`` applied."""
    body: dict[str, Any] = {
        "format": 1, "model": "iris", "rollout": 9, "a": 1, "b": 2, "window": WINDOW,
        "impressions": 800, "clicks": 240, "credited_a": 100, "credited_b": 140,
        "wins_a": 60, "wins_b": 90, "ties": 10, "late_clicks": 0}
    body.update(change)
    return body


def health_body(**change: Any) -> dict[str, Any]:
    """A load_failed health body, with ``change`` applied."""
    body: dict[str, Any] = {"format": 1, "model": "iris", "event": "load_failed",
                            "version": 2, "rollout": 7,
                            "error": {"code": "model_load", "message": "bad onnx"}}
    body.update(change)
    return body


def send(store: TelemetryStore, kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Upload one record; the answer as JSON."""
    rec = {"id": "0a1b2c3d4e:1", "kind": kind, "priority": 1, "body": body}
    return store.ingest_summaries("pi-1", [rec]).to_json()


def refused_field(store: TelemetryStore, kind: str, body: dict[str, Any]) -> str:
    """The field named by the refusal of a record that must be refused."""
    answer = send(store, kind, body)
    assert not answer["accepted"], answer
    return str(answer["refused"][0]["field"])


def test_good_shadow_record_is_stored_as_an_event(store: TelemetryStore) -> None:
    assert send(store, "shadow", shadow_body())["accepted"] == ["0a1b2c3d4e:1"]
    [got] = store.events("iris", "shadow")
    assert got["device"] == "pi-1" and got["agree"] == 39 and got["rollout"] == 7
    assert got["latency_ms"] == LATENCY and got["abs_diff"] is None


@pytest.mark.parametrize(("change", "field"), [
    ({"format": 2}, "body.format"),
    ({"model": "nope"}, "body.model"),
    ({"served": 9}, "body.served"),
    ({"shadow": 2}, "body.shadow"),
    ({"rollout": 0}, "body.rollout"),
    ({"rollout": True}, "body.rollout"),
    ({"role": "arm"}, "body.role"),
    ({"task": "regression"}, "body.task"),
    ({"rows": -1}, "body.rows"),
    ({"calls": 1.5}, "body.calls"),
    ({"agree": 41}, "body.agree"),
    ({"sampled": 51}, "body.sampled"),
    ({"window": {"start": WINDOW["end"], "end": WINDOW["start"]}}, "body.window.end"),
    ({"window": {"start": "yesterday", "end": WINDOW["end"]}}, "body.window.start"),
    ({"prob_diff": {"edges": [0.1, 0.2], "counts": [1, 2]}}, "body.prob_diff.counts"),
    ({"prob_diff": {"edges": [0.2, 0.1], "counts": [1, 2, 3]}}, "body.prob_diff.edges"),
    ({"abs_diff": {"edges": [1.0], "counts": [1, 1], "sum": 1.0, "max": 1.0}},
     "body.abs_diff"),
    ({"latency_ms": {"edges": [1, 2], "counts": [1, 1]}}, "body.latency_ms.counts"),
])
def test_bad_shadow_records_are_refused_naming_the_field(
        store: TelemetryStore, change: dict[str, Any], field: str) -> None:
    assert refused_field(store, "shadow", shadow_body(**change)) == field


def test_a_bad_record_is_refused_alone(store: TelemetryStore) -> None:
    good = {"id": "0a1b2c3d4e:1", "kind": "shadow", "body": shadow_body()}
    bad = {"id": "0a1b2c3d4e:2", "kind": "shadow", "body": shadow_body(agree=99)}
    answer = store.ingest_summaries("pi-1", [good, bad]).to_json()
    assert answer["accepted"] == ["0a1b2c3d4e:1"]
    assert [r["field"] for r in answer["refused"]] == ["body.agree"]


def test_good_interleave_record_is_stored(store: TelemetryStore) -> None:
    assert send(store, "interleave", interleave_body())["accepted"]
    [got] = store.events("iris", "interleave")
    assert (got["wins_a"], got["wins_b"], got["ties"]) == (60, 90, 10)


@pytest.mark.parametrize(("change", "field"), [
    ({"a": 99}, "body.a"),
    ({"b": "2"}, "body.b"),
    ({"wins_a": 700, "wins_b": 100}, "body.impressions"),
    ({"credited_a": 200}, "body.clicks"),
    ({"ties": -1}, "body.ties"),
    ({"impressions": None}, "body.impressions"),
    ({"rollout": "9"}, "body.rollout"),
])
def test_bad_interleave_records_are_refused_naming_the_field(
        store: TelemetryStore, change: dict[str, Any], field: str) -> None:
    assert refused_field(store, "interleave", interleave_body(**change)) == field


def test_load_failed_health_is_checked_and_other_health_kept_as_sent(
        store: TelemetryStore) -> None:
    assert send(store, "health", health_body())["accepted"]
    assert refused_field(store, "health", health_body(version=7)) == "body.version"
    assert refused_field(store, "health", health_body(rollout=None)) == "body.rollout"
    assert refused_field(store, "health", health_body(error="x")) == "body.error"
    other = {"id": "0a1b2c3d4e:9", "kind": "health", "body": {"event": "started", "x": 1}}
    assert store.ingest_summaries("pi-1", [other]).accepted == ["0a1b2c3d4e:9"]
    events = store.events("iris", "health")
    assert [e["event"] for e in events] == ["load_failed"]


def test_summary_latency_counts_must_fit_the_edges(store: TelemetryStore) -> None:
    body = {"format": 1, "model": "iris", "version": 1, "window": WINDOW, "rows": 0,
            "latency_ms": {"edges": [1.0, 2.0], "counts": [1, 2]}}
    assert refused_field(store, "summary", body) == "body.latency_ms.counts"
