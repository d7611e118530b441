"""Direct artifact URLs (docs/storage.md §3): the edge downloads from ``sources``, else the cloud.

The cloud is the real app (``tests.edgekit.ThreadCloud``, device tokens on) with
``HYBRIDML_ARTIFACT_URLS=public:http://127.0.0.1:PORT/b``, where PORT is a small static HTTP
server (:class:`Origin`) over the registry's blob directory that records every request's
headers and can be told to serve corrupt bytes or 404s, or be stopped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.storage import URLS_ENV
from hybridml.cloud.train import train
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import SyncOptions, direct_sources, sync
from hybridml.shared.errors import ManifestError
from hybridml.shared.files import file_sha256
from hybridml.shared.manifest import EDGE_ROLES, Manifest
from tests.edgekit import ThreadCloud, trusting

NAME = "late"


class Origin:
    """A static file server for ``directory`` at ``/b/<name>`` on a loopback port, with
    ``Range: bytes=N-``. ``mode``: ``ok``, ``corrupt`` (same length, bytes flipped) or
    ``404``. ``seen`` holds each request's headers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.mode = "ok"
        self.seen: list[dict[str, str]] = []
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                origin.seen.append(dict(self.headers.items()))
                path = origin.directory / self.path.rsplit("/", 1)[-1]
                if origin.mode == "404" or not self.path.startswith("/b/") or \
                        not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if origin.mode == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                first = 0
                wanted = self.headers.get("Range", "")
                if wanted.startswith("bytes=") and wanted.endswith("-"):
                    first = int(wanted[6:-1])
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {first}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - first))
                self.end_headers()
                self.wfile.write(data[first:])

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/b"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def artifact_requests(self) -> list[dict[str, str]]:
        return list(self.seen)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, orders_csv: Path) -> Path:
    """A registry with ``late`` (hgb, a model of a few hundred KB), signing key made."""
    root = tmp_path_factory.mktemp("direct") / "reg"
    reg = Registry(root)
    train(reg, NAME, data=orders_csv, target="late", model="hgb", drop=["delivery_minutes"],
          params={"max_iter": 30})
    reg.close()
    KeyRing(root).init()  # manifests are signed: sources go under the signature
    return root


@pytest.fixture
def origin(registry: Path) -> Iterator[Origin]:
    reg = Registry(registry)
    o = Origin(reg.blobs.dir)
    reg.close()
    yield o
    o.close()


def cloud_with(monkeypatch: pytest.MonkeyPatch, registry: Path, mode: str) -> ThreadCloud:
    """The cloud app over ``registry`` with ``--artifact-urls mode``."""
    monkeypatch.setenv(URLS_ENV, mode)
    return ThreadCloud(registry)


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch, registry: Path, origin: Origin
          ) -> Iterator[ThreadCloud]:
    monkeypatch.delenv("HYBRIDML_ALLOW_HTTP", raising=False)
    c = cloud_with(monkeypatch, registry, f"public:{origin.url}")
    yield c
    c.close()


def device(cloud: ThreadCloud, tmp_path: Path) -> tuple[LocalStore, CloudClient]:
    store = trusting(tmp_path / "store", cloud.registry)
    return store, CloudClient(cloud.url, token=cloud.token)


def edge_artifacts(store: LocalStore) -> list[tuple[str, int]]:
    active = store.active(NAME)
    assert active is not None
    return [(a.sha256, a.size) for a in active.artifacts if a.role in EDGE_ROLES]


def assert_store_correct(store: LocalStore) -> None:
    """Every edge artifact of the active version is in place and hashes to its name."""
    for sha, size in edge_artifacts(store):
        path = store.artifact_path(sha)
        assert path.stat().st_size == size and file_sha256(path) == sha
        assert not store.part_path(sha).exists()


# --------------------------------------------------------------------- the cloud side
def test_the_served_manifest_names_a_direct_url_for_each_edge_artifact(
        cloud: ThreadCloud, origin: Origin) -> None:
    resp = requests.get(f"{cloud.url}/v1/models/{NAME}/manifest",
                        headers={"Authorization": f"Bearer {cloud.token}"}, timeout=10)
    doc = resp.json()
    edge = {a["sha256"] for a in doc["artifacts"] if a["role"] in EDGE_ROLES}
    assert doc["sources"] == {sha: f"{origin.url}/{sha}" for sha in edge}
    assert "sources_expire" not in doc  # public URLs do not expire
    assert "signature" in doc  # signed with the body (the device checks it: the sync tests)
    served = Manifest.from_json(doc)
    plain = Registry(cloud.registry).manifest(NAME)
    assert served.content() == Manifest.from_json(plain).content()  # not the model's content


def test_the_etag_leaves_sources_out_and_a_304_holds_whatever_urls_are_named(
        monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path) -> None:
    for _ in range(3):  # manifests are re-issued on a time grid: a boundary may fall inside
        etags, sources = _etags_under_three_source_modes(monkeypatch, registry)
        if len(set(etags)) == 1:
            break
    assert len(set(etags)) == 1
    assert sources[0] != sources[1] and sources[2] is None


