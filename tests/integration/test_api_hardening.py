"""Bad input at the cloud API: every case answers a 4xx JSON error naming the field, never 5xx.

The matrix below is the contract (input -> status, code, field); it runs against a real
gunicorn server. Range handling follows RFC 9110 §14.2: a malformed Range is ignored (200,
whole artifact), a well-formed range past the end is 416 with ``Content-Range: bytes */size``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from hybridml.cloud.config import ServeConfig
from hybridml.cloud.shedding import LoadShedder
from hybridml.shared.errors import ConfigError
from tests.conftest import CloudServer

IRIS = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
        "petal_width_cm": 0.2}
LATE = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}
JSON = {"Content-Type": "application/json"}
PREDICT = "/v1/models/iris/predict"


def iris_body(**cells: str) -> bytes:
    """An iris body whose cells are raw JSON text (so NaN and 10**400 literals survive)."""
    row = {k: json.dumps(v) for k, v in IRIS.items()} | cells
    return ('{"inputs": [{' + ", ".join(f'"{k}": {v}' for k, v in row.items()) + "}]}").encode()


@dataclass
class Case:
    """One bad request and the answer it must get."""

    id: str
    status: int
    code: str
    field: str | None  # details.field, or None when the error has no field
    needle: str  # a word the message must contain (the field, or what to fix)
    path: str = PREDICT
    method: str = "POST"
    body: Any = None  # JSON-encoded unless bytes
    # dataclasses.field, spelled out: the `field` attribute above shadows the bare name.
    headers: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JSON))
    row: int | None = None


MATRIX = [
    # --- rows: shape, names, types --------------------------------------------------------
    Case("too few values in a list row", 400, "bad_input", None, "petal_width_cm",
         body={"inputs": [[5.1, 3.5, 1.4]]}, row=0),
    Case("too many values in a list row", 400, "bad_input", None, "takes 4",
         body={"inputs": [IRIS, [5.1, 3.5, 1.4, 0.2, 9.9]]}, row=1),
    Case("missing column", 400, "bad_input", "petal_width_cm", "petal_width_cm",
         body={"inputs": [{k: v for k, v in IRIS.items() if k != "petal_width_cm"}]}, row=0),
    Case("unknown column", 400, "bad_input", "colour", "colour",
         body={"inputs": [IRIS | {"colour": "red"}]}, row=0),
    Case("unicode column name", 400, "bad_input", "pétale_长度", "pétale_长度",
         body={"inputs": [IRIS | {"pétale_长度": 1.0}]}, row=0),
    Case("string in numeric column", 400, "bad_input", "sepal_width_cm", "sepal_width_cm",
         body={"inputs": [IRIS, IRIS | {"sepal_width_cm": "wide"}]}, row=1),
    Case("numeric text is not a number", 400, "bad_input", "sepal_width_cm", "number",
         body={"inputs": [IRIS | {"sepal_width_cm": "3.5"}]}, row=0),
    Case("bool in numeric column", 400, "bad_input", "sepal_length_cm", "number",
         body={"inputs": [IRIS | {"sepal_length_cm": True}]}, row=0),
    Case("list nested in numeric column", 400, "bad_input", "petal_length_cm",
         "petal_length_cm", body={"inputs": [IRIS | {"petal_length_cm": [1.4]}]}, row=0),
    Case("object nested in numeric column", 400, "bad_input", "petal_length_cm",
         "petal_length_cm", body={"inputs": [IRIS | {"petal_length_cm": {"v": 1}}]}, row=0),
    Case("number in categorical column", 400, "bad_input", "rain", "string",
         path="/v1/models/late/predict", body={"inputs": [LATE | {"rain": 1}]}, row=0),
    Case("list in categorical column", 400, "bad_input", "restaurant", "restaurant",
         path="/v1/models/late/predict", body={"inputs": [LATE | {"restaurant": ["r001"]}]},
         row=0),
    Case("row is a number", 400, "bad_input", None, "row 0", body={"inputs": [5]}, row=0),
    Case("row is a string", 400, "bad_input", None, "object by column name",
         body={"inputs": [IRIS, "sepal"]}, row=1),
    Case("row is null", 400, "bad_input", None, "row 0", body={"inputs": [None]}, row=0),
    Case("rows nested one level too deep", 400, "bad_input", None, "row 0",
         body={"inputs": [[list(IRIS.values())]]}, row=0),
    # --- NaN, infinities, huge numbers -----------------------------------------------------
    Case("NaN literal", 400, "bad_input", "sepal_length_cm", "null",
         body=iris_body(sepal_length_cm="NaN"), row=0),
    Case("Infinity literal", 400, "bad_input", "sepal_width_cm", "Infinity",
         body=iris_body(sepal_width_cm="Infinity"), row=0),
    Case("-Infinity literal", 400, "bad_input", "petal_width_cm", "not JSON",
         body=iris_body(petal_width_cm="-Infinity"), row=0),
    Case("NaN literal in categorical column", 400, "bad_input", "rain", "null",
         path="/v1/models/late/predict",
         body=b'{"inputs": [{"restaurant": "r001", "hour": 12, "distance_km": 3.0, '
              b'"rain": NaN, "items": 2}]}', row=0),
    Case("1e400 overflows to infinity", 400, "bad_input", "sepal_length_cm", "finite",
         body=iris_body(sepal_length_cm="1e400"), row=0),
    Case("float past float32", 400, "bad_input", "sepal_length_cm", "float32",
         body=iris_body(sepal_length_cm="1e39"), row=0),
    Case("integer 10**400", 400, "bad_input", "petal_length_cm", "finite",
         body=iris_body(petal_length_cm="1" + "0" * 400), row=0),
    Case("integer of 5000 digits", 400, "bad_input", "body", "digits",
         body=iris_body(petal_length_cm="7" * 5000)),
    # --- body structure ----------------------------------------------------------------------
    Case("no inputs key", 400, "bad_input", "inputs", "inputs", body={}),
    Case("inputs is an object", 400, "bad_input", "inputs", "list", body={"inputs": IRIS}),
    Case("inputs is empty", 400, "bad_input", "inputs", "non-empty", body={"inputs": []}),
    Case("unknown body key", 400, "bad_input", "input", "'input'",
         body={"inputs": [IRIS], "input": [IRIS]}),
    Case("body is a list", 400, "bad_input", "body", "object", body=[IRIS]),
    Case("body is null", 400, "bad_input", "body", "object", body=b"null"),
    Case("body is a bare NaN", 400, "bad_input", "body", "object", body=b"NaN"),
    Case("malformed JSON", 400, "bad_input", "body", "line 1 column", body=b'{"inputs": [1,'),
    Case("empty body", 400, "bad_input", "body", "JSON", body=b""),
    Case("trailing garbage", 400, "bad_input", "body", "Extra data",
         body=json.dumps({"inputs": [IRIS]}).encode() + b" }"),
    Case("invalid UTF-8", 400, "bad_input", "body", "UTF-8", body=b'{"inputs": ["\xff\xfe"]}'),
    Case("nested 100000 deep", 400, "bad_input", "body", "deeply",
         body=b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    Case("nested 500 deep", 400, "bad_input", None, "row 0",
         body=b'{"inputs": [' + b"[" * 500 + b"]" * 500 + b"]}", row=0),
    Case("body over max_body_bytes", 413, "request_entity_too_large", "body", "bytes",
         body=b'{"inputs": "' + b"x" * (4 * 1024 * 1024 + 1) + b'"}'),
    Case("more rows than max_batch", 413, "batch_too_large", "inputs", "1000",
         body={"inputs": [IRIS] * 1001}),
    # --- content type ------------------------------------------------------------------------
    Case("text/plain body", 415, "unsupported_media_type", "Content-Type", "Content-Type",
         body={"inputs": [IRIS]}, headers={"Content-Type": "text/plain"}),
    Case("form-encoded body", 415, "unsupported_media_type", "Content-Type", "application/json",
         body=b"inputs=1", headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("no content type", 415, "unsupported_media_type", "Content-Type", "Content-Type",
         body=b'{"inputs": []}', headers={}),
    # --- model name, version, query parameters ---------------------------------------------
    Case("unknown model", 404, "not_found", "name", "'nope'",
         path="/v1/models/nope/predict", body={"inputs": [IRIS]}),
    Case("model name with unicode", 404, "not_found", "name", "invalid model name",
         path="/v1/models/%C3%BCber/predict", body={"inputs": [IRIS]}),
    Case("model name with a NUL byte", 404, "not_found", "name", "invalid model name",
         path="/v1/models/ir%00is/predict", body={"inputs": [IRIS]}),
    Case("model name of 300 characters", 404, "not_found", "name", "1-64",
         path="/v1/models/" + "a" * 300 + "/predict", body={"inputs": [IRIS]}),
    Case("model name '..'", 404, "not_found", "name", "invalid model name",
         path="/v1/models/%2E%2E/predict", body={"inputs": [IRIS]}),
    Case("model name with encoded slashes", 404, "not_found", None, "not found",
         path="/v1/models/..%2F..%2Fetc%2Fpasswd/predict", body={"inputs": [IRIS]}),
    Case("version is a float", 400, "bad_input", "version", "version",
         body={"inputs": [IRIS], "version": 1.5}),
    Case("version is negative", 400, "bad_input", "version", "version",
         body={"inputs": [IRIS], "version": -1}),
    Case("version is true", 400, "bad_input", "version", "version",
         body={"inputs": [IRIS], "version": True}),
    Case("version is a path", 400, "bad_input", "version", "alias",
         body={"inputs": [IRIS], "version": "../../registry.db"}),
    Case("version is huge", 400, "bad_input", "version", "version",
         body={"inputs": [IRIS], "version": 10**30}),
    Case("version that does not exist", 404, "not_found", "ref", "iris",
         body={"inputs": [IRIS], "version": 99}),
    Case("?version= not a number or alias", 400, "bad_input", "version", "version",
         path=PREDICT + "?version=-3", body={"inputs": [IRIS]}),
    Case("?version= empty", 400, "bad_input", "version", "version",
         path="/v1/models/iris/manifest?version=", method="GET"),
    Case("?version= twice", 400, "bad_input", "version", "once",
         path="/v1/models/iris/manifest?version=1&version=2", method="GET"),
    Case("?version= and ?alias= together", 400, "bad_input", "version", "not both",
         path="/v1/models/iris/manifest?version=1&alias=stable", method="GET"),
    Case("?alias= with a path", 400, "bad_input", "alias", "alias",
         path="/v1/models/iris/manifest?alias=..%2Fkeys", method="GET"),
    Case("?alias= of 3000 characters", 400, "bad_input", "alias", "alias",
         path="/v1/models/iris/manifest?alias=" + "a" * 3000, method="GET"),
    Case("?alias= unknown", 404, "not_found", "ref", "canary",
         path="/v1/models/iris/manifest?alias=canary", method="GET"),
    # --- artifacts, methods, routes ----------------------------------------------------------
    Case("artifact name with traversal", 404, "not_found", None, "not found",
         path="/v1/artifacts/..%2F..%2Fregistry.db", method="GET"),
    Case("artifact name not hex", 404, "not_found", "sha256", "sha256",
         path="/v1/artifacts/" + "0" * 63 + "g", method="GET"),
    Case("artifact name in upper case", 404, "not_found", "sha256", "lowercase",
         path="/v1/artifacts/" + "A" * 64, method="GET"),
    Case("artifact that does not exist", 404, "not_found", "sha256", "no blob",
         path="/v1/artifacts/" + "0" * 64, method="GET"),
    Case("GET on predict", 405, "method_not_allowed", "method", "method", method="GET"),
    Case("DELETE on an artifact", 405, "method_not_allowed", "method", "method",
         path="/v1/artifacts/" + "0" * 64, method="DELETE"),
    Case("unknown route", 404, "not_found", None, "not found", path="/v2/predict",
         method="GET"),
]


def send(cloud: CloudServer, case: Case) -> requests.Response:
    """Send one matrix case."""
    data = case.body if isinstance(case.body, bytes) or case.body is None \
        else json.dumps(case.body).encode()
    return requests.request(case.method, cloud.url + case.path, data=data,
                            headers=case.headers, timeout=30)


@pytest.mark.parametrize("case", MATRIX, ids=[c.id for c in MATRIX])
def test_bad_request_answers_4xx_json_naming_the_field(cloud: CloudServer, case: Case) -> None:
    r = send(cloud, case)
    assert r.status_code == case.status, r.text[:300]
    assert r.headers["Content-Type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == case.code
    assert case.needle.lower() in err["message"].lower(), err["message"]
    details = err.get("details", {})
    assert details.get("field") == case.field
    if case.row is not None:
        assert details["row"] == case.row
    assert len(err["message"]) <= 600  # bad values are not echoed back at length


def test_null_means_missing_in_numeric_and_categorical_columns(cloud: CloudServer) -> None:
    r = requests.post(cloud.url + "/v1/models/late/predict", timeout=10, json={
        "inputs": [LATE | {"distance_km": None, "rain": None}]})
    assert r.status_code == 200 and r.json()["predictions"][0] in ("late", "on_time")


def test_version_by_body_and_query_and_unknown_query_params_are_ignored(
        cloud: CloudServer) -> None:
    for path, body in [(PREDICT, {"inputs": [IRIS], "version": 1}),
                       (PREDICT + "?version=1", {"inputs": [IRIS]}),
                       (PREDICT + "?alias=stable&device=pi-7&x=%00", {"inputs": [IRIS]})]:
        r = requests.post(cloud.url + path, json=body, timeout=10)
        assert r.status_code == 200 and r.json()["model_version"] == 1


def test_huge_value_in_an_error_is_clipped(cloud: CloudServer) -> None:
    r = requests.post(cloud.url + PREDICT, timeout=10, json={
        "inputs": [IRIS | {"sepal_length_cm": "x" * 1_000_000}]})
    assert r.status_code == 400 and len(r.content) < 1000
    assert r.json()["error"]["details"]["field"] == "sepal_length_cm"


def test_chunked_body_over_the_limit_is_413(cloud: CloudServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(80):
            yield b"x" * 65536
        yield b'"}'

    r = requests.post(cloud.url + PREDICT, data=chunks(), headers=JSON, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["details"]["field"] == "body"


def test_405_keeps_the_allow_header(cloud: CloudServer) -> None:
    r = requests.put(cloud.url + PREDICT, timeout=5)
    assert r.status_code == 405 and "POST" in r.headers["Allow"]


@pytest.fixture(scope="module")
def model_artifact(cloud: CloudServer) -> tuple[str, bytes]:
    """URL and bytes of iris's model artifact."""
    man = requests.get(cloud.url + "/v1/models/iris/manifest", timeout=5).json()
    art = next(a for a in man["artifacts"] if a["role"] == "model")
    url = f"{cloud.url}/v1/artifacts/{art['sha256']}"
    data = requests.get(url, timeout=5, headers={"Accept-Encoding": "identity"}).content
    assert len(data) == art["size"]
    return url, data


