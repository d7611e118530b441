"""Telemetry counts what was answered, the same through every door, on the profile's bins.

A store holds ``late`` (a classifier on mixed features) and ``eta`` (regression), each with a
precomputed table of the first orders and a format-1 profile from training. The same rows —
table hits, model answers, a missing number, a missing category, an unseen restaurant, an
hour past the training range — go through the single-row fast path (one call each), a batch
of rows, text columns and arrays, each into its own runtime; the summaries must agree, and
their feature counts must be what :meth:`ColumnProfile.tally` (the shared rule) counts on the
encoded rows.
"""

from __future__ import annotations

import csv
import math
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.binning import MISS_VALUES, Binner, Rows
from hybridml.edge.fallback import FallbackPolicy
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.edge.telemetry import MIN_BIN_ROWS, Telemetry, TelemetrySettings
from hybridml.edge.window import LATENCY_EDGES_MS
from hybridml.shared.drift import Profile
from hybridml.shared.errors import InputError
from hybridml.shared.manifest import Manifest
from hybridml.shared.reference import bin_index
from hybridml.shared.schema import NUMERIC, InputSchema
from tests.conftest import write_orders_csv
from tests.integration.conftest import LATE_FEATURES, attach_table, frequent_rows

T0 = 1_800_000_000.0


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class World:
    """The store and the rows every door is given."""

    root: Path
    rows: list[dict[str, Any]]
    hits: int  # how many of the rows the table holds


