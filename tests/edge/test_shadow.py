"""Shadowing the rollout companion (docs/rollouts.md §4): the served answer never changes,
sampled calls are compared on a worker, and the window's comparison lands in the spool.

Stores are built without the cloud's rollout route: two registry versions are installed
(``tests.edgekit.install``), the companion is written with ``LocalStore.set_companion`` and the
served manifest gets a rollout block per §3 before it is activated.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.companion import Companion
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.shadow import ABS_EDGES, PROB_EDGES
from hybridml.edge.spool import Spool
from hybridml.edge.store import LocalStore
from hybridml.edge.window import LATENCY_EDGES_MS
from hybridml.shared.manifest import DELIVERY_KEYS, Manifest
from tests.conftest import write_orders_csv
from tests.edgekit import install

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3], [5.8, 2.7, 5.1, 1.9],
        [4.9, 3.0, 1.4, 0.2], [6.0, 2.2, 4.0, 1.0], [6.5, 3.0, 5.2, 2.0], [5.5, 2.4, 3.8, 1.1],
        [6.3, 2.5, 4.9, 1.5], [5.9, 3.2, 4.8, 1.8], [6.1, 2.8, 4.7, 1.2], [6.7, 3.0, 5.0, 1.7]]
NAMES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
ETA = ["restaurant", "hour", "distance_km", "rain", "items"]


# ------------------------------------------------------------------------------ helpers
def block_for(served: Manifest, companion: Manifest, role: str, *, sample: float = 1.0,
              rid: int = 7) -> dict[str, Any]:
    """The §3 rollout block of a device with ``role``, serving ``served``."""
    canary = role == "canary"
    return {"format": 1, "id": rid,
            "strategy": {"shadow": "shadow", "canary": "canary", "interleave": "interleave",
                         "arm": "ab"}[role],
            "role": role, "arm": "candidate",
            "stable": companion.version if canary else served.version,
            "candidate": served.version if canary else companion.version,
            "serve": served.version, "step": 0 if canary else None,
            "percent": 5 if canary else None, "sample": sample, "forced": False,
            "companion": {k: v for k, v in companion.raw.items() if k not in DELIVERY_KEYS}}


def with_rollout(store: LocalStore, served: Manifest, companion: Manifest | None, role: str,
                 *, sample: float = 1.0, rid: int = 7) -> Manifest:
    """Write ``companion`` to the store and activate ``served`` with a rollout block."""
    raw = dict(served.raw)
    if companion is not None:
        raw["rollout"] = block_for(served, companion, role, sample=sample, rid=rid)
    manifest = Manifest.from_json(raw)
    store.set_companion(served.name, companion)
    store.activate(manifest)
    return manifest


def renumbered(m: Manifest, version: int) -> Manifest:
    """The same model under another version number (an identical companion)."""
    return Manifest.from_json({**m.raw, "version": version})


def make_store(registry: Path, name: str, root: Path) -> tuple[LocalStore, list[Manifest]]:
    """A store holding v1 and v2 of ``name`` (v2 active)."""
    reg = Registry(registry)
    store = LocalStore(root)
    versions = [install(reg, name, store, v) for v in (1, 2)]
    reg.close()
    return store, versions


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1/v2 (multiclass, different fits), eta v1/v2 (regression, different data),
    late v1/v2 (binary, different data)."""
    root = tmp_path_factory.mktemp("rollouts")
    reg = Registry(root / "reg")
    train(reg, "iris", dataset="iris", model="logreg", seed=0)
    train(reg, "iris", dataset="iris", model="logreg", seed=3, params={"C": 0.05})
    for seed in (0, 1):
        orders = write_orders_csv(root / f"orders{seed}.csv", seed=seed)
        train(reg, "eta", data=orders, target="delivery_minutes", model="logreg",
              drop=["late"])
        train(reg, "late", data=orders, target="late", model="logreg",
              drop=["delivery_minutes"], params={"C": 0.01 if seed else 1.0})
    reg.close()
    return root / "reg"


def spooled(rt: EdgeRuntime, kind: str) -> list[dict[str, Any]]:
    """Bodies of the ``kind`` records in the runtime's spool."""
    spool = Spool.open(rt.store.root)
    try:
        entries = [e for e in spool.queue() if e.kind == kind]
        return [json.loads(r.body) for r in spool.records([e.seq for e in entries])]
    finally:
        spool.close()


def one(rt: EdgeRuntime) -> dict[str, Any]:
    assert rt.shadow.drain(10)
    window = rt.shadow.snapshot()
    assert len(window) == 1, window
    return window[0]


# -------------------------------------------------------------------------------- tests
def test_an_identical_companion_agrees_on_every_row(registry: Path, tmp_path: Path) -> None:
    store, (v1, _v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v1, renumbered(v1, 9), "shadow")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    assert rt.rollout is not None and rt.rollout.plan is not None
    rt.predict(ROWS)
    got = one(rt)
    assert (got["rows"], got["agree"], got["errors"]) == (len(ROWS), len(ROWS), 0)
    assert got["prob_diff"]["counts"] == [len(ROWS)] + [0] * len(PROB_EDGES)
    assert got["abs_diff"] is None
    assert (got["served"], got["shadow"], got["role"], got["rollout"]) == (1, 9, "shadow", 7)


