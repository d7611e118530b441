"""One loaded version: a prediction never mixes two versions, while versions change under it.

Two iris versions trained on different splits answer every test row differently, and each has
a precomputed table holding half the rows. Threads predict through every door (one row on the
fast path, a batch, arrays) while the main thread syncs from the cloud (real HTTP), activates
and reloads, and rolls back, over and over. Every answer must be exactly what its own
``model_version`` answers for that row: a prediction that took one version's model and
another's table or manifest would not be.
"""

from __future__ import annotations

import csv
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.precompute import precompute
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import InputError
from hybridml.shared.manifest import Manifest
from tests.edgekit import ThreadCloud, install

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.2, 2.9, 4.3, 1.3], [7.7, 3.0, 6.1, 2.3], [5.8, 2.7, 5.1, 1.9],
        [4.9, 3.0, 1.4, 0.2], [6.0, 2.2, 4.0, 1.0], [6.5, 3.0, 5.2, 2.0], [5.5, 2.4, 3.8, 1.1]]
NAMES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
TOL = 1e-5  # a table holds the model's outputs computed in another batch shape


def _attach_table(reg: Registry, version: int, log: Path) -> None:
    manifest = reg.manifest("iris", version)
    model = next(a for a in manifest["artifacts"] if a["role"] == "model")
    out = log.with_suffix(f".v{version}.table")
    precompute(reg.blob_path(model["sha256"]).read_bytes(), model["sha256"],
               Manifest.from_json(manifest).schema, "multiclass", log, top=50, out_path=out)
    sha, size = reg.put_blob(out)
    reg.attach_artifact("iris", version, {"role": "table", "sha256": sha, "size": size,
                                          "media_type": "application/x-hybridml-table"})


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, list[Manifest]]:
    """A store holding iris v1 and v2 (v2 active), each with a table of half the rows; the
    registry is beside the store (``<store>/../reg``)."""
    root = tmp_path_factory.mktemp("one_version")
    reg = Registry(root / "reg")
    train(reg, "iris", dataset="iris", model="logreg", seed=0)
    train(reg, "iris", dataset="iris", model="logreg", seed=3, params={"C": 0.2})
    log = root / "log.csv"
    with open(log, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(NAMES)
        w.writerows(ROWS[::2])
    for v in (1, 2):
        _attach_table(reg, v, log)
    store = LocalStore(root / "store")
    manifests = [install(reg, "iris", store, v) for v in (1, 2)]
    reg.close()
    return store, manifests


def _key(p: Any) -> tuple[Any, ...]:
    return p.model_version, p.prediction, tuple(sorted((p.probabilities or {}).items()))


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    pa, pb = dict(a[2]), dict(b[2])
    return a[:2] == b[:2] and pa.keys() == pb.keys() and \
        all(abs(pa[k] - pb[k]) <= TOL for k in pa)


@pytest.fixture(scope="module")
def cloud(versions: tuple[LocalStore, list[Manifest]]) -> Iterator[ThreadCloud]:
    """The cloud app over the registry, for syncs."""
    server = ThreadCloud(versions[0].root.parent / "reg")
    yield server
    server.close()


def test_every_answer_is_the_whole_answer_of_one_version(
        versions: tuple[LocalStore, list[Manifest]], cloud: ThreadCloud) -> None:
    store, manifests = versions
    registry = store.root.parent / "reg"
    expected: dict[int, list[tuple[Any, ...]]] = {}
    for m in manifests:
        store.activate(m)
        rt = EdgeRuntime(store, "iris")
        assert rt.version == m.version
        expected[m.version] = [_key(rt.predict([r, r])[0]) for r in ROWS]
    for a, b in zip(expected[1], expected[2]):  # the test can only see mixing if they differ
        assert not _same(a[:1] + b[1:], a), "the two versions answer a row alike"

    rt = EdgeRuntime(cloud.trust(store.root), "iris", cloud.url, token=cloud.token)
    stop = threading.Event()
    seen: list[tuple[int, tuple[Any, ...]]] = []
    errors: list[BaseException] = []

    def one_row() -> None:
        while not stop.is_set():
            for i, r in enumerate(ROWS):
                seen.append((i, _key(rt.predict([r])[0])))

    def batch() -> None:
        while not stop.is_set():
            for i, p in enumerate(rt.predict(ROWS)):
                seen.append((i, _key(p)))

    def arrays() -> None:
        num = np.array(ROWS, dtype=np.float32)
        while not stop.is_set():
            b = rt.predict_arrays(num=num)
            for i in range(len(ROWS)):
                probs = {str(c): round(float(p), 6) for c, p in zip(b.classes,
                                                                     b.probabilities[i])}
                seen.append((i, (b.model_version, b.predictions[i],
                                 tuple(sorted(probs.items())))))

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # reported by the main thread below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guarded(f)) for f in (one_row, batch, arrays)]
    for t in threads:
        t.start()
    swaps = 0
    try:
        for k in range(60):
            if k % 3 == 0:  # a sync to the version the cloud now calls stable
                reg = Registry(registry)
                reg.set_alias("iris", "stable", 1 + (k // 3) % 2)
                reg.close()
                rt.sync()
            elif k % 3 == 1:  # another process activated a version: reload it
                store.activate(manifests[k % 2])
                rt.reload()
            else:
                rt.rollback()
            swaps += 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[0]
    versions_seen = {key[0] for _, key in seen}
    assert versions_seen == {1, 2}, f"only {versions_seen} answered in {swaps} swaps"
    wrong = [(i, key) for i, key in seen if not _same(key, expected[key[0]][i])]
    assert not wrong, f"{len(wrong)} of {len(seen)} answers mix versions, e.g. {wrong[0]}"


def test_every_door_passes_the_one_observer_hook(
        versions: tuple[LocalStore, list[Manifest]]) -> None:
    store, manifests = versions
    store.activate(manifests[1])
    seen: list[Any] = []
    rt = EdgeRuntime(store, "iris", observers=[seen.append])
    columns = {n: [repr(r[j]) for r in ROWS[:2]] for j, n in enumerate(NAMES)}
    calls = {"row": lambda: rt.predict([ROWS[0]]),
             "rows": lambda: rt.predict(ROWS[:2]),
             "text": lambda: rt.predict_text(columns),
             "arrays": lambda: rt.predict_arrays(num=np.array(ROWS[:2], dtype=np.float32))}
    for route, call in calls.items():
        seen.clear()
        answer = call()
        assert len(seen) == 1, route
        obs = seen[0]
        assert (obs.route, obs.model_version, obs.predictions) == (route, 2, answer)
        assert obs.inputs is not None
        want = rt.loaded.schema.encode(ROWS[:len(obs)])  # type: ignore[union-attr]
        assert np.array_equal(obs.inputs.num, want.num), route
    # A call that refuses its input answers nothing, so nothing is observed.
    seen.clear()
    with pytest.raises(InputError):
        rt.predict([[True, 1, 1, 1]])
    assert seen == []
