"""The cloud HTTP API v1, served by real gunicorn on a loopback port."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import requests

from tests.conftest import CloudServer, start_cloud

IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
            "petal_width_cm": 0.2}


def post(cloud: CloudServer, name: str, body: object,
         headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(f"{cloud.url}/v1/models/{name}/predict", json=body, timeout=10,
                         headers=headers)


def test_healthz_and_model_list(cloud: CloudServer) -> None:
    assert requests.get(cloud.url + "/healthz", timeout=5).json()["status"] == "ok"
    models = {m["name"]: m for m in requests.get(cloud.url + "/v1/models", timeout=5)
              .json()["models"]}
    assert set(models) == {"eta", "iris", "late"}
    assert models["iris"]["aliases"] == {"stable": 1}


def test_manifest_has_etag_and_answers_304_when_unchanged(cloud: CloudServer) -> None:
    r = requests.get(cloud.url + "/v1/models/late/manifest", timeout=5)
    assert r.status_code == 200 and r.headers["ETag"]
    assert {a["role"] for a in r.json()["artifacts"]} == {"model", "model_fp32", "table",
                                                           "explainer"}
    again = requests.get(cloud.url + "/v1/models/late/manifest", timeout=5,
                         headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    v1 = requests.get(cloud.url + "/v1/models/late/manifest?version=1", timeout=5)
    assert v1.json()["version"] == 1


def test_unknown_model_and_version_are_404_json(cloud: CloudServer) -> None:
    r = requests.get(cloud.url + "/v1/models/nope/manifest", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = requests.get(cloud.url + "/v1/models/iris/manifest?version=9", timeout=5)
    assert r.status_code == 404 and "iris" in r.json()["error"]["message"]


def test_artifact_is_immutable_verifiable_and_supports_ranges(cloud: CloudServer) -> None:
    man = requests.get(cloud.url + "/v1/models/late/manifest", timeout=5).json()
    art = next(a for a in man["artifacts"] if a["role"] == "model")
    url = f"{cloud.url}/v1/artifacts/{art['sha256']}"
    full = requests.get(url, timeout=5, headers={"Accept-Encoding": "identity"})
    assert full.status_code == 200 and "immutable" in full.headers["Cache-Control"]
    assert hashlib.sha256(full.content).hexdigest() == art["sha256"]
    assert len(full.content) == art["size"]
    part = requests.get(url, timeout=5, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    tail = requests.get(url, timeout=5, headers={"Range": f"bytes={art['size'] - 10}-"})
    assert tail.content == full.content[-10:]


def test_large_artifacts_are_gzipped_for_clients_that_accept_it(cloud: CloudServer) -> None:
    man = requests.get(cloud.url + "/v1/models/late/manifest", timeout=5).json()
    table = next(a for a in man["artifacts"] if a["role"] == "table")
    raw = requests.get(f"{cloud.url}/v1/artifacts/{table['sha256']}", timeout=5, stream=True,
                       headers={"Accept-Encoding": "gzip"})
    body = raw.raw.read()
    if raw.headers.get("Content-Encoding") == "gzip":
        assert len(body) < table["size"]
        body = gzip.decompress(body)
    assert hashlib.sha256(body).hexdigest() == table["sha256"]


def test_artifact_names_are_checked_against_traversal(cloud: CloudServer) -> None:
    for bad in ["..%2F..%2Fetc%2Fpasswd", "abc", "0" * 63 + "g"]:
        r = requests.get(f"{cloud.url}/v1/artifacts/{bad}", timeout=5)
        assert r.status_code == 404 and r.json()["error"]


def test_predict_by_name_and_by_schema_order(cloud: CloudServer) -> None:
    r = post(cloud, "iris", {"inputs": [IRIS_ROW, list(IRIS_ROW.values())]})
    body = r.json()
    assert r.status_code == 200 and body["model_version"] == 1
    assert body["predictions"] == ["setosa", "setosa"]
    assert abs(sum(body["probabilities"][0].values()) - 1) < 1e-4
    reg = post(cloud, "eta", {"inputs": [{"restaurant": "r001", "hour": 12, "distance_km": 3.0,
                                          "rain": "no", "items": 2}]}).json()
    assert isinstance(reg["predictions"][0], float) and "probabilities" not in reg


def test_predict_rejects_bad_input_with_4xx_json(cloud: CloudServer) -> None:
    bad_row = dict(IRIS_ROW, sepal_width_cm="wide")
    r = post(cloud, "iris", {"inputs": [IRIS_ROW, bad_row]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "bad_input" and err["details"] == {"field": "sepal_width_cm", "row": 1}
    assert post(cloud, "iris", {"inputs": []}).status_code == 400
    assert post(cloud, "iris", {"rows": [IRIS_ROW]}).status_code == 400
    assert post(cloud, "iris", [IRIS_ROW]).status_code == 400
    assert post(cloud, "nope", {"inputs": [IRIS_ROW]}).status_code == 404
    r = requests.post(f"{cloud.url}/v1/models/iris/predict", data="{not json", timeout=5,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_input"
    r = requests.post(f"{cloud.url}/v1/models/iris/predict", data=json.dumps({"inputs": []}),
                      timeout=5, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415


def test_predict_limits_batch_size_and_body_size(cloud: CloudServer) -> None:
    r = post(cloud, "iris", {"inputs": [IRIS_ROW] * 1001})
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
    assert post(cloud, "iris", {"inputs": [IRIS_ROW] * 1000}).status_code == 200
    r = requests.post(f"{cloud.url}/v1/models/iris/predict", timeout=10,
                      data=b'{"inputs": "' + b"x" * (5 * 1024 * 1024) + b'"}',
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]


def test_wrong_method_is_405_json(cloud: CloudServer) -> None:
    r = requests.get(f"{cloud.url}/v1/models/iris/predict", timeout=5)
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_relative_registry_path_serves_artifacts(trained_registry: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry given as a relative path (the default ./registry) still serves files."""
    monkeypatch.chdir(trained_registry.parent)
    server = start_cloud(Path(trained_registry.name))
    try:
        man = requests.get(server.url + "/v1/models/late/manifest", timeout=5).json()
        for art in man["artifacts"]:
            r = requests.get(f"{server.url}/v1/artifacts/{art['sha256']}", timeout=5)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == art["sha256"]
    finally:
        server.stop()