def test_a_different_companion_disagrees_as_running_both_says(registry: Path,
                                                             tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    rt.predict(ROWS)
    got = one(rt)
    # the same comparison, made directly with both models
    from hybridml.edge.session import ModelSession

    batch = v2.schema.encode(ROWS)
    outs = [ModelSession(store.artifact_path(m.artifact("model").sha256),  # type: ignore[union-attr]
                         m.schema, m.task).run(batch) for m in (v2, v1)]
    names = [[str(m.classes[i]) for i in o.labels] for m, o in zip((v2, v1), outs)]  # type: ignore[index, union-attr]
    agree = sum(a == b for a, b in zip(*names))
    assert v1.classes == v2.classes  # so the probability columns line up as they are
    diff = np.abs(outs[0].probabilities - outs[1].probabilities).max(axis=1)  # type: ignore[operator]
    bins = np.bincount(np.searchsorted(PROB_EDGES, diff, "right"), minlength=len(PROB_EDGES) + 1)
    assert got["agree"] == agree
    assert got["prob_diff"]["counts"] == bins.tolist()
    assert sum(bins[1:]) > 0, "the two versions answer alike: the test proves nothing"
    assert (got["served"], got["shadow"], got["role"]) == (2, 1, "canary")
    assert sum(got["latency_ms"]["counts"]) == 1
    assert got["latency_ms"]["edges"] == list(LATENCY_EDGES_MS)


def _answers(rt: EdgeRuntime) -> list[Any]:
    """What every door answers (one row on the fast path, rows, text, arrays)."""
    columns = {n: [repr(r[j]) for r in ROWS] for j, n in enumerate(NAMES)}
    out: list[Any] = []
    for r in ROWS:
        p = rt.predict([r])[0]
        out.append((p.prediction, p.probabilities, p.source, p.model_version))
    out += [(p.prediction, p.probabilities, p.source) for p in rt.predict(ROWS)]
    out += [(p.prediction, p.probabilities, p.source) for p in rt.predict_text(columns)]
    arrays = rt.predict_arrays(num=np.array(ROWS, dtype=np.float32))
    out += [arrays.labels.tolist(), arrays.probabilities.tolist()]  # type: ignore[union-attr]
    return out


@pytest.mark.parametrize("telemetry", [False, True])
def test_served_answers_are_the_same_with_and_without_shadow(
        registry: Path, tmp_path: Path, telemetry: bool) -> None:
    plain_store, (_, v2) = make_store(registry, "iris", tmp_path / "plain")
    plain = EdgeRuntime(plain_store, "iris", telemetry=telemetry)
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "shadowed")
    with_rollout(store, v2, v1, "canary")
    shadowed = EdgeRuntime(store, "iris", telemetry=telemetry)
    assert shadowed.loaded is not None and shadowed.loaded.fast is not None
    assert _answers(shadowed) == _answers(plain)
    got = one(shadowed)
    # every door was shadowed: len(ROWS) fast-path calls, then rows, text and arrays
    calls = len(ROWS) + 3
    assert (got["calls"], got["sampled"], got["skipped"]) == (calls, calls, 0)
    assert got["rows"] == 4 * len(ROWS) and got["errors"] == 0
    assert got["prob_diff"]["counts"][0] < got["rows"]  # the companion answered differently


