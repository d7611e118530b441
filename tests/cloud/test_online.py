"""The cloud's /predict in a rollout, through a real Flask app on a real registry: shadowing
the candidate into `shadow` records of device `cloud`, and A/B arms by Hybridml-Unit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hybridml.cloud.app import create_app
from hybridml.cloud.online import Online
from hybridml.cloud.registry import Registry
from hybridml.cloud.rollouts import Rollouts
from tests.cloud.conftest import IRIS_ROW
from tests.cloud.rolloutkit import with_candidates

ROWS = [IRIS_ROW, {**IRIS_ROW, "petal_length_cm": 4.5, "petal_width_cm": 1.5},
        {**IRIS_ROW, "petal_length_cm": 6.0, "petal_width_cm": 2.3}, IRIS_ROW]


@pytest.fixture
def reg(iris_copy: Path) -> Registry:
    """iris: v1 stable, v2 not blessed, v3 and v4 blessed (copies of v2), and v5: v1's model
    again, blessed."""
    r = with_candidates(iris_copy)
    manifest, metadata = r.manifest("iris", 1), r.metadata("iris", 1)
    r.create_version("iris", {**manifest, "gate": {"blessed": True, "against": 1,
                                                    "reason": "test"}}, metadata, parent=1)
    return r


@pytest.fixture
def app(reg: Registry, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The insecure API (no tokens) over ``reg`` (the Registry object the test changes)."""
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    return create_app(reg)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    """A test client of ``app``."""
    with app.test_client() as c:
        yield c


def online(app: Flask) -> Online:
    """The app's rollout side of /predict."""
    found = app.extensions["hybridml"]["online"]
    assert isinstance(found, Online)
    return found


def predict(client: FlaskClient, unit: str | None = None, **body: Any) -> Any:
    """POST /predict; the response."""
    headers = {} if unit is None else {"Hybridml-Unit": unit}
    return client.post("/v1/models/iris/predict", json={"inputs": ROWS, **body},
                       headers=headers)


def shadowed(app: Flask, reg: Registry, candidate: int) -> dict[str, Any]:
    """Run a shadow rollout of ``candidate`` over 5 predict calls; its cloud record."""
    Rollouts(reg).start("iris", "shadow", candidate=candidate, actor="test",
                        config={"sample": 1.0})
    with app.test_client() as c:
        for _ in range(5):
            assert predict(c).status_code == 200
    o = online(app)
    assert o.shadow.drain(20)
    assert o.shadow.flush()
    [record] = app.extensions["hybridml"]["telemetry"].events("iris", "shadow")
    return dict(record)


def test_cloud_predict_shadows_an_identical_candidate_with_full_agreement(
        app: Flask, reg: Registry) -> None:
    record = shadowed(app, reg, 5)
    assert record["device"] == "cloud" and record["id"].startswith("cloud-")
    assert (record["served"], record["shadow"], record["role"]) == (1, 5, "shadow")
    assert record["calls"] == 5 and record["sampled"] == 5 and record["skipped"] == 0
    assert record["rows"] == 5 * len(ROWS) and record["agree"] == record["rows"]
    assert record["prob_diff"]["counts"][0] == record["rows"]  # all below 0.001
    assert sum(record["latency_ms"]["counts"]) == 5


def test_cloud_predict_shadows_a_different_candidate_and_sees_the_difference(
        app: Flask, reg: Registry) -> None:
    record = shadowed(app, reg, 3)
    assert record["rows"] == 5 * len(ROWS)
    assert record["prob_diff"]["counts"][0] < record["rows"]  # probabilities differ


def test_the_answer_is_unchanged_while_a_rollout_shadows(app: Flask, reg: Registry,
                                                         client: FlaskClient) -> None:
    before = predict(client).data
    Rollouts(reg).start("iris", "shadow", candidate=3, actor="test")
    assert predict(client).data == before
    assert b'"arm"' not in before


def test_ab_units_get_a_stable_arm_and_its_version(app: Flask, reg: Registry,
                                                   client: FlaskClient) -> None:
    plain = predict(client).data
    Rollouts(reg).start("iris", "ab", arms=[1, 3], actor="test")
    seen: dict[str, int] = {}
    for i in range(40):
        first = predict(client, unit=f"user-{i}").get_json()
        again = predict(client, unit=f"user-{i}").get_json()
        assert first["arm"] == again["arm"]
        assert first["model_version"] == {"A": 1, "B": 3}[first["arm"]]
        seen[first["arm"]] = seen.get(first["arm"], 0) + 1
    assert set(seen) == {"A", "B"}
    assert predict(client).data == plain  # no header: stable, as before
    explicit = predict(client, unit="user-1", version=3).get_json()
    assert "arm" not in explicit and explicit["model_version"] == 3


def test_a_bad_unit_header_is_a_400_naming_it(reg: Registry, client: FlaskClient) -> None:
    Rollouts(reg).start("iris", "ab", arms=[1, 3], actor="test")
    resp = predict(client, unit="x" * 65)
    assert resp.status_code == 400
    error = json.loads(resp.data)["error"]
    assert error["details"]["field"] == "Hybridml-Unit"