def _typed(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in LATE_FEATURES:
        v = row[k]
        if k in ("hour", "items"):
            out[k] = int(v)
        elif k == "distance_km":
            out[k] = float(v) if v else None
        else:
            out[k] = v
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("telemetry")
    orders = write_orders_csv(root / "orders.csv", n=300)
    reg = Registry(root / "reg")
    train(reg, "late", data=orders, target="late", model="logreg", drop=["delivery_minutes"])
    train(reg, "eta", data=orders, target="delivery_minutes", model="logreg", drop=["late"])
    table_rows = frequent_rows(orders, k=8)
    log_csv = root / "log.csv"
    with open(log_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=LATE_FEATURES)
        w.writeheader()
        for i, r in enumerate(table_rows):
            for _ in range(8 - i):
                w.writerow(r)
    store = LocalStore(root / "store").ensure()
    for name in ("late", "eta"):
        attach_table(reg, name, log_csv)
        manifest = reg.manifest(name)
        assert Profile.of(manifest) is not None, "training should write a format-1 profile"
        for art in manifest["artifacts"]:
            shutil.copyfile(reg.blob_path(art["sha256"]), store.artifact_path(art["sha256"]))
        store.activate(Manifest.from_json(manifest))
    reg.close()
    with open(orders) as fh:
        others = [{k: r[k] for k in LATE_FEATURES} for r in list(csv.DictReader(fh))[100:130]]
    rows = [_typed(r) for r in table_rows] + [_typed(r) for r in others]
    rows += [dict(rows[9], distance_km=None), dict(rows[10], rain=""),
             dict(rows[11], restaurant="r999"), dict(rows[12], hour=30)]
    rows += rows[:3] * 4  # hits again: counted per call, binned per table row
    return World(store.root, rows, hits=8 + 12)


def telemetry(clock: Clock | None = None, **settings: Any) -> Telemetry:
    return Telemetry("late", TelemetrySettings(window_s=0, **settings), clock=clock or Clock())


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    return {k: ["" if r[k] is None else str(r[k]) for r in rows] for k in LATE_FEATURES}


def _arrays(schema: InputSchema, rows: list[dict[str, Any]]) -> tuple[Any, Any]:
    num = np.array([[np.nan if r[n] is None else r[n] for n in schema.numeric_names]
                    for r in rows], dtype=np.float32)
    cat = np.array([[r[n] for n in schema.categorical_names] for r in rows], dtype=object)
    return num, cat


def _one_by_one(rt: EdgeRuntime, rows: list[dict[str, Any]]) -> int:
    for r in rows:
        rt.predict([r])
    return len(rows)  # calls


def _batch(rt: EdgeRuntime, rows: list[dict[str, Any]]) -> int:
    rt.predict(rows)
    return 1


def _text(rt: EdgeRuntime, rows: list[dict[str, Any]]) -> int:
    rt.predict_text(_columns(rows))
    return 1


def _arrays_door(rt: EdgeRuntime, rows: list[dict[str, Any]]) -> int:
    assert rt.loaded is not None
    rt.predict_arrays(*_arrays(rt.loaded.schema, rows))
    return 1


DOORS: dict[str, Callable[[EdgeRuntime, list[dict[str, Any]]], int]] = {
    "row": _one_by_one, "rows": _batch, "text": _text, "arrays": _arrays_door}


def summary_through(world: World, name: str, door: str) -> tuple[dict[str, Any], int]:
    clock = Clock()
    rt = EdgeRuntime(world.root, name, telemetry=telemetry(clock))
    calls = DOORS[door](rt, world.rows)
    clock.now += 60
    records = rt.telemetry.flush()  # type: ignore[union-attr]
    assert [(kind, version) for kind, _, _, version in records] == [("summary", 1)]
    return records[0][1], calls


@pytest.mark.parametrize("name", ["late", "eta"])
def test_every_door_counts_the_same_rows_alike(world: World, name: str) -> None:
    summaries = {door: summary_through(world, name, door) for door in DOORS}
    ref, _ = summaries["rows"]
    assert ref["rows"] == len(world.rows)
    assert ref["by_source"] == {"precomputed": world.hits,
                                "edge": len(world.rows) - world.hits}
    assert ref["degraded"] == {"unseen_category": 1, "out_of_range": 1}
    for door, (body, calls) in summaries.items():
        assert sum(body["latency_ms"]["counts"]) == calls, door  # one count per call
        for key in ("rows", "by_source", "degraded", "features", "predictions", "confidence"):
            assert body.get(key) == ref.get(key), (door, key)


@pytest.mark.parametrize("name", ["late", "eta"])
def test_feature_counts_are_the_shared_rule_on_the_encoded_rows(world: World,
                                                                name: str) -> None:
    body, _ = summary_through(world, name, "row")
    rt = EdgeRuntime(world.root, name, telemetry=False)
    assert rt.loaded is not None
    schema = rt.loaded.schema
    profile = Profile.of(rt.loaded.manifest.raw)
    assert profile is not None
    batch = schema.encode(world.rows)
    num = iter(batch.num.T)
    cat = iter(batch.cat.T)
    for feature, col in zip(schema.features, profile.features):
        tally = col.tally(next(num) if feature.kind == NUMERIC else next(cat))
        got = body["features"][feature.name]
        assert got["counts"] == tally.counts.tolist(), feature.name
        assert got["missing"] == tally.missing, feature.name
        assert got.get("unseen", 0) == tally.unseen, feature.name
    assert body["features"]["restaurant"]["unseen"] == 1
    assert body["features"]["distance_km"]["missing"] >= 1
    answers = rt.predict(world.rows)
    if name == "late":
        classes = [str(c) for c in rt.loaded.classes]
        want = profile.predictions.tally([str(p.prediction) for p in answers]).counts
        assert body["predictions"]["counts"] == want.tolist()
        assert profile.confidence is not None
        top = [max(p.probabilities.values()) for p in answers]  # type: ignore[union-attr]
        got_conf = body["confidence"]["counts"]
        assert sum(got_conf) == len(answers)
        # Probabilities are rounded to 6 digits in answers: compare away from the edges.
        edges = profile.confidence.edges
        safe = [t for t in top if np.min(np.abs(edges - t)) > 1e-5]
        assert len(safe) >= len(top) - 2 and classes
    else:
        want = profile.predictions.tally(np.array([p.prediction for p in answers],
                                                  dtype=np.float32)).counts
        assert body["predictions"]["counts"] == want.tolist()
        assert "confidence" not in body


def test_table_hits_count_every_call_and_bin_their_table_row(world: World) -> None:
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry())
    hit = world.rows[0]
    for _ in range(5000):  # past one drain (ring 4096)
        assert rt.predict([hit])[0].source == "precomputed"
    body = rt.telemetry.flush()[0][1]  # type: ignore[union-attr]
    assert body["rows"] == 5000 and body["by_source"] == {"precomputed": 5000}
    assert body["latency_ms"]["counts"][0] == 5000  # hits are not timed: the first bin
    assert all(sum(f["counts"]) + f["missing"] == 5000 for f in body["features"].values())
    assert sum(body["predictions"]["counts"]) == 5000


