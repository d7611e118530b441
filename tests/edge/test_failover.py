"""Several cloud replicas (``--cloud URL1,URL2``): the edge fails over, and never goes back.

Two real ``hybridml-cloud serve`` processes on loopback share one registry directory (SQLite
across processes); the edge is given both URLs. Stopping the first moves sync, the predict
fallback and telemetry pushes to the second; a 4xx from the first is its answer (the second,
which would have said yes, is not asked); a 5xx is not (a tiny broken server stands in for a
replica that answers 503); a replica that lags behind is refused by the release sequence.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tokens import TokenStore
from hybridml.cloud.train import train
from hybridml.edge.client import CloudClient
from hybridml.edge.fallback import FallbackPolicy
from hybridml.edge.push import push
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.spool import Spool
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.edge.transport import cloud_urls
from hybridml.shared.errors import AuthError, ConfigError, FreshnessError
from hybridml.shared.rollout import load_failed_body
from tests.conftest import CloudServer, start_cloud
from tests.edgekit import trusting

NAME = "iris"
OUT = [50.0, 3.5, 1.4, 0.2]  # sepal length far past iris: the fallback asks the cloud
POLICY = FallbackPolicy(timeout_ms=5000, failures=1, cooldown_s=3600)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """iris v1 (stable) and v2, a signing key."""
    root = tmp_path_factory.mktemp("failover") / "reg"
    reg = Registry(root)
    train(reg, NAME, dataset="iris", model="logreg")
    train(reg, NAME, dataset="iris", model="logreg", seed=1)
    reg.close()
    KeyRing(root).init()
    return root


@pytest.fixture
def shared(registry: Path, tmp_path: Path) -> Path:
    """A private copy of the registry, for the two replicas of one test."""
    dst = tmp_path / "reg"
    shutil.copytree(registry, dst)
    return dst


@pytest.fixture
def replicas(shared: Path) -> Iterator[tuple[CloudServer, CloudServer]]:
    a, b = start_cloud(shared), start_cloud(shared)
    yield a, b
    a.stop()
    b.stop()


class Broken:
    """A server that answers every request 503 (a replica whose database is down) and
    counts them."""

    def __init__(self) -> None:
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                body = b'{"error":{"code":"storage_unavailable","message":"db down"}}'
                self.send_response(503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cloud_urls_are_a_comma_separated_list_each_checked_by_the_transport_rule() -> None:
    assert cloud_urls("http://127.0.0.1:1/, https://b.example ,,http://127.0.0.1:1") == (
        "http://127.0.0.1:1", "https://b.example")
    assert cloud_urls(["https://a.example", "https://b.example/"]) == (
        "https://a.example", "https://b.example")
    with pytest.raises(ConfigError, match=r"refusing plain http:// to 10\.0\.0\.2"):
        cloud_urls("https://a.example,http://10.0.0.2:8000")
    with pytest.raises(ConfigError, match="no cloud URL"):
        cloud_urls(" , ")
    client = CloudClient("https://a.example,https://b.example")
    assert client.base_url == "https://a.example" and client.host == "a.example"


def test_sync_predict_and_push_move_to_the_second_replica_when_the_first_stops(
        replicas: tuple[CloudServer, CloudServer], shared: Path, tmp_path: Path) -> None:
    a, b = replicas
    store = trusting(tmp_path / "store", shared)
    rt = EdgeRuntime(store, NAME, f"{a.url},{b.url}", policy=POLICY)
    assert rt.sync().cloud == a.url and rt.version == 1
    assert rt.client is not None and rt.client.base_url == a.url

    a.stop()
    reg = Registry(shared)
    reg.set_alias(NAME, "stable", 2)  # the second replica sees it: one registry
    reg.close()
    result = rt.sync()
    assert result.changed and rt.version == 2 and result.cloud == b.url
    assert rt.client.base_url == b.url  # it sticks with the one that answered

    [p] = rt.predict([OUT])
    assert p.source == "cloud" and not p.degraded and p.model_version == 2
    assert rt.cloud_failures == 0  # a replica answered: the breaker saw no failure

    pushed = rt.push()
    assert pushed.ok and pushed.accepted >= 1 and pushed.pending == 0


def test_a_push_repeated_on_the_other_replica_counts_each_record_once(
        replicas: tuple[CloudServer, CloudServer], shared: Path, tmp_path: Path) -> None:
    """The answer to a push can be lost after the first replica stored it; the same
    records sent again to the second are duplicates (their ids), not new records."""
    a, b = replicas
    store = LocalStore(tmp_path / "store")
    store.ensure()
    spool = Spool.open(store.root)
    ids = [spool.add("health", load_failed_body(NAME, 2, 1, "model_load", f"boom {i}"),
                     model=NAME, version=2) for i in range(3)]
    records = [r.to_json() for r in spool.records([e.seq for e in spool.queue()])]
    client = CloudClient([a.url, b.url])
    assert push(spool, client).accepted == 3
    a.stop()
    answer = client.telemetry(records)
    assert client.base_url == b.url
    assert answer["accepted"] == [] and sorted(answer["duplicates"]) == sorted(ids)


def test_a_4xx_from_the_first_replica_is_its_answer(shared: Path, tmp_path: Path) -> None:
    """The first replica wants device tokens and the second does not: a request without
    one gets the first's 401, and the second (which would have answered) is never asked."""
    TokenStore(shared).create("device", "pi-1")
    a = start_cloud(shared, insecure=False)
    b = start_cloud(shared)
    try:
        client = CloudClient(f"{a.url},{b.url}", token="hml_not_a_token")
        with pytest.raises(AuthError):
            client.manifest(NAME)
        assert client.base_url == a.url
        assert CloudClient(b.url).manifest(NAME).body is not None  # b would have said yes
    finally:
        a.stop()
        b.stop()