def test_a_quarter_of_calls_are_sampled_at_sample_025(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary", sample=0.25)
    rt = EdgeRuntime(store, "iris", telemetry=False)
    for i in range(100):
        rt.predict([ROWS[i % len(ROWS)]])
    for _ in range(20):
        rt.predict(ROWS[:2])
    got = one(rt)
    assert (got["calls"], got["sampled"], got["rows"]) == (120, 30, 25 + 5 * 2)


class _Stuck:
    """A companion session that waits for ``go`` before each run."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.go = threading.Event()
        self.entered = threading.Event()  # the worker holds a batch and waits

    def run(self, batch: Any) -> Any:
        self.entered.set()
        assert self.go.wait(30)
        return self.inner.run(batch)


def test_a_full_queue_drops_and_counts_never_blocks(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    plan = rt.rollout.plan  # type: ignore[union-attr]
    assert plan is not None
    stuck = _Stuck(plan.companion.session)
    plan.companion = Companion(plan.companion.manifest, stuck)  # type: ignore[arg-type]
    done = threading.Event()
    rt.predict(ROWS[:2])  # the worker takes it and gets stuck: nothing more leaves the queue
    assert stuck.entered.wait(20)

    def calls() -> None:
        for _ in range(99):
            rt.predict(ROWS[:2])
        done.set()

    t = threading.Thread(target=calls, daemon=True)
    t0 = time.monotonic()
    t.start()
    assert done.wait(20), "a predict call waited for the shadow worker"
    took = time.monotonic() - t0
    stuck.go.set()
    got = one(rt)
    # the worker holds the first batch and the queue 64 more; the other 35 were dropped and
    # counted (the worker is stuck before the calls, so the count does not race it)
    assert (got["calls"], got["sampled"]) == (100, 100)
    assert got["skipped"] == 100 - 1 - 64
    assert got["rows"] == (100 - got["skipped"]) * 2
    assert took < 10


def test_a_shadow_record_lands_in_the_spool_at_flush(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary", sample=0.5)
    rt = EdgeRuntime(store, "iris", telemetry=True)
    for r in ROWS:
        rt.predict([r])
    rt.flush()
    bodies = spooled(rt, "shadow")
    assert len(bodies) == 1
    body = bodies[0]
    assert set(body) == {"format", "model", "rollout", "role", "served", "shadow", "task",
                         "window", "calls", "sampled", "skipped", "rows", "errors", "agree",
                         "prob_diff", "abs_diff", "latency_ms"}
    assert (body["format"], body["model"], body["rollout"], body["role"], body["served"],
            body["shadow"], body["task"]) == (1, "iris", 7, "canary", 2, 1, "multiclass")
    assert (body["calls"], body["sampled"], body["rows"]) == (len(ROWS), len(ROWS) // 2,
                                                             len(ROWS) // 2)
    assert set(body["window"]) == {"start", "end"}
    assert len(spooled(rt, "summary")) == 1  # with the window's telemetry
    # the counters start again: the next window has nothing to say
    rt.flush()
    assert len(spooled(rt, "shadow")) == 1


def test_shadow_records_are_written_with_telemetry_off(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    rt.predict(ROWS)
    rt.flush()
    assert [b["rows"] for b in spooled(rt, "shadow")] == [len(ROWS)]


def test_regression_counts_absolute_differences(registry: Path, tmp_path: Path) -> None:
    store, (e1, e2) = make_store(registry, "eta", tmp_path / "s")
    with_rollout(store, e1, e2, "shadow")
    rt = EdgeRuntime(store, "eta", telemetry=False)
    rows = [{"restaurant": f"r00{i % 5}", "hour": 8 + i, "distance_km": 0.5 + i / 2,
             "rain": "yes" if i % 2 else "no", "items": 1 + i % 6} for i in range(12)]
    served = [p.prediction for p in rt.predict(rows)]
    got = one(rt)
    from hybridml.edge.session import ModelSession

    m2 = e2.artifact("model")
    assert m2 is not None
    other = ModelSession(store.artifact_path(m2.sha256), e2.schema, e2.task).run(
        e2.schema.encode(rows)).values
    diff = np.abs(np.array(served, dtype=np.float64) - other.astype(np.float64))  # type: ignore[union-attr]
    rmse = e1.raw["metrics"]["edge_test"]["rmse"]  # shadow: the served version is stable
    assert got["task"] == "regression" and got["prob_diff"] is None
    assert got["rows"] == len(rows)
    assert got["agree"] == int((diff <= 0.1 * rmse).sum())
    bins = np.bincount(np.searchsorted(ABS_EDGES, diff, "right"), minlength=len(ABS_EDGES) + 1)
    assert got["abs_diff"]["counts"] == bins.tolist()
    assert got["abs_diff"]["sum"] == pytest.approx(diff.sum(), rel=1e-5)
    assert got["abs_diff"]["max"] == pytest.approx(diff.max(), rel=1e-5)


def test_a_companion_with_other_columns_is_not_shadowed(registry: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    fewer = dict(v1.raw)
    fewer["schema"] = [dict(f, name=f"x{i}") for i, f in enumerate(v1.raw["schema"])]
    with_rollout(store, v2, Manifest.from_json({**fewer, "version": 5}), "canary")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    assert rt.rollout is not None and rt.rollout.companion is not None
    assert rt.rollout.plan is None and rt.shadow.disabled == 1
    assert "not shadowing" in caplog.text
    rt.predict(ROWS)
    assert rt.shadow.snapshot() == []


def test_no_companion_in_the_store_serves_alone(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary")
    store.set_companion("iris", None)  # a sync that could not verify it removed it
    rt = EdgeRuntime(store, "iris", telemetry=False)
    assert rt.rollout is not None and rt.rollout.companion is None
    assert len(rt.predict(ROWS)) == len(ROWS)
    # the companion arrives later: a reload picks it up without a new served manifest
    store.set_companion("iris", v1)
    rt.reload()
    assert rt.rollout is not None and rt.rollout.companion is not None
    assert rt.rollout.plan is not None


def test_a_new_table_keeps_the_rollout(registry: Path, tmp_path: Path) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    with_rollout(store, v2, v1, "canary")
    rt = EdgeRuntime(store, "iris", telemetry=False)
    rt.table = None  # a new snapshot of the same version
    assert rt.rollout is not None and rt.rollout.served is rt.loaded
    rt.predict(ROWS)
    rt.predict(ROWS)
    assert one(rt)["calls"] == 2