def test_a_large_batch_counts_every_row_and_bins_a_sample(world: World) -> None:
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry(bin_cells=100))
    rows = (world.rows * 40)[:1000]
    rt.predict(rows)
    body = rt.telemetry.flush()[0][1]  # type: ignore[union-attr]
    assert body["rows"] == 1000 and sum(body["by_source"].values()) == 1000
    assert body["degraded"] == {k: 1000 // len(world.rows) + (1 if i < 1000 % len(world.rows)
                                                                else 0)
                                for k, i in (("unseen_category", 40), ("out_of_range", 41))}
    assert sum(body["latency_ms"]["counts"]) == 1
    binned = sum(body["predictions"]["counts"])
    keep = max(MIN_BIN_ROWS, 100 // len(LATE_FEATURES))  # 100 values of 5 features: 20 rows
    assert keep <= binned < 2 * keep
    hour = body["features"]["hour"]
    assert sum(hour["counts"]) + hour["missing"] == binned


def test_a_window_ends_at_flush_and_the_next_one_starts_empty(world: World) -> None:
    clock = Clock()
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry(clock))
    rt.predict(world.rows[:10])
    clock.now += 3600
    first = rt.telemetry.flush()  # type: ignore[union-attr]
    assert first[0][1]["window"] == {"start": "2027-01-15T08:00:00Z",
                                     "end": "2027-01-15T09:00:00Z"}
    assert first[0][1]["latency_ms"]["edges"] == list(LATENCY_EDGES_MS)
    assert rt.telemetry.flush() == []  # type: ignore[union-attr]  # nothing answered since
    rt.predict(world.rows[:2])
    clock.now += 60
    second = rt.telemetry.flush()[0][1]  # type: ignore[union-attr]
    assert second["rows"] == 2 and second["window"]["start"] == "2027-01-15T09:00:00Z"


def test_a_new_version_is_counted_apart_and_the_old_fast_path_answers_are_kept(
        world: World, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(world.root, store)
    rt = EdgeRuntime(store, "late", telemetry=telemetry())
    for r in world.rows[:5]:
        rt.predict([r])
    manifest = dict(rt.loaded.manifest.raw)  # type: ignore[union-attr]
    manifest["version"] = 2
    LocalStore(store).activate(Manifest.from_json(manifest))
    assert rt.reload() and rt.version == 2
    rt.predict([world.rows[0]])
    records = rt.telemetry.flush()  # type: ignore[union-attr]
    assert [(r[3], r[1]["rows"]) for r in records] == [(1, 5), (2, 1)]


def test_telemetry_is_off_by_argument_or_environment(world: World,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert EdgeRuntime(world.root, "late", telemetry=False).telemetry is None
    monkeypatch.setenv("HYBRIDML_TELEMETRY", "off")
    rt = EdgeRuntime(world.root, "late")
    assert rt.telemetry is None and rt.loaded is not None and rt.loaded.fast is not None
    assert rt.loaded.fast.tap is None
    assert rt.predict([world.rows[0]])[0].prediction_id is not None  # ids work regardless
    monkeypatch.setenv("HYBRIDML_TELEMETRY", "maybe")
    with pytest.raises(Exception, match="HYBRIDML_TELEMETRY"):
        EdgeRuntime(world.root, "late")


def test_raw_rows_are_kept_only_with_sampling_on(world: World) -> None:
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry())
    rt.predict(world.rows)
    assert [r[0] for r in rt.telemetry.flush()] == ["summary"]  # type: ignore[union-attr]
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry(sample=5))
    rt.predict(world.rows)
    for r in world.rows[:20]:
        rt.predict([r])
    records = rt.telemetry.flush()  # type: ignore[union-attr]
    assert [r[0] for r in records] == ["summary", "sample"]
    sample = records[1][1]
    assert sample["features"] == list(rt.loaded.schema.names)  # type: ignore[union-attr]
    assert len(sample["rows"]) == 5 == len(sample["predictions"])
    assert all(p in ("late", "on_time") for p in sample["predictions"])