def test_a_5xx_fails_over_and_the_client_sticks_with_the_replica_that_answered(
        replicas: tuple[CloudServer, CloudServer], shared: Path, tmp_path: Path) -> None:
    a, _ = replicas
    broken = Broken()
    try:
        client = CloudClient([broken.url, a.url])
        store = trusting(tmp_path / "store", shared)
        assert sync(store, client, NAME).cloud == a.url
        assert broken.hits == 1 and client.base_url == a.url
        sync(store, client, NAME)
        assert broken.hits == 1  # sticks: the broken one is not asked again
    finally:
        broken.close()


def test_every_replica_down_fails_the_sync_with_the_last_error_and_keeps_the_model(
        replicas: tuple[CloudServer, CloudServer], shared: Path, tmp_path: Path) -> None:
    a, b = replicas
    store = trusting(tmp_path / "store", shared)
    client = CloudClient([a.url, b.url])
    sync(store, client, NAME)
    a.stop()
    b.stop()
    with pytest.raises(Exception) as err:
        sync(store, client, NAME)
    assert getattr(err.value, "code", None) == "cloud_unavailable"
    assert b.url in str(err.value)
    active = store.active(NAME)
    assert active is not None and active.version == 1


def test_a_device_never_takes_a_lower_sequence_from_a_lagging_replica(
        shared: Path, tmp_path: Path) -> None:
    """Replica B has not seen the promotion A serves (a stale copy of the registry, same
    signing key): after A's sequence, B's older answer is refused and v2 stays active."""
    stale = tmp_path / "stale"
    shutil.copytree(shared, stale)
    reg = Registry(shared)
    reg.set_alias(NAME, "stable", 2)
    reg.close()
    a, b = start_cloud(shared), start_cloud(stale)
    try:
        store = trusting(tmp_path / "store", shared)
        client = CloudClient([a.url, b.url])
        assert sync(store, client, NAME).version == 2
        a.stop()
        with pytest.raises(FreshnessError) as err:
            sync(store, client, NAME)
        assert err.value.details["field"] == "release.sequence"
        assert client.base_url == b.url
        active = store.active(NAME)
        assert active is not None and active.version == 2
    finally:
        a.stop()
        b.stop()
