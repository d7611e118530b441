"""The one fallback component against a real cloud app: chunks, 4xx versus failures, payloads.

The cloud is the real Flask app (``tests.edgekit.ThreadCloud``) with a batch limit of 3 rows,
on a loopback port; the edge store holds iris. Rows past the training range are flagged, so
each test controls exactly which rows go to the cloud.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.config import ServeConfig
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.fallback import Fallback, FallbackPolicy
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import InputError
from hybridml.shared.schema import Feature, InputSchema
from tests.edgekit import ThreadCloud, install

IN = [5.1, 3.5, 1.4, 0.2]
OUT = [50.0, 3.5, 1.4, 0.2]  # sepal length far past anything iris holds
POLICY = FallbackPolicy(timeout_ms=5000, failures=1, cooldown_s=3600)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with iris (logreg)."""
    root = tmp_path_factory.mktemp("fallback_cloud") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg")
    reg.close()
    return root


@pytest.fixture
def store(registry: Path, tmp_path: Path) -> LocalStore:
    """An edge store with iris active."""
    store = LocalStore(tmp_path / "store")
    reg = Registry(registry)
    install(reg, "iris", store)
    reg.close()
    return store


@pytest.fixture(scope="module")
def small_cloud(registry: Path) -> Iterator[ThreadCloud]:
    """The cloud app with a batch limit of 3 rows."""
    cloud = ThreadCloud(registry, ServeConfig(max_batch=3))
    yield cloud
    cloud.close()


def runtime(store: LocalStore, cloud: ThreadCloud, **policy: object) -> EdgeRuntime:
    cloud.requests.clear()
    return EdgeRuntime(store, "iris", cloud.url, token=cloud.token,
                       policy=FallbackPolicy(**{**POLICY.__dict__, **policy}))


def test_flagged_rows_go_in_chunks_no_larger_than_the_batch_limit(
        store: LocalStore, small_cloud: ThreadCloud) -> None:
    rt = runtime(store, small_cloud, max_batch=3)
    answers = rt.predict([OUT] * 10)
    assert [p.source for p in answers] == ["cloud"] * 10
    assert all(p.reason == "out_of_range" and not p.degraded for p in answers)
    assert small_cloud.rows() == [3, 3, 3, 1] and set(small_cloud.statuses()) == {200}
    assert rt.breaker.state == "closed" and rt.cloud_failures == 0


def test_a_413_shrinks_the_chunks_and_never_opens_the_breaker(
        store: LocalStore, small_cloud: ThreadCloud) -> None:
    rt = runtime(store, small_cloud)  # the edge thinks 1,000 rows fit; the cloud takes 3
    rows = [OUT, IN] * 4 + [OUT] * 4  # 8 flagged rows among 12
    answers = rt.predict(rows)
    assert [p.source for p in answers] == ["cloud" if r is OUT else "edge" for r in rows]
    assert small_cloud.statuses() == [413, 200, 200, 200]
    assert small_cloud.rows() == [8, 3, 3, 2]
    assert rt.breaker.state == "closed" and rt.cloud_failures == 0
    assert rt.fallback.max_batch == 3  # learnt: the next call starts at the cloud's limit
    small_cloud.requests.clear()
    rt.predict([OUT] * 4)
    assert small_cloud.rows() == [3, 1]


def test_the_same_for_arrays(store: LocalStore, small_cloud: ThreadCloud) -> None:
    rt = runtime(store, small_cloud)
    got = rt.predict_arrays(num=np.array([OUT] * 7 + [IN], dtype=np.float32))
    assert list(got.source) == ["cloud"] * 7 + ["edge"]
    assert not got.degraded.any() and rt.breaker.state == "closed"
    assert small_cloud.statuses() == [413, 200, 200, 200]