def test_prediction_ids_name_the_store_and_model_and_never_repeat(world: World) -> None:
    rt = EdgeRuntime(world.root, "late", telemetry=False)
    preds = rt.predict(world.rows) + [rt.predict([r])[0] for r in world.rows[:10]]
    ids = [p.prediction_id for p in preds]
    assert len(set(ids)) == len(ids)
    assert all(i is not None and i.startswith(f"{rt.store_id}:late:") for i in ids)
    assert preds[0].prediction_id == ids[0]  # given once, kept
    assert preds[0].to_json()["prediction_id"] == ids[0]
    other = EdgeRuntime(world.root, "late", telemetry=False)
    assert other.predict([world.rows[0]])[0].prediction_id not in ids  # another run
    bad = rt.predict([dict(world.rows[0], hour="noon")], errors="report")[0]
    assert bad.error is not None and bad.prediction_id is None
    fresh = rt.predict([world.rows[5]])[0]
    copy = pickle.loads(pickle.dumps(fresh))  # the id is fixed before it leaves the process
    assert copy == fresh and copy.prediction_id == fresh.prediction_id is not None


def test_feedback_checks_its_label_and_id_and_carries_the_prediction(
        world: World, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(world.root, store)
    rt = EdgeRuntime(store, "late", telemetry=False)
    p = rt.predict([world.rows[20]])[0]
    rid = rt.feedback(p.prediction_id, "late")
    record = rt.monitor.spool.records([rt.monitor.spool.queue()[0].seq])[0]
    assert record.id == rid and record.kind == "feedback"
    body = record.to_json()["body"]
    assert body["prediction_id"] == p.prediction_id and body["label"] == "late"
    assert (body["prediction"], body["version"]) == (p.prediction, 1)
    with pytest.raises(InputError) as err:
        rt.feedback(p.prediction_id, "early")
    assert err.value.field == "label" and "'late', 'on_time'" in err.value.message
    with pytest.raises(InputError) as err:
        rt.feedback("0123456789:eta:1", "late")
    assert err.value.field == "prediction_id"
    with pytest.raises(InputError) as err:
        rt.feedback(None, "late")
    assert err.value.field == "prediction_id"
    rt.feedback(None, "on_time", features=world.rows[21])
    with pytest.raises(InputError) as err:
        rt.feedback(None, "late", features=dict(world.rows[21], hour="noon"))
    assert err.value.field == "hour"
    eta = EdgeRuntime(store, "eta", telemetry=False)
    q = eta.predict([world.rows[0]])[0]
    eta.feedback(q.prediction_id, 31)
    for label in ("31", True, math.inf):
        with pytest.raises(InputError) as err:
            eta.feedback(q.prediction_id, label)
        assert err.value.field == "label"
    assert rt.monitor.spool.stats()["pending"] == 3


def test_drift_reports_the_current_window_against_the_profile(world: World) -> None:
    rt = EdgeRuntime(world.root, "late", telemetry=telemetry())
    empty = rt.drift()
    assert empty is not None and empty["rows"] == 0
    rt.predict(world.rows)
    report = rt.drift()
    assert report is not None
    assert (report["format"], report["model"], report["version"]) == (1, "late", 1)
    assert report["rows"] == len(world.rows)
    assert [f["name"] for f in report["features"]] == list(rt.loaded.schema.names)  # type: ignore[union-attr]
    assert all(f["status"] == "insufficient" for f in report["features"])  # < 500 rows
    assert rt.drift()["rows"] == len(world.rows)  # type: ignore[index]  # the window goes on
    assert EdgeRuntime(world.root, "late", telemetry=False).drift() is None


# ------------------------------------------------------------------------------- binning
EDGES = np.array([-2.0, -0.5, 0.0, 0.25, 1.0, 3.5], dtype=np.float32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.floats(-5, 5, width=32), st.sampled_from(
    [float(e) for e in EDGES] + [math.nan, -0.0])), min_size=1, max_size=60),
       weights=st.booleans())
