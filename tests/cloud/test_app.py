"""The API's predict path in-process: answers, request log lines, and promotes seen at once."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest
from flask import Flask, Response
from flask.testing import FlaskClient

from hybridml.cloud import app as app_module
from hybridml.cloud import shedding
from hybridml.cloud.app import create_app
from tests.cloud.conftest import IRIS_ROW as ROW

PREDICT = "/v1/models/iris/predict"


@pytest.fixture
def app(iris_registry: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Flask:
    """The insecure app (no tokens) over a private copy of the registry."""
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    root = tmp_path / "reg"
    shutil.copytree(iris_registry, root)
    return create_app(root)


@pytest.fixture
def client(app: Flask) -> Iterator[FlaskClient]:
    """A test client of ``app``."""
    with app.test_client() as c:
        yield c


def test_predict_answer_is_encoded_as_flask_would(app: Flask, client: FlaskClient) -> None:
    resp = client.post(PREDICT, json={"inputs": [ROW, list(ROW.values())]})
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    answer = resp.get_json()
    assert answer["name"] == "iris" and answer["model_version"] == 1
    assert len(answer["predictions"]) == 2 and set(answer["probabilities"][0]) == \
        set(answer["classes"])
    with app.app_context():
        # flask types json.response() as werkzeug's sansio Response (no .data); it is a
        # flask.Response at run time.
        expected = cast(Response, app.json.response(answer))
        assert resp.data == expected.data  # compact, key order, newline


def test_promote_over_http_is_seen_by_the_next_predict(client: FlaskClient) -> None:
    assert client.post(PREDICT, json={"inputs": [ROW]}).get_json()["model_version"] == 1
    moved = client.post("/v1/models/iris/aliases/stable", json={"version": 2})
    assert moved.status_code == 200
    assert client.post(PREDICT, json={"inputs": [ROW]}).get_json()["model_version"] == 2
    # insecure mode: every write is JSON, an empty body too (a form cannot send one)
    assert client.post("/v1/models/iris/rollback", json={}).status_code == 200
    assert client.post(PREDICT, json={"inputs": [ROW]}).get_json()["model_version"] == 1


def test_query_and_body_versions_still_pick_the_version(client: FlaskClient) -> None:
    assert client.post(PREDICT + "?version=2", json={"inputs": [ROW]}).get_json()[
        "model_version"] == 2
    assert client.post(PREDICT + "?alias=stable", json={"inputs": [ROW]}).get_json()[
        "model_version"] == 1
    assert client.post(PREDICT + "?version=1", json={"inputs": [ROW], "version": 2}
                       ).get_json()["model_version"] == 2  # the body wins
    bad = client.post(PREDICT + "?version=1&alias=stable", json={"inputs": [ROW]})
    assert bad.status_code == 400 and bad.get_json()["error"]["details"]["field"] == "version"


def test_each_request_is_logged_once_at_info(client: FlaskClient,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="hybridml.cloud.app"):
        client.post(PREDICT, json={"inputs": [ROW]})
        client.post(PREDICT, data="{", content_type="application/json")
    lines = [r.getMessage() for r in caplog.records if r.name == "hybridml.cloud.app"]
    assert len(lines) == 2
    assert lines[0].startswith(f"POST {PREDICT} 200 ") and lines[0].endswith("ms")
    assert lines[1].startswith(f"POST {PREDICT} 400 ")


def test_no_request_lines_when_info_is_off(client: FlaskClient,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="hybridml.cloud.app"):
        assert client.post(PREDICT, json={"inputs": [ROW]}).status_code == 200
    assert not [r for r in caplog.records if r.name == "hybridml.cloud.app"]


def test_shedding_lives_in_its_module_and_is_still_importable_from_app() -> None:
    assert app_module.LoadShedder is shedding.LoadShedder
    body, headers = shedding.overloaded(3, 0.25, 2)
    assert json.loads(body)["error"]["code"] == "overloaded"
    assert ("Retry-After", "2") in headers
