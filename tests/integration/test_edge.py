"""The edge runtime against a real cloud: sync, offline, table hits, fallback, rollback."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import requests

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge import EdgeRuntime, FallbackPolicy
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import IntegrityError, ModelLoadError, NoModelError
from tests.conftest import CloudServer
from tests.integration.conftest import frequent_rows

ROW = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}


def typed(row: dict[str, str]) -> dict[str, object]:
    """CSV text row -> JSON-typed row for the late/eta schema."""
    num = {"hour", "distance_km", "items"}
    return {k: (float(v) if v else None) if k in num else (v or None) for k, v in row.items()}


def test_sync_downloads_verifies_and_activates(cloud: CloudServer, tmp_path: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "store"), "late", cloud.url)
    assert rt.version is None
    result = rt.sync()
    assert result.changed and result.version == 1
    assert set(result.downloaded) == {"model", "table", "explainer"}
    assert rt.version == 1 and rt.table is not None
    store = LocalStore(tmp_path / "store")
    assert store.active("late").version == 1  # type: ignore[union-attr]
    assert not list(store.artifacts.glob("*.part"))


def test_second_sync_downloads_nothing_and_costs_under_1kb(cloud: CloudServer,
                                                           tmp_path: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "store"), "late", cloud.url)
    rt.sync()
    again = rt.sync()
    assert not again.changed and again.bytes_downloaded == 0 and again.downloaded == ()
    assert again.wire_bytes < 1024


def test_offline_runtime_answers_every_row_locally(cloud: CloudServer, tmp_path: Path,
                                                   orders_csv: Path) -> None:
    EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url).sync()
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    rt = EdgeRuntime(tmp_path / "s", "late", dead)
    rows = [typed(r) for r in frequent_rows(orders_csv, 3)] + [ROW]
    preds = rt.predict(rows)
    assert [p.source for p in preds] == ["precomputed", "precomputed", "precomputed", "edge"]
    assert all(p.model_version == 1 and not p.degraded for p in preds)
    assert all(set(p.probabilities or {}) == {"late", "on_time"} for p in preds)


def test_table_hit_equals_local_inference(cloud: CloudServer, tmp_path: Path,
                                          orders_csv: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url)
    rt.sync()
    row = typed(frequent_rows(orders_csv, 1)[0])
    hit = rt.predict([row])[0]
    table, rt.table = rt.table, None
    local = rt.predict([row])[0]
    rt.table = table
    assert hit.source == "precomputed" and local.source == "edge"
    assert hit.prediction == local.prediction
    for k, v in (hit.probabilities or {}).items():
        assert abs(v - (local.probabilities or {})[k]) < 1e-6


def test_out_of_range_row_falls_back_to_live_cloud(cloud: CloudServer, tmp_path: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url)
    rt.sync()
    preds = rt.predict([ROW, dict(ROW, distance_km=500.0), dict(ROW, restaurant="r999")])
    assert [p.source for p in preds] == ["edge", "cloud", "cloud"]
    assert [p.reason for p in preds] == [None, "out_of_range", "unseen_category"]


def test_low_confidence_threshold_sends_rows_to_the_cloud(cloud: CloudServer,
                                                          tmp_path: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url,
                     policy=FallbackPolicy(min_confidence=1.0))
    rt.sync()
    p = rt.predict([ROW])[0]
    assert p.source == "cloud" and p.reason == "low_confidence"


def test_dead_cloud_gives_degraded_local_answers_and_opens_the_breaker(
        cloud: CloudServer, tmp_path: Path) -> None:
    EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url).sync()
    rt = EdgeRuntime(tmp_path / "s", "late", "http://127.0.0.1:9",
                     policy=FallbackPolicy(cooldown_s=60))
    odd = dict(ROW, distance_km=500.0)
    first = rt.predict([odd])[0]
    assert first.source == "edge" and first.degraded and first.reason == "out_of_range"
    assert rt.breaker.state == "open" and rt.cloud_failures == 1
    for _ in range(5):
        assert rt.predict([odd])[0].degraded
    assert rt.cloud_failures == 1  # the breaker kept later calls local


def test_no_model_and_no_cloud_says_to_run_sync(tmp_path: Path) -> None:
    rt = EdgeRuntime(tmp_path / "empty", "late")
    with pytest.raises(NoModelError, match="sync"):
        rt.predict([ROW])


def test_no_local_model_asks_the_cloud(cloud: CloudServer, tmp_path: Path) -> None:
    rt = EdgeRuntime(cloud.trust(tmp_path / "empty"), "late", cloud.url)
    p = rt.predict([ROW])[0]
    assert p.source == "cloud" and p.reason == "no_local_model" and p.model_version == 1


def test_new_version_is_activated_and_rollback_restores_the_old(
        own_cloud: CloudServer, tmp_path: Path, orders_csv: Path) -> None:
    rt = EdgeRuntime(own_cloud.trust(tmp_path / "s"), "iris", own_cloud.url)
    rt.sync()
    reg = Registry(own_cloud.registry)
    train(reg, "iris", dataset="iris", model="logreg", seed=3)
    assert not rt.sync().changed  # v2 is not promoted yet: stable still v1
    reg.set_alias("iris", "stable", 2)
    result = rt.sync()
    assert result.changed and result.version == 2 and result.previous_version == 1
    assert rt.version == 2
    assert rt.rollback().version == 1 and rt.version == 1
    assert LocalStore(tmp_path / "s").previous("iris").version == 2  # type: ignore[union-attr]


def test_corrupted_artifact_is_rejected_and_old_model_stays(
        own_cloud: CloudServer, tmp_path: Path) -> None:
    rt = EdgeRuntime(own_cloud.trust(tmp_path / "s"), "iris", own_cloud.url)
    rt.sync()
    reg = Registry(own_cloud.registry)
    v2 = train(reg, "iris", dataset="iris", model="rf", seed=3).manifest
    reg.set_alias("iris", "stable", 2)
    model = next(a for a in v2["artifacts"] if a["role"] == "model")
    blob = reg.blob_path(model["sha256"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupted"):
        rt.sync()
    assert rt.version == 1
    store = LocalStore(tmp_path / "s")
    assert store.active("iris").version == 1  # type: ignore[union-attr]
    assert not list(store.artifacts.glob("*.part"))
    assert "integrity" in store.sync_state("iris")["last_error"]


def test_golden_rows_mismatch_blocks_activation(own_cloud: CloudServer, tmp_path: Path) -> None:
    rt = EdgeRuntime(own_cloud.trust(tmp_path / "s"), "iris", own_cloud.url)
    rt.sync()
    reg = Registry(own_cloud.registry)
    train(reg, "iris", dataset="iris", model="logreg", seed=4)
    reg.set_alias("iris", "stable", 2)
    # A cloud-side bug: the manifest promises outputs the model does not produce.
    db = sqlite3.connect(own_cloud.registry / "registry.db")
    man = json.loads(db.execute("SELECT manifest FROM versions WHERE name='iris' AND "
                                "version=2").fetchone()[0])
    man["golden"]["labels"] = [(x + 1) % 3 for x in man["golden"]["labels"]]
    db.execute("UPDATE versions SET manifest=? WHERE name='iris' AND version=2",
               (json.dumps(man),))
    db.commit()
    db.close()
    with pytest.raises(ModelLoadError, match="golden"):
        rt.sync()
    assert rt.version == 1


def test_fallback_timeout_keeps_prediction_latency_bounded(cloud: CloudServer,
                                                           tmp_path: Path) -> None:
    EdgeRuntime(cloud.trust(tmp_path / "s"), "late", cloud.url).sync()
    # A listening socket that never answers: the fallback must give up at the timeout.
    import socket

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        rt = EdgeRuntime(tmp_path / "s", "late", url, policy=FallbackPolicy(timeout_ms=200))
        t0 = time.monotonic()
        p = rt.predict([dict(ROW, distance_km=500.0)])[0]
        elapsed = time.monotonic() - t0
    assert p.degraded and p.source == "edge"
    assert elapsed < 5  # bounded by the timeout, not by the cloud


def test_manifest_served_to_edge_matches_registry(cloud: CloudServer) -> None:
    body = requests.get(cloud.url + "/v1/models/late/manifest", timeout=5).json()
    assert body["name"] == "late" and body["output"]["classes"] == ["late", "on_time"]