@pytest.mark.parametrize("header", [
    "bytes=abc", "bytes=5-2", "bytes=-", "items=0-5", "bytes 0-5", "bytes=0-0,5-6",
    "bytes=" + ",".join(["0-1"] * 500), "bytes=--1", "bytes=1-2-3", "bytes=\u0661-2",
])
def test_malformed_range_is_ignored_and_the_whole_artifact_served(
        model_artifact: tuple[str, bytes], header: str) -> None:
    url, data = model_artifact
    r = requests.get(url, timeout=5, headers={"Range": header.encode("utf-8").decode("latin-1"),
                                              "Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.content == data


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-9", 0, 10), ("bytes=10-", 10, None), ("bytes=-10", -10, None),
    ("bytes=5-99999999999999999999999", 5, None), ("bytes=-99999999999999999999", 0, None),
    ("BYTES = 3 - 4", 3, 5),
])
def test_valid_ranges_are_206_and_clamped_to_the_artifact(
        model_artifact: tuple[str, bytes], header: str, start: int, end: int | None) -> None:
    url, data = model_artifact
    r = requests.get(url, timeout=5, headers={"Range": header, "Accept-Encoding": "identity"})
    assert r.status_code == 206 and r.content == data[start:end]
    first = start % len(data)
    assert r.headers["Content-Range"].startswith(f"bytes {first}-")


