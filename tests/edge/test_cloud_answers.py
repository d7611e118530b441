"""A fallback answer is used only if it is an answer of the device's own model version.

The device holds iris v1 while the cloud's stable version is v2. Rows past the training range
go to the cloud. A hostile loopback server answers them with malformed or forged JSON: every
such answer leaves the local prediction (``source="edge"``, degraded) and counts as a failed
cloud call, never an exception out of ``predict``. The real cloud app answers them with v1,
the version the device asked for. Without a local model a refused answer is the error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.answers import AnswerCheck
from hybridml.edge.bodies import BodyLimits
from hybridml.edge.fallback import FallbackPolicy
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import RemoteError
from hybridml.shared.manifest import Manifest
from tests.edge.hostile import GZIP, Answer, HostileServer, gzip_zeros
from tests.edgekit import ThreadCloud, install

IN = [5.1, 3.5, 1.4, 0.2]
OUT = [50.0, 3.5, 1.4, 0.2]  # sepal length far past anything iris holds: asks the cloud
CLASSES = ["setosa", "versicolor", "virginica"]
POLICY = FallbackPolicy(timeout_ms=5000, failures=1, cooldown_s=3600)
PREDICT = "/v1/models/iris/predict"


def genuine(n: int = 1, version: int = 1, **change: Any) -> dict[str, Any]:
    """An answer shaped as the cloud gives it for ``n`` rows of iris v``version``."""
    answer: dict[str, Any] = {
        "name": "iris", "model_version": version, "predictions": ["virginica"] * n,
        "probabilities": [{"setosa": 0.0, "versicolor": 0.25, "virginica": 0.75}] * n,
        "classes": CLASSES}
    answer.update(change)
    return answer


def probs(**values: Any) -> list[dict[str, Any]]:
    row: dict[str, Any] = {"setosa": 0.1, "versicolor": 0.2, "virginica": 0.7}
    row.update(values)
    return [{k: v for k, v in row.items() if v != "drop"}]


FORGED: dict[str, Any] = {
    "no predictions": {"predictions": []},
    "a bare number": 5,
    "a list": [["virginica"]],
    "two predictions for one row": genuine(predictions=["setosa", "setosa"]),
    "pwned, v999": {"predictions": ["pwned"], "model_version": 999},
    "an unknown label": genuine(predictions=["pwned"]),
    "a label of another JSON type": genuine(predictions=[2]),
    "a label inside a list": genuine(predictions=[["virginica"]]),
    "a probability over 1": genuine(probabilities=probs(virginica=1.5)),
    "a negative probability": genuine(probabilities=probs(setosa=-0.1)),
    "a probability as text": genuine(probabilities=probs(setosa="0.1")),
    "a probability as a bool": genuine(probabilities=probs(setosa=True)),
    "a class missing from the probabilities": genuine(probabilities=probs(setosa="drop")),
    "an extra class in the probabilities": genuine(probabilities=probs(daisy=0.0)),
    "probabilities for two rows": genuine(probabilities=probs() * 2),
    "probabilities not a list": genuine(probabilities={"setosa": 1.0}),
    "another model's name": genuine(name="other"),
    "no name": {k: v for k, v in genuine().items() if k != "name"},
    "the other rollout arm's version": genuine(version=2),
    "a bool version": genuine(model_version=True),
    "version zero": genuine(model_version=0),
    "a version as text": genuine(model_version="1"),
    "no version": {k: v for k, v in genuine().items() if k != "model_version"},
}
RAW: dict[str, bytes] = {
    "not JSON": b"<html>hello</html>",
    "a NaN literal": json.dumps(genuine()).replace("0.25", "NaN").encode(),
    "nested too deeply": b"[" * 20_000 + b"]" * 20_000,
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 (logreg) and v2 (a random forest), stable at v2."""
    root = tmp_path_factory.mktemp("answers") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg")
    train(reg, "iris", dataset="iris", model="rf", params={"n_estimators": 5})
    reg.set_alias("iris", "stable", 2)
    reg.close()
    return root


@pytest.fixture
def store(registry: Path, tmp_path: Path) -> LocalStore:
    """An edge store on iris v1."""
    store = LocalStore(tmp_path / "store")
    reg = Registry(registry)
    install(reg, "iris", store, version=1)
    reg.close()
    return store


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    """A server whose predict answer each test sets."""
    with HostileServer() as s:
        yield s


def answering(server: HostileServer, body: Any, **kw: Any) -> str:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    server.routes[PREDICT] = Answer(200, raw, {"Content-Type": "application/json"}, **kw)
    return server.url


@pytest.mark.parametrize("case", [*FORGED, *RAW])
def test_a_malformed_or_forged_answer_leaves_the_degraded_local_answer(
        store: LocalStore, hostile: HostileServer, case: str) -> None:
    rt = EdgeRuntime(store, "iris", answering(hostile, RAW.get(case, FORGED.get(case))),
                     policy=POLICY)
    local = EdgeRuntime(store, "iris", policy=FallbackPolicy(enabled=False)).predict([OUT])[0]
    pred = rt.predict([OUT, IN])
    assert [(p.source, p.degraded, p.reason) for p in pred] == \
        [("edge", True, "out_of_range"), ("edge", False, None)]
    assert (pred[0].prediction, pred[0].model_version) == (local.prediction, 1)
    assert pred[0].probabilities == local.probabilities
    assert rt.cloud_failures == 1 and rt.breaker.state == "open"
    assert rt.last_cloud_error


