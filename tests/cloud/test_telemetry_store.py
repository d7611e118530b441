"""The telemetry store on a real registry, on both backends (a SQLite file; PostgreSQL started
by the tests): ingest, idempotency, drift summed over devices, per-device windows, performance
from feedback, labelled rows."""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_iris

from hybridml.cloud.registry import Registry
from hybridml.cloud.storage import Storage
from hybridml.cloud.telemetry import DB_NAME, TelemetryStore
from hybridml.shared.clock import utc_iso
from hybridml.shared.drift import bin_index, drift_report, merge_counts
from tests.summarykit import Span, records, shifted, summary

HOUR = 3600.0
T0 = 1_796_000_400.0  # 2026-11-30T..., on the hour


class Clock:
    """The store's "now", moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """A clock at :data:`T0`."""
    return Clock(T0)


@pytest.fixture
def store(iris_on: Path, storage: Storage, clock: Clock) -> Iterator[TelemetryStore]:
    """A telemetry store over a private iris registry, on the test's clock and backend."""
    s = TelemetryStore(Registry(iris_on, storage=storage), clock=clock)
    yield s
    s.close()


@pytest.fixture
def manifest(store: TelemetryStore) -> dict[str, Any]:
    """The manifest of iris v1 (its profile bins every summary here)."""
    return store.registry.manifest("iris", 1)