def test_bulk_binning_is_bin_index(values: list[float], weights: bool) -> None:
    schema = InputSchema.from_json([{"name": "x", "kind": "numeric"}])
    col = {"kind": "numeric", "edges": EDGES.tolist(),
           "proportions": [1 / 7] * 7, "missing": 0.0}
    profile = Profile.from_json({
        "format": 1, "rows": 10, "features": {"x": col},
        "predictions": {"kind": "numeric", "edges": EDGES.tolist(),
                        "proportions": [1 / 7] * 7, "missing": 0.0},
        "importance": {"x": 1.0}}, schema)
    b = Binner(schema, profile, (), is_clf=False)
    v = np.array(values, dtype=np.float32)
    w = np.arange(1, v.size + 1, dtype=np.float64) if weights else None
    t = b.tally(Rows(v[:, None], np.zeros((v.size, 0), np.int32), None, v, None, w))
    idx = bin_index(EDGES, v)
    ones = np.ones(v.size) if w is None else w
    want = np.bincount(idx[idx >= 0], weights=ones[idx >= 0], minlength=EDGES.size + 1)
    assert t.features[0].tolist() == want.astype(int).tolist()
    assert t.missing[0] == int(ones[idx < 0].sum())
    assert t.predictions is not None and t.predictions.tolist() == want.astype(int).tolist()


def test_a_wide_model_bins_a_share_of_its_fast_path_answers(tmp_path: Path) -> None:
    narrow = InputSchema.from_json([{"name": f"x{i}", "kind": "numeric"} for i in range(16)])
    assert Binner(narrow, None, (), is_clf=False).miss_stride == 1
    reg = Registry(tmp_path / "reg")
    train(reg, "digits", dataset="digits", model="logreg")  # 64 features
    store = LocalStore(tmp_path / "store").ensure()
    manifest = reg.manifest("digits")
    for art in manifest["artifacts"]:
        shutil.copyfile(reg.blob_path(art["sha256"]), store.artifact_path(art["sha256"]))
    store.activate(Manifest.from_json(manifest))
    reg.close()
    # Every row on the fast path: none is out of range for the policy.
    rt = EdgeRuntime(store, "digits", telemetry=telemetry(),
                     policy=FallbackPolicy(on_out_of_range=False))
    assert rt.loaded is not None
    assert rt.telemetry.binner(rt.loaded).miss_stride == 64 // MISS_VALUES  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 17, size=(800, 64)).astype(float).tolist()
    assert all(rt.predict([r])[0].source == "edge" for r in rows)
    body = rt.telemetry.flush()[0][1]  # type: ignore[union-attr]
    assert body["rows"] == 800 and body["by_source"] == {"edge": 800} and not body["degraded"]
    assert sum(body["latency_ms"]["counts"]) == 800  # every answer is timed and counted
    binned = sum(body["predictions"]["counts"])
    assert 800 // 8 < binned < 800 // 2  # about one in four answers binned
    pixel = body["features"]["pixel_0_0"] if "pixel_0_0" in body["features"] else \
        next(iter(body["features"].values()))
    assert sum(pixel["counts"]) + pixel["missing"] == binned