def test_a_refused_answer_degrades_the_columnar_path_the_same_way(
        store: LocalStore, hostile: HostileServer) -> None:
    rt = EdgeRuntime(store, "iris", answering(hostile, FORGED["pwned, v999"]), policy=POLICY)
    got = rt.predict_arrays(num=np.array([OUT, IN], dtype=np.float32))
    assert list(got.source) == ["edge", "edge"] and list(got.degraded) == [True, False]
    assert got.model_version == 1 and rt.cloud_failures == 1


def test_a_gzip_bomb_answer_degrades_like_any_bad_answer(
        store: LocalStore, hostile: HostileServer) -> None:
    hostile.routes[PREDICT] = Answer(200, gzip_zeros(64 << 20), GZIP)
    rt = EdgeRuntime(store, "iris", hostile.url, policy=POLICY)
    pred = rt.predict([OUT])[0]
    assert (pred.source, pred.degraded) == ("edge", True)
    assert rt.cloud_failures == 1 and "grew past its bound" in (rt.last_cloud_error or "")


def test_a_well_formed_answer_is_used_and_the_device_asks_for_its_own_version(
        store: LocalStore, hostile: HostileServer) -> None:
    rt = EdgeRuntime(store, "iris", answering(hostile, genuine(2)), policy=POLICY)
    pred = rt.predict([OUT, IN, OUT])
    assert [p.source for p in pred] == ["cloud", "edge", "cloud"]
    assert pred[0].prediction == "virginica" and pred[0].model_version == 1
    assert pred[0].probabilities == {"setosa": 0.0, "versicolor": 0.25, "virginica": 0.75}
    sent = json.loads(hostile.requests_to(PREDICT)[-1].body)
    assert sent["version"] == 1 and len(sent["inputs"]) == 2
    assert rt.cloud_failures == 0 and rt.breaker.state == "closed"


def test_the_real_cloud_answers_with_the_version_the_device_holds(
        store: LocalStore, registry: Path) -> None:
    cloud = ThreadCloud(registry)
    try:
        rt = EdgeRuntime(store, "iris", cloud.url, token=cloud.token, policy=POLICY)
        pred = rt.predict([OUT])[0]
        assert (pred.source, pred.model_version) == ("cloud", 1)  # stable is v2
        assert rt.cloud_failures == 0
    finally:
        cloud.close()


# -------------------------------------------------------------------- no local model
def test_without_a_local_model_a_forged_answer_is_the_error(
        tmp_path: Path, hostile: HostileServer) -> None:
    for body in (FORGED["pwned, v999"], genuine(predictions=["pwned"]),
                 genuine(model_version=True), {"predictions": ["setosa"], "name": "iris",
                                               "model_version": 1}):
        rt = EdgeRuntime(tmp_path / "empty", "iris", answering(hostile, body), policy=POLICY)
        with pytest.raises(RemoteError) as err:
            rt.predict([IN])
        assert err.value.code == "remote"
        assert rt.cloud_failures == 1 and rt.breaker.state == "open"


def test_without_a_local_model_any_version_the_cloud_checks_against_itself_is_taken(
        tmp_path: Path, hostile: HostileServer) -> None:
    rt = EdgeRuntime(tmp_path / "empty", "iris", answering(hostile, genuine(version=7)),
                     policy=POLICY)
    pred = rt.predict([IN])[0]
    assert (pred.source, pred.prediction, pred.model_version) == ("cloud", "virginica", 7)
    assert "version" not in json.loads(hostile.requests_to(PREDICT)[-1].body)


# -------------------------------------------------------------------------- the rules
def test_regression_answers_are_numbers_or_null() -> None:
    check = AnswerCheck("eta", 3, "regression")
    ok = {"name": "eta", "model_version": 3, "predictions": [1.5, None, 7]}
    assert [r.prediction for r in check.rows(ok, 3)] == [1.5, None, 7]
    for bad in ("1.5", True, [1.0], {"v": 1}, 1e999):
        with pytest.raises(RemoteError, match="a number or null"):
            check.rows(dict(ok, predictions=[bad, None, 7]), 3)
    with pytest.raises(RemoteError, match="probabilities for a regression"):
        check.rows(dict(ok, probabilities=[{}, {}, {}]), 3)


def test_labels_compare_as_json_values() -> None:
    check = AnswerCheck("m", 1, "binary", [0, 1])
    answer = {"name": "m", "model_version": 1, "probabilities": [{"0": 0.5, "1": 0.5}]}
    assert check.rows(dict(answer, predictions=[1]), 1)[0].prediction == 1
    for bad in ("1", True, 1.0, None):
        with pytest.raises(RemoteError, match="not one of the model's classes"):
            check.rows(dict(answer, predictions=[bad]), 1)


def test_the_answer_bound_holds_a_genuine_answer_with_the_longest_numbers(
        registry: Path) -> None:
    reg = Registry(registry)
    manifest = Manifest.from_json(reg.manifest("iris", 1))
    reg.close()
    check = AnswerCheck.of(manifest)
    longest = 2.2250738585072014e-308
    for n in (1, 1000):
        answer = genuine(n, predictions=["versicolor"] * n,
                         probabilities=[dict.fromkeys(CLASSES, longest)] * n)
        text = json.dumps(answer, indent=1)  # roomier than the cloud's compact JSON
        assert len(text) <= check.max_bytes(n, BodyLimits())
        assert check.rows(json.loads(text), n)[0].prediction == "versicolor"
    assert check.max_bytes(1000, BodyLimits()) < 1000 * BodyLimits().row_bytes