@pytest.mark.parametrize("header", ["bytes=99999-", "bytes=-0", "bytes=" + "9" * 5000 + "-"])
def test_range_past_the_end_is_416_json_with_content_range(
        model_artifact: tuple[str, bytes], header: str) -> None:
    url, data = model_artifact
    r = requests.get(url, timeout=5, headers={"Range": header})
    assert r.status_code == 416
    assert r.headers["Content-Range"] == f"bytes */{len(data)}"
    err = r.json()["error"]
    assert err["code"] == "range_not_satisfiable" and err["details"]["field"] == "Range"


def test_serve_config_reads_shedding_settings_from_env() -> None:
    cfg = ServeConfig.from_env({"HYBRIDML_MAX_PENDING": "8", "HYBRIDML_MAX_QUEUE_MS": "100",
                                "HYBRIDML_RETRY_AFTER_S": "3", "HYBRIDML_THREADS": "2"})
    assert (cfg.max_pending, cfg.max_queue_ms, cfg.retry_after_s, cfg.threads) == (8, 100, 3, 2)
    with pytest.raises(ConfigError) as err:
        ServeConfig.from_env({"HYBRIDML_MAX_PENDING": "lots"})
    assert err.value.details["field"] == "max_pending"
    with pytest.raises(ConfigError):
        ServeConfig(threads=0)


def test_shedder_answers_503_with_retry_after_past_max_pending_in_flight() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.set()
        release.wait(10)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"done"]

    shedder = LoadShedder(slow_app, ServeConfig(max_pending=1, retry_after_s=2))
    answers: list[str] = []

    def call(path: str) -> None:
        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            answers.append(f"{path} {status} {dict(headers).get('Retry-After')}")
        body = b"".join(shedder({"PATH_INFO": path}, start_response))
        if path == "/v1/models/iris/predict" and answers[-1].split()[1] == "503":
            assert json.loads(body)["error"]["code"] == "overloaded"

    first = threading.Thread(target=call, args=(PREDICT,))
    first.start()
    assert entered.wait(10)
    call(PREDICT)  # the one slot is taken: shed at once
    assert answers == [f"{PREDICT} 503 SERVICE UNAVAILABLE 2"]
    health = threading.Thread(target=call, args=("/healthz",))  # never shed
    health.start()
    release.set()
    first.join(10)
    health.join(10)
    assert sorted(answers[1:]) == ["/healthz 200 OK None", f"{PREDICT} 200 OK None"]
    call(PREDICT)  # the slot is free again
    assert answers[-1] == f"{PREDICT} 200 OK None" and shedder.log.count == 1