def iris_rows(manifest: dict[str, Any], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` rows drawn from the iris data the model was trained on."""
    data = load_iris().data
    names = [f["name"] for f in manifest["schema"]]
    pick = np.random.default_rng(seed).integers(0, len(data), n)
    return [dict(zip(names, map(float, data[i]))) for i in pick]


def window(k: int) -> Span:
    """The k-th hour before :data:`T0` (0: the last one)."""
    return Span(start=T0 - (k + 1) * HOUR, end=T0 - k * HOUR)


def test_the_same_record_ids_twice_are_duplicates_and_count_once(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    bodies = [summary(manifest, iris_rows(manifest, 600, k), **window(k)) for k in (1, 0)]
    first = store.ingest_summaries("pi-1", records("0a1b2c3d4e", bodies))
    again = store.ingest_summaries("pi-1", records("0a1b2c3d4e", bodies))
    assert first.accepted == ["0a1b2c3d4e:1", "0a1b2c3d4e:2"] and not first.duplicates
    assert again.duplicates == ["0a1b2c3d4e:1", "0a1b2c3d4e:2"] and not again.accepted
    assert [s["id"] for s in store.summaries("iris")] == ["0a1b2c3d4e:1", "0a1b2c3d4e:2"]
    assert store.drift("iris", 1)["rows"] == 1200
    counters = store.counters()
    assert counters[("records_accepted", "all")] == 2
    assert counters[("records_duplicate", "all")] == 2
    assert counters[("predictions", "iris|1|edge")] == 1200


def test_a_bad_record_is_refused_alone_naming_its_field(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    good = summary(manifest, iris_rows(manifest, 50), **window(0))
    short = summary(manifest, iris_rows(manifest, 50), **window(0))
    short["features"]["petal_length_cm"]["counts"].pop()
    late = {**good, "window": {"start": "2026-12-01T16:00:00Z", "end": "yesterday"}}
    unknown = {**good, "version": 9}
    raw = [*records("0a1b2c3d4e", [good, short, late, unknown]),
           {"id": "no spaces allowed", "kind": "summary", "body": good},
           {"id": "0a1b2c3d4e:9", "kind": "gossip", "body": {}}]
    result = store.ingest_summaries("pi-1", raw)
    assert result.accepted == ["0a1b2c3d4e:1"]
    assert [(r["index"], r["id"], r["field"]) for r in result.refused] == [
        (1, "0a1b2c3d4e:2", "body.features.petal_length_cm.counts"),
        (2, "0a1b2c3d4e:3", "body.window.end"),
        (3, "0a1b2c3d4e:4", "body.version"),
        (4, None, "id"),
        (5, "0a1b2c3d4e:9", "kind")]
    assert "bins" in result.refused[0]["error"]
    assert all(r["code"] == "bad_input" for r in result.refused)


def test_fleet_drift_sums_counts_so_each_device_weighs_its_traffic(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    busy = summary(manifest, iris_rows(manifest, 50_000, 1), **window(0))
    quiet_rows = shifted(iris_rows(manifest, 600, 2), "petal_length_cm", 10.0)
    quiet = summary(manifest, quiet_rows, **window(0))
    store.ingest_summaries("busy", records("aaaaaaaaaa", [busy]))
    store.ingest_summaries("quiet", records("bbbbbbbbbb", [quiet]))

    fleet = store.drift("iris", 1)
    assert fleet["rows"] == 50_600
    expected = drift_report(manifest["profile"], merge_counts([busy, quiet]))
    assert [f["psi"] for f in fleet["features"]] == [f["psi"] for f in expected["features"]]
    status = {f["name"]: f["status"] for f in fleet["features"]}
    assert status["petal_length_cm"] != "alert"  # 600 of 50,600 rows moved
    own = {f["name"]: f["status"] for f in store.drift("iris", 1, device="quiet")["features"]}
    assert own["petal_length_cm"] == "alert"
    assert own["sepal_width_cm"] == "ok"


def test_device_drift_gives_each_device_its_windows_on_the_injected_clock(
        store: TelemetryStore, manifest: dict[str, Any], clock: Clock) -> None:
    names = [f["name"] for f in manifest["schema"]]
    moved = iris_rows(manifest, 600, 3)
    for name in names:
        moved = shifted(moved, name, 10.0)
    store.ingest_summaries("steady", records("aaaaaaaaaa", [
        summary(manifest, iris_rows(manifest, 600, k), **window(k)) for k in (1, 0)]))
    store.ingest_summaries("moved", records("bbbbbbbbbb", [
        summary(manifest, iris_rows(manifest, 600, 4), **window(1)),
        summary(manifest, moved, **window(0))]))

    by_device = {d["device"]: d["windows"] for d in store.device_drift("iris", 1, HOUR)}
    assert [w["dataset_drift"] for w in by_device["steady"]] == [False, False]
    assert [w["dataset_drift"] for w in by_device["moved"]] == [False, True]
    assert sorted(by_device["moved"][1]["alerts"]) == sorted(names)
    assert [w["rows"] for w in by_device["moved"]] == [600, 600]

    clock.now = T0 + 2 * HOUR  # both windows now lie before the last two hours
    later = {d["device"]: d for d in store.device_drift("iris", 1, HOUR)}
    assert later == {}


def feedback(version: int, pairs: list[tuple[str, str]], created: str, tag: str
             ) -> list[dict[str, Any]]:
    """Device feedback records: (prediction, label) pairs for ``version``."""
    return [{"id": f"{tag}:{i}", "format": 1, "model": "iris", "version": version,
             "prediction_id": f"{tag}:iris:{i}", "prediction": p, "label": y,
             "created": created} for i, (p, y) in enumerate(pairs)]


def test_performance_is_realised_from_feedback_per_version_and_window(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    a, b = manifest["output"]["classes"][:2]
    store.add_feedback("iris", "pi-1", feedback(1, [(a, a)] * 40, "2026-11-28T10:00:00Z",
                                                "aaaaaaaaaa"))
    store.add_feedback("iris", "pi-1", feedback(1, [(a, a)] * 20 + [(a, b)] * 20,
                                                "2026-11-29T10:00:00Z", "bbbbbbbbbb"))
    store.add_feedback("iris", "pi-2", feedback(2, [(b, b)] * 30, "2026-11-29T11:00:00Z",
                                                "cccccccccc"))
    perf = store.performance("iris")
    assert [(p["version"], p["start"], p["labels"], p["value"], p["estimate"]) for p in perf] \
        == [(1, "2026-11-28T00:00:00Z", 40, 1.0, False),
            (1, "2026-11-29T00:00:00Z", 40, 0.5, False),
            (2, "2026-11-29T00:00:00Z", 30, 1.0, False)]
    assert {p["metric"] for p in perf} == {"accuracy"}
    assert store.performance("iris", version=2) == perf[2:]


def test_few_labels_add_an_estimate_from_the_confidence_histogram(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    a = manifest["output"]["classes"][0]
    store.ingest_summaries("pi-1", records("aaaaaaaaaa", [summary(
        manifest, iris_rows(manifest, 600), **window(0), confidence=[0.99] * 600)]))
    start = window(0)["start"]
    created = utc_iso(start)
    store.add_feedback("iris", "pi-1", feedback(1, [(a, a)] * 5, created, "bbbbbbbbbb"))
    perf = store.performance("iris")
    realised, estimate = perf
    assert realised["labels"] == 5 and realised["estimate"] is False
    assert estimate["estimate"] is True and estimate["metric"] == "accuracy"
    assert estimate["labels"] == 5 and estimate["start"] == realised["start"]
    # every top probability was 0.99: the estimate is the middle of the bin holding 0.99
    edges = manifest["profile"]["confidence"]["edges"]
    k = int(bin_index(edges, np.array([0.99]))[0])
    low, high = [edges[0], *edges, edges[-1]][k:k + 2]
    assert low <= estimate["value"] <= high and estimate["value"] == round((low + high) / 2, 6)
    assert realised["start"] == utc_iso(start // 86400 * 86400)


def test_a_label_is_scored_through_the_sample_that_carries_its_prediction(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    a, b = manifest["output"]["classes"][:2]
    sample = {"format": 1, "model": "iris", "version": 1, "prediction_id": "dddddddddd:iris:7",
              "prediction": a, "features": {}}
    assert store.ingest_summaries("pi-1", records("dddddddddd", [sample], kind="sample")) \
        .accepted == ["dddddddddd:1"]
    labels = [{"format": 1, "prediction_id": "dddddddddd:iris:7", "label": b},
              {"format": 1, "prediction_id": "dddddddddd:iris:8", "label": a}]
    assert len(store.add_feedback("iris", "pi-1", labels).accepted) == 2
    perf = store.performance("iris")
    assert [(p["version"], p["labels"], p["value"]) for p in perf] == [(1, 1, 0.0)]


def test_labelled_rows_keep_their_labels_and_count_what_arrived_since(
        store: TelemetryStore, manifest: dict[str, Any], clock: Clock) -> None:
    rows = iris_rows(manifest, 3)
    classes = manifest["output"]["classes"]
    first = store.add_feedback("iris", "lab", [{"format": 1, "features": r, "label": classes[0]}
                                               for r in rows[:2]])
    fingerprint = store.labelled_sha256("iris")
    clock.now = T0 + HOUR
    store.add_feedback("iris", "lab", [{"format": 1, "features": rows[2], "label": classes[1]}])
    got_rows, labels = store.labelled_rows("iris")
    assert got_rows == rows and labels == [classes[0], classes[0], classes[1]]
    assert store.labelled_count("iris") == 3
    assert store.labelled_count("iris", since=T0 + 1) == 1
    assert store.labelled_rows("iris", since="2026-11-30T00:00:00Z")[1][-1] == classes[1]
    assert store.labelled_sha256("iris") != fingerprint
    assert all(i.startswith("sha256:") for i in first.accepted)
    again = store.add_feedback("iris", "lab", [{"format": 1, "features": rows[2],
                                                "label": classes[1]}])
    assert again.duplicates and store.labelled_count("iris") == 3


def test_feedback_needs_a_known_class_and_a_row_that_fits_the_schema(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    row = iris_rows(manifest, 1)[0]
    result = store.add_feedback("iris", "lab", [
        {"format": 1, "features": row, "label": "dandelion"},
        {"format": 1, "features": {**row, "petal_length_cm": "long"}, "label": "setosa"},
        {"format": 1, "label": manifest["output"]["classes"][0]},
        {"format": 2, "features": row, "label": manifest["output"]["classes"][0]},
        {"format": 1, "model": "wine", "features": row, "label": "x"}])
    assert not result.accepted
    assert [r["field"] for r in result.refused] == [
        "label", "features.petal_length_cm", "prediction_id", "format", "model"]
    assert "dandelion" in result.refused[0]["error"]


def test_devices_list_last_upload_rows_and_versions(
        store: TelemetryStore, manifest: dict[str, Any], clock: Clock) -> None:
    store.ingest_summaries("pi-1", records("aaaaaaaaaa", [
        summary(manifest, iris_rows(manifest, 10), **window(0))]))
    clock.now = T0 + 60
    store.ingest_summaries(None, records("bbbbbbbbbb", [  # no token: the store id names it
        summary(manifest, iris_rows(manifest, 7), **window(0))]))
    assert store.devices("iris") == [
        {"device": "bbbbbbbbbb", "last_seen": utc_iso(T0 + 60), "rows": 7, "versions": [1]},
        {"device": "pi-1", "last_seen": utc_iso(T0), "rows": 10, "versions": [1]}]


def test_dropped_counts_are_kept_once_per_upload(
        store: TelemetryStore, manifest: dict[str, Any]) -> None:
    batch = records("aaaaaaaaaa", [summary(manifest, iris_rows(manifest, 10), **window(0))])
    store.ingest_summaries("pi-1", batch, {"summary": 3, "sample": 40})
    store.ingest_summaries("pi-1", batch, {"summary": 3, "sample": 40})  # a retry
    counters = store.counters()
    assert counters[("dropped", "summary")] == 3 and counters[("dropped", "sample")] == 40


@pytest.mark.parametrize("storage", ["embedded"], indirect=True)  # a SQLite file's property
def test_the_database_is_private_and_in_wal_mode(store: TelemetryStore) -> None:
    path = store.registry.root / DB_NAME
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("storage", ["embedded"], indirect=True)  # the last release's file
def test_a_schema_1_telemetry_file_upgrades_in_place_and_keeps_its_records(
        iris_copy: Path, clock: Clock, manifest: dict[str, Any]) -> None:
    s = TelemetryStore(Registry(iris_copy), clock=clock)
    assert s.ingest_summaries("dev-1", records("0a1b2c3d4e", [summary(
        manifest, iris_rows(manifest, 50), **window(0))])).accepted
    s.close()
    path = iris_copy / DB_NAME
    with sqlite3.connect(path) as c:  # as the previous release left it
        c.execute("DROP INDEX events_by_kind")
        c.execute("PRAGMA user_version = 1")
    again = TelemetryStore(Registry(iris_copy), clock=clock)
    assert len(again.summaries("iris", 1)) == 1
    again.close()
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 2
        assert c.execute("SELECT name FROM sqlite_master WHERE name = 'events_by_kind'"
                         ).fetchone()
