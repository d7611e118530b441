"""HTTPS end to end: ``hybridml-cloud serve --certfile --keyfile`` and the edge trusting one CA.

The certificates are throwaway ones from :mod:`tests.tlskit` (a CA, a server certificate for
``localhost`` and ``127.0.0.1``, and an unrelated CA). The server is the real gunicorn with
the SheddingWorker, which has no buffering front under TLS and serves with gunicorn's own
thread-per-connection path. The edge trusts exactly the CA file it is given (``ca_bundle``)
and refuses plain HTTP to anything but loopback before it opens a connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hybridml.cloud.signing import KeyRing
from hybridml.edge.client import CloudClient
from hybridml.edge.fallback import FallbackPolicy
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.edge.trust import TrustStore
from hybridml.shared.errors import HybridMLError, RemoteError
from tests.conftest import CloudServer, start_cloud
from tests.tlskit import TLSFiles, make_tls

IRIS_IN = [5.1, 3.5, 1.4, 0.2]
IRIS_OUT = [50.0, 3.5, 1.4, 0.2]  # past iris's training range: the fallback asks the cloud
POLICY = FallbackPolicy(timeout_ms=10_000, failures=1, cooldown_s=3600)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA, a loopback server certificate signed by it, and an unrelated CA."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_cloud(registry_copy: Path, tls: TLSFiles) -> Iterator[CloudServer]:
    """gunicorn over HTTPS (loopback, no tokens) on a registry copy with a signing key."""
    KeyRing(registry_copy).init()
    server = start_cloud(registry_copy, "--certfile", str(tls.cert), "--keyfile",
                         str(tls.key), ca=tls.ca)
    yield server
    server.stop()


def trusting_store(path: Path, registry: Path) -> LocalStore:
    """An empty edge store that trusts ``registry``'s signing keys."""
    store = LocalStore(path).ensure()
    for key in KeyRing(registry).list():
        TrustStore(store.root).add(key.public_path)
    return store


def store_files(store: LocalStore) -> list[str]:
    """Every file in the store except the trusted keys: what a sync may have left."""
    return sorted(str(p.relative_to(store.root)) for p in store.root.rglob("*")
                  if p.is_file() and "trusted" not in p.parts)


def test_the_ready_file_says_https_and_the_worker_serves_without_its_front(
        tls_cloud: CloudServer, tls: TLSFiles) -> None:
    assert tls_cloud.url.startswith("https://127.0.0.1:")
    assert requests.get(tls_cloud.url + "/healthz", verify=str(tls.ca), timeout=5).ok
    with pytest.raises(requests.ConnectionError):  # plain HTTP on the TLS port
        requests.get(tls_cloud.url.replace("https://", "http://") + "/healthz", timeout=5)
    # the fallback path of SheddingWorker: gunicorn's own TLS threads, said once per worker
    assert "no buffering front (TLS" in tls_cloud.log_text()


def test_edge_syncs_over_tls_trusting_only_the_given_ca(tls_cloud: CloudServer,
                                                        tls: TLSFiles, tmp_path: Path) -> None:
    store = trusting_store(tmp_path / "store", tls_cloud.registry)
    client = CloudClient(tls_cloud.url, ca_bundle=str(tls.ca))
    try:
        result = sync(store, client, "iris")
    finally:
        client.close()
    assert result.changed and result.version == 1
    active = store.active("iris")
    assert active is not None and active.version == 1


def test_fallback_asks_the_cloud_over_tls(tls_cloud: CloudServer, tls: TLSFiles,
                                          tmp_path: Path) -> None:
    trusting_store(tmp_path / "store", tls_cloud.registry)
    rt = EdgeRuntime(tmp_path / "store", "iris", tls_cloud.url, policy=POLICY,
                     ca_bundle=str(tls.ca))
    rt.sync()
    local, remote = rt.predict([IRIS_IN, IRIS_OUT])
    assert local.source in ("edge", "precomputed") and local.prediction == "setosa"
    assert remote.source == "cloud" and remote.reason == "out_of_range"
    assert not remote.degraded and remote.model_version == 1


def test_a_server_signed_by_another_ca_is_refused_and_the_store_is_unchanged(
        tls_cloud: CloudServer, tls: TLSFiles, tmp_path: Path) -> None:
    store = trusting_store(tmp_path / "store", tls_cloud.registry)
    before = store_files(store)
    client = CloudClient(tls_cloud.url, ca_bundle=str(tls.other_ca))
    try:
        with pytest.raises(HybridMLError) as info:
            sync(store, client, "iris")
    finally:
        client.close()
    message = str(info.value).lower()
    assert "certificate" in message or "tls" in message, info.value
    assert store.active("iris") is None
    # at most the sync's locks and bookkeeping (its last error, the store's id that the
    # manifest request carries), no manifest, no artifact
    added = [f for f in store_files(store) if f not in before]
    assert [f for f in added if not f.endswith(".lock") and "sync" not in f
            and f != "device.json"] == [], added


def test_plain_http_to_a_non_loopback_cloud_is_refused_before_any_network() -> None:
    # cloud.example never resolves (RFC 2606): a network attempt would be a RemoteError
    # (cloud unavailable); the refusal is the client's own, naming https.
    with pytest.raises(HybridMLError) as info:
        client = CloudClient("http://cloud.example:8000")
        client.manifest("iris")
    assert not isinstance(info.value, RemoteError), info.value
    assert "https" in str(info.value).lower()
