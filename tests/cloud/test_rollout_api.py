"""The rollout admin API: admin tokens only, strict bodies, 4xx JSON for every bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from hybridml.cloud.app import create_app
from hybridml.cloud.auth import AuditLog
from hybridml.cloud.registry import Registry
from hybridml.cloud.tokens import TokenStore
from tests.cloud.rolloutkit import with_candidates

BASE = "/v1/models/iris"


@pytest.fixture
def tokens(iris_copy: Path) -> dict[str, str]:
    store = TokenStore(iris_copy)
    return {"admin": store.create("admin", "ops")[1],
            "device": store.create("device", "dev-001")[1]}


@pytest.fixture
def app(iris_copy: Path, tokens: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Flask:
    monkeypatch.delenv("HYBRIDML_INSECURE", raising=False)
    with_candidates(iris_copy).close()
    return create_app(iris_copy)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    with app.test_client() as c:
        yield c


@pytest.fixture
def admin(tokens: dict[str, str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['admin']}"}


def test_a_rollout_is_started_listed_shown_and_promoted_by_an_admin(
        client: FlaskClient, admin: dict[str, str], iris_copy: Path) -> None:
    resp = client.post(f"{BASE}/rollouts", headers=admin, json={
        "strategy": "canary", "candidate": 3, "config": {"steps": [10, 100]},
        "reason": "weekly"})
    assert resp.status_code == 201, resp.get_json()
    rollout = resp.get_json()["rollout"]
    assert rollout["state"] == "running" and rollout["config"]["steps"] == [10, 100]
    listed = client.get(f"{BASE}/rollouts", headers=admin).get_json()["rollouts"]
    assert [r["id"] for r in listed] == [rollout["id"]]
    client.get(f"{BASE}/manifest", headers=admin)  # the admin token is a unit too
    status = client.get(f"{BASE}/rollout", headers=admin)
    assert status.status_code == 200, status.get_json()
    body = status.get_json()
    assert set(body) == {"rollout", "analysis", "events", "cohorts"}
    assert body["events"][0]["actor"] == "token:ops" and body["events"][0]["reason"] == "weekly"
    assert sum(body["cohorts"].values()) == 1
    assert body["analysis"] is None or "action" in body["analysis"]
    refused = client.post(f"{BASE}/rollout/promote", headers=admin, json={})
    assert refused.status_code == 409 and "force" in refused.get_json()["error"]["message"]
    done = client.post(f"{BASE}/rollout/promote", headers=admin,
                       json={"force": True, "reason": "ship it"})
    assert done.status_code == 200 and done.get_json()["rollout"]["state"] == "promoted"
    assert Registry(iris_copy).resolve("iris", "stable") == 3
    assert AuditLog(iris_copy).entries("iris")[-1]["by"] == "token:ops"
    again = client.post(f"{BASE}/rollout/abort", headers=admin, json={})
    assert again.status_code == 404 and again.get_json()["error"]["code"] == "not_found"


def test_abort_over_http(client: FlaskClient, admin: dict[str, str]) -> None:
    client.post(f"{BASE}/rollouts", headers=admin, json={"strategy": "shadow", "candidate": 3})
    resp = client.post(f"{BASE}/rollout/abort", headers=admin, json={"reason": "latency"})
    assert resp.status_code == 200 and resp.get_json()["rollout"]["state"] == "aborted"
    shown = client.get(f"{BASE}/rollout", headers=admin).get_json()
    assert shown["analysis"] is None and shown["events"][-1]["action"] == "abort"


def test_device_tokens_and_anonymous_callers_are_refused(
        client: FlaskClient, tokens: dict[str, str]) -> None:
    device = {"Authorization": f"Bearer {tokens['device']}"}
    for method, path in (("post", "/rollouts"), ("get", "/rollouts"), ("get", "/rollout"),
                         ("post", "/rollout/promote"), ("post", "/rollout/abort")):
        resp = getattr(client, method)(BASE + path, headers=device, json={})
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "forbidden"
        anon = getattr(client, method)(BASE + path, json={})
        assert anon.status_code == 401


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"strategy": "canary", "candidate": 3, "colour": "red"}, 400, "colour"),
    ({"candidate": 3}, 400, "strategy"),
    ({"strategy": 7, "candidate": 3}, 400, "strategy"),
    ({"strategy": "canary", "candidate": 3, "force": "yes"}, 400, "force"),
    ({"strategy": "canary", "candidate": [3]}, 400, "candidate"),
    ({"strategy": "canary", "candidate": 3, "config": {"steps": [50, 20, 100]}}, 400,
     "config.steps"),
    ({"strategy": "canary", "candidate": 3, "config": {"sample": 10**400}}, 400,
     "config.sample"),
    ({"strategy": "canary", "candidate": 3, "config": []}, 400, "config"),
    ({"strategy": "ab", "arms": "1,3"}, 400, "arms"),
    ({"strategy": "ab", "arms": [1, True]}, 400, "arms"),
    ({"strategy": "canary", "candidate": 1}, 409, "candidate"),
    ({"strategy": "canary", "candidate": 2}, 409, "candidate"),  # not blessed
    ({"strategy": "canary", "candidate": 99}, 404, "ref"),
    ({"strategy": "canary", "candidate": 3, "reason": 5}, 400, "reason"),
])
def test_bad_start_bodies_are_4xx_json_naming_the_field(
        client: FlaskClient, admin: dict[str, str], body: dict[str, object], status: int,
        field: str) -> None:
    resp = client.post(f"{BASE}/rollouts", headers=admin, json=body)
    assert resp.status_code == status, resp.get_json()
    assert resp.get_json()["error"]["details"]["field"] == field


def test_malformed_bodies_and_unknown_models_are_4xx(client: FlaskClient,
                                                     admin: dict[str, str]) -> None:
    for data in ("{", "[1]", "NaN", '{"strategy": NaN}'):
        resp = client.post(f"{BASE}/rollouts", headers=admin, data=data,
                           content_type="application/json")
        assert 400 <= resp.status_code < 500, (data, resp.get_json())
    assert client.get("/v1/models/ghost/rollout", headers=admin).status_code == 404
    assert client.get("/v1/models/ghost/rollouts", headers=admin).status_code == 404
    none = client.get(f"{BASE}/rollout", headers=admin)
    assert none.status_code == 404 and "no rollout" in none.get_json()["error"]["message"]
    assert client.post(f"{BASE}/rollout/promote", headers=admin,
                       json={"version": [3]}).status_code == 400
    assert client.post(f"{BASE}/rollout/abort", headers=admin,
                       json={"force": True}).status_code == 400
    client.post(f"{BASE}/rollouts", headers=admin, json={"strategy": "shadow", "candidate": 3})
    second = client.post(f"{BASE}/rollouts", headers=admin,
                         json={"strategy": "canary", "candidate": 4})
    assert second.status_code == 409 and "shadow" in second.get_json()["error"]["message"]
