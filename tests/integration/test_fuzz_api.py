"""Fuzz the real API with hypothesis: bodies, raw bytes, paths, query strings and headers.

Whatever arrives, the server answers below 500 (4xx errors as JSON when the app answers; a
few malformed HTTP requests are refused by gunicorn itself, with a 4xx too) and stays up.
The last test checks the process is alive and healthy and prints how many inputs were tried.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CloudServer, start_cloud

COLUMNS = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm",
           "restaurant", "hour", "distance_km", "rain", "items"]
MODELS = ["iris", "late", "eta"]
FUZZ = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: Counter[str] = Counter()  # "status 400", "bad inputs", ... across this module

# Annotated so mypy sees the category literal hypothesis expects, not a plain str.
SURROGATES: tuple[Literal["Cs"]] = ("Cs",)
text = st.text(st.characters(blacklist_categories=SURROGATES), max_size=12)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-10**420, 10**420)
           | st.floats() | text | st.sampled_from(["r001", "no", "yes", "", "NaN", "1e400"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(text, inner, max_size=4), max_leaves=12)
cells = st.one_of(scalars, values)
rows = st.one_of(
    st.dictionaries(st.sampled_from(COLUMNS) | text, cells, max_size=7),
    st.lists(cells, max_size=7),
    values,
)


@st.composite
def predict_bodies(draw: st.DrawFn) -> bytes:
    """A predict body: mostly well-shaped, with bad cells, keys, versions and literals."""
    body: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        body["inputs"] = draw(st.lists(rows, max_size=5) | values)
    if draw(st.booleans()):
        body["version"] = draw(st.sampled_from([1, 2, "stable", "latest"]) | values)
    if not draw(st.integers(0, 5)):
        body[draw(text)] = draw(values)
    # allow_nan: Python writes NaN/Infinity literals, which the API must refuse as non-JSON
    return json.dumps(body if draw(st.integers(0, 9)) else draw(values)).encode()


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes near JSON: a valid body cut, with a byte changed, or random bytes."""
    good = json.dumps({"inputs": [[5.1, 3.5, 1.4, 0.2]] * draw(st.integers(1, 3))}).encode()
    how = draw(st.sampled_from(["cut", "flip", "insert", "random", "deep"]))
    if how == "cut":
        return good[:draw(st.integers(0, len(good)))]
    if how == "flip":
        i = draw(st.integers(0, len(good) - 1))
        return good[:i] + bytes([draw(st.integers(0, 255))]) + good[i + 1:]
    if how == "insert":
        i = draw(st.integers(0, len(good)))
        return good[:i] + draw(st.binary(min_size=1, max_size=8)) + good[i:]
    if how == "deep":
        n = draw(st.integers(1, 5000))
        return b'{"inputs": ' + b"[" * n + b"]" * draw(st.integers(0, n)) + b"}"
    return draw(st.binary(max_size=64))


CONTENT_TYPES = st.sampled_from([
    "application/json", "application/json; charset=utf-8", "application/problem+json",
    "application/json; charset=latin-1", "text/plain", "", "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x"]) | header_text


@pytest.fixture(scope="module")
def fuzz_cloud(trained_registry: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[CloudServer]:
    """A private gunicorn over a copy of the trained registry: fuzzing touches nothing shared."""
    root = tmp_path_factory.mktemp("fuzz") / "reg"
    shutil.copytree(trained_registry, root)
    server = start_cloud(root)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One keep-alive session for all fuzz requests."""
    with requests.Session() as s:
        yield s


def check(r: requests.Response) -> None:
    """No 5xx; an app error is a JSON error body with a code and a message."""
    TRIED[f"status {r.status_code}"] += 1
    if r.status_code >= 400:
        TRIED["bad inputs"] += 1
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400 and r.headers.get("Content-Type", "").startswith("application/json"):
        err = r.json()["error"]
        assert isinstance(err["code"], str) and err["message"]


@FUZZ
@given(model=st.sampled_from(MODELS), body=predict_bodies())
def test_fuzzed_predict_bodies_never_answer_5xx(fuzz_cloud: CloudServer,
                                                http: requests.Session, model: str,
                                                body: bytes) -> None:
    check(http.post(f"{fuzz_cloud.url}/v1/models/{model}/predict", data=body, timeout=30,
                    headers={"Content-Type": "application/json"}))


@FUZZ
@given(body=raw_bodies(), content_type=CONTENT_TYPES)
def test_fuzzed_raw_bytes_and_content_types_never_answer_5xx(
        fuzz_cloud: CloudServer, http: requests.Session, body: bytes, content_type: str) -> None:
    headers = {"Content-Type": content_type.strip()} if content_type.strip() else {}
    check(http.post(f"{fuzz_cloud.url}/v1/models/iris/predict", data=body, timeout=30,
                    headers=headers))


@FUZZ
@given(name=st.sampled_from(MODELS) | text,
       query=st.dictionaries(st.sampled_from(["version", "alias", "device"]) | text,
                             st.sampled_from(["1", "stable", "-1", "", "latest"]) | text,
                             max_size=3),
       etag=header_text)
def test_fuzzed_model_names_and_queries_never_answer_5xx(
        fuzz_cloud: CloudServer, http: requests.Session, name: str, query: dict[str, str],
        etag: str) -> None:
    path = f"/v1/models/{quote(name, safe='')}/manifest"
    check(http.get(fuzz_cloud.url + path, params=query, timeout=30,
                   headers={"If-None-Match": etag.strip()} if etag.strip() else {}))


@pytest.fixture(scope="module")
def artifact_sha(fuzz_cloud: CloudServer) -> str:
    """sha256 of the iris model artifact."""
    man = requests.get(fuzz_cloud.url + "/v1/models/iris/manifest", timeout=5).json()
    return str(man["artifacts"][0]["sha256"])


@FUZZ
@given(which=st.integers(0, 3), name=text, byte_range=header_text
       | st.from_regex(r"bytes ?= ?-?[0-9]{0,25}(-[0-9]{0,25})?(,[0-9]*-[0-9]*){0,3}",
                       fullmatch=True),
       encoding=st.sampled_from(["gzip", "identity", "br", "*", ""]))
def test_fuzzed_artifact_names_and_range_headers_never_answer_5xx(
        fuzz_cloud: CloudServer, http: requests.Session, artifact_sha: str, which: int,
        name: str, byte_range: str, encoding: str) -> None:
    sha = artifact_sha if which else quote(name, safe="")
    headers = {"Accept-Encoding": encoding}
    if byte_range.strip():
        headers["Range"] = byte_range.strip()
    check(http.get(f"{fuzz_cloud.url}/v1/artifacts/{sha}", headers=headers, timeout=30))


def test_server_is_alive_and_healthy_after_fuzzing(fuzz_cloud: CloudServer) -> None:
    assert fuzz_cloud.proc is not None and fuzz_cloud.proc.poll() is None
    assert requests.get(fuzz_cloud.url + "/healthz", timeout=5).json()["status"] == "ok"
    r = requests.post(fuzz_cloud.url + "/v1/models/iris/predict", timeout=5,
                      json={"inputs": [[5.1, 3.5, 1.4, 0.2]]})
    assert r.status_code == 200 and r.json()["predictions"] == ["setosa"]
    total = sum(v for k, v in TRIED.items() if k.startswith("status"))
    print(f"\nfuzzed {total} requests, {TRIED['bad inputs']} bad inputs: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(TRIED.items())))
    assert TRIED["bad inputs"] >= 500