def test_a_4xx_keeps_the_local_answers_and_the_breaker_closed(
        tmp_path: Path, small_cloud: ThreadCloud) -> None:
    # The device has a model the cloud does not know (404): the cloud is up, it cannot help.
    other = Registry(tmp_path / "other")
    train(other, "lily", dataset="iris", model="logreg")
    store = LocalStore(tmp_path / "store")
    install(other, "lily", store)
    other.close()
    rt = EdgeRuntime(store, "lily", small_cloud.url, token=small_cloud.token, policy=POLICY)
    small_cloud.requests.clear()
    answers = rt.predict([OUT, IN, OUT])
    assert [(p.source, p.degraded) for p in answers] == \
        [("edge", True), ("edge", False), ("edge", True)]
    assert rt.breaker.state == "closed" and rt.cloud_failures == 0
    assert rt.last_cloud_error is not None and rt.last_cloud_error.startswith("not_found")
    rt.predict([OUT])  # and the next call asks again: nothing was marked down
    assert len(small_cloud.requests) == 2


def test_a_refused_token_is_a_4xx_not_a_dead_cloud(store: LocalStore,
                                                   small_cloud: ThreadCloud) -> None:
    rt = EdgeRuntime(store, "iris", small_cloud.url, token="hml_not_a_token", policy=POLICY)
    small_cloud.requests.clear()
    answers = rt.predict([OUT, OUT])
    assert [(p.source, p.degraded, p.reason) for p in answers] == \
        [("edge", True, "out_of_range")] * 2
    assert rt.breaker.state == "closed" and rt.cloud_failures == 0
    assert rt.last_cloud_error is not None and rt.last_cloud_error.startswith("unauthorized")


def test_rows_go_to_the_cloud_as_the_local_model_saw_them(
        store: LocalStore, small_cloud: ThreadCloud) -> None:
    # numpy scalars and padded values are what a caller may send; the cloud gets plain JSON
    # numbers (the float32 values) and answers like it answers the plain row.
    rt = runtime(store, small_cloud, max_batch=3)
    odd = [np.float32(50.0), np.int64(3), np.float64(1.4), None]
    plain = [50.0, 3.0, 1.4, None]
    a, b = rt.predict([odd, plain])
    assert a.source == b.source == "cloud"
    assert (a.prediction, a.probabilities) == (b.prediction, b.probabilities)


def test_reasons_follow_the_policy_in_priority_order() -> None:
    schema = InputSchema((Feature("x", "numeric", 0.0, 1.0),
                          Feature("c", "categorical", categories=("a", "b"))))
    batch = schema.encode([[0.5, "a"], [5.0, "a"], [0.5, "z"], [5.0, "z"], [0.5, "b"]])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.5, 0.5], [0.55, 0.45]],
                     dtype=np.float32)
    codes = Fallback("m", FallbackPolicy(min_confidence=0.7)).reasons(batch, probs)
    assert codes.tolist() == [0, 1, 2, 1, 3]
    only_conf = Fallback("m", FallbackPolicy(min_confidence=0.7, on_out_of_range=False,
                                             on_unseen=False))
    assert only_conf.reasons(batch, probs).tolist() == [0, 3, 3, 3, 3]
    off = Fallback("m", FallbackPolicy(enabled=False, min_confidence=0.7))
    assert off.reasons(batch, probs).tolist() == [0] * 5
    assert off.reasons(batch, probs, local_failed=True).tolist() == [4] * 5


def test_without_a_local_model_a_row_json_cannot_carry_is_an_input_error(
        tmp_path: Path, small_cloud: ThreadCloud) -> None:
    rt = EdgeRuntime(tmp_path / "empty", "iris", small_cloud.url, token=small_cloud.token,
                     policy=POLICY)
    with pytest.raises(InputError) as err:
        rt.predict([[b"5.1", 3.5, 1.4, 0.2]])
    assert err.value.details["field"] == "inputs"
    # A row JSON can carry is the cloud's to judge: its own error comes back, typed.
    with pytest.raises(InputError) as err:
        rt.predict([[True, 3.5, 1.4, 0.2]])
    assert err.value.details["field"] == "sepal_length_cm"
    assert [p.source for p in rt.predict([IN])] == ["cloud"]