def _etags_under_three_source_modes(monkeypatch: pytest.MonkeyPatch, registry: Path
                                    ) -> tuple[list[str], list[Any]]:
    """The ETag and sources each mode serves; every 304 checked on the way (a device holding
    the first app's ETag gets a 304 from the others too, unless the issue period turned)."""
    etags: list[str] = []
    sources: list[Any] = []
    for mode in ("public:http://127.0.0.1:1/a", "public:https://cdn.example/models", "off"):
        c = cloud_with(monkeypatch, registry, mode)
        auth = {"Authorization": f"Bearer {c.token}"}
        try:
            url = f"{c.url}/v1/models/{NAME}/manifest"
            first = requests.get(url, headers=auth, timeout=10)
            again = requests.get(url, headers={**auth, "If-None-Match": first.headers["ETag"]},
                                 timeout=10)
            etags.append(first.headers["ETag"])
            sources.append(first.json().get("sources"))
            assert again.status_code == 304 and again.headers["ETag"] == first.headers["ETag"]
            if etags[0] != etags[-1]:
                return etags, sources  # re-issued between the apps: the caller asks again
            cross = requests.get(url, headers={**auth, "If-None-Match": etags[0]}, timeout=10)
            assert cross.status_code == 304
        finally:
            c.close()
    return etags, sources


# ----------------------------------------------------------------------- the edge side
def test_a_sync_takes_every_artifact_from_the_direct_origin_without_the_token(
        cloud: ThreadCloud, origin: Origin, tmp_path: Path) -> None:
    store, client = device(cloud, tmp_path)
    result = sync(store, client, NAME)
    assert result.changed and result.bytes_cloud == 0 and result.direct_failures == 0
    assert result.bytes_direct == result.bytes_downloaded == sum(
        size for _, size in edge_artifacts(store))
    assert_store_correct(store)
    assert origin.seen, "the origin served nothing"
    for headers in origin.seen:
        lower = {k.lower() for k in headers}
        assert "authorization" not in lower and "hybridml-device" not in lower
        assert cloud.token not in str(headers)
    assert sync(store, client, NAME).changed is False  # the 304 still works with sources


def test_a_cut_direct_download_resumes_from_the_origin_with_range(
        cloud: ThreadCloud, origin: Origin, tmp_path: Path, registry: Path) -> None:
    store, client = device(cloud, tmp_path)
    store.ensure()
    doc = Manifest.from_json(Registry(registry).manifest(NAME))
    model = doc.artifact("model")
    assert model is not None
    blob = Registry(registry).blob_path(model.sha256).read_bytes()
    store.part_path(model.sha256).write_bytes(blob[:1000])  # what a cut download left
    result = sync(store, client, NAME)
    assert result.bytes_cloud == 0
    assert result.bytes_direct == sum(size for _, size in edge_artifacts(store)) - 1000
    assert any(h.get("Range") == "bytes=1000-" for h in origin.seen)
    assert_store_correct(store)


@pytest.mark.parametrize("failure", ["corrupt", "404", "down"])
def test_a_failing_direct_origin_falls_back_to_the_cloud_and_commits_nothing_bad(
        cloud: ThreadCloud, origin: Origin, tmp_path: Path, failure: str,
        caplog: pytest.LogCaptureFixture) -> None:
    if failure == "down":
        origin.close()
    else:
        origin.mode = failure
    store, client = device(cloud, tmp_path)
    with caplog.at_level("WARNING", logger="hybridml.edge.sync"):
        result = sync(store, client, NAME)
    n = len(edge_artifacts(store))
    assert result.changed and result.direct_failures == n and result.bytes_direct == 0
    assert result.bytes_cloud == result.bytes_downloaded > 0
    assert_store_correct(store)
    lines = [r for r in caplog.records if "taking it from the cloud" in r.getMessage()]
    assert len(lines) == n  # one line per artifact


def test_an_http_source_off_this_machine_is_refused_by_the_transport_rule(
        monkeypatch: pytest.MonkeyPatch, registry: Path, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("HYBRIDML_ALLOW_HTTP", raising=False)
    c = cloud_with(monkeypatch, registry, "public:http://192.0.2.1/b")  # TEST-NET-1
    try:
        store, client = device(c, tmp_path)
        with caplog.at_level("WARNING", logger="hybridml.edge.sync"):
            result = sync(store, client, NAME)
    finally:
        c.close()
    assert result.bytes_direct == 0 and result.direct_failures == len(edge_artifacts(store))
    assert any("refusing plain http:// to 192.0.2.1" in r.getMessage()
               for r in caplog.records)
    assert_store_correct(store)


def test_expired_sources_go_straight_to_the_cloud(
        cloud: ThreadCloud, origin: Origin, tmp_path: Path) -> None:
    """A manifest whose ``sources_expire`` is past (here: the device's clock says so) is
    not even tried: the URLs would answer 403."""
    store, client = device(cloud, tmp_path)
    resp = client.manifest(NAME)
    assert resp.body is not None
    result = sync(store, client, NAME, SyncOptions())
    assert result.bytes_direct > 0  # public URLs carry no expiry: they are used
    # The same manifest with an expiry, as the presign mode sends it, read at a later time:
    # the edge's own parsing decides; no request reaches the origin for it.
    m = Manifest.loads(resp.body)
    assert direct_sources(m, 0.0) == dict(m.sources)
    expired = Manifest.from_json({**m.raw, "sources_expire": "2000-01-01T00:00:00Z"})
    assert direct_sources(expired, 1e9) == {}


def test_malformed_sources_are_a_manifest_error(cloud: ThreadCloud, tmp_path: Path) -> None:
    _, client = device(cloud, tmp_path)
    body = client.manifest(NAME).body
    assert body is not None
    raw = Manifest.loads(body).raw
    for bad in ([1], {"abc": "http://x"}, {"a" * 64: 7}, {"a" * 64: "x" * 9000}):
        with pytest.raises(ManifestError) as err:
            Manifest.from_json({**raw, "sources": bad})
        assert err.value.details["field"] == "sources"
