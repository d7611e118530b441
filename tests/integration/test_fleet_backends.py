"""A fleet deployment end to end, on a real PostgreSQL and a real SeaweedFS started by the
tests: ``hybridml-cloud migrate`` moves an embedded registry (models, tokens, telemetry, the
signing key), two ``serve`` replicas share the backends, and an edge given both URLs syncs
with its artifacts straight from the bucket, keeps syncing when one replica dies, and sees a
promotion made through the other."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import PASSPHRASE_ENV, KeyRing
from hybridml.cloud.storage import Storage
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.tokens import TokenStore
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from tests.conftest import CloudServer
from tests.edgekit import trusting
from tests.summarykit import records, summary

BIN = Path(sys.executable).parent


@pytest.fixture
def fleet(pg_url: str, s3_bucket: str, s3_server: object,
          monkeypatch: pytest.MonkeyPatch) -> Storage:
    """The fleet backends, named by the environment as an operator would set them."""
    storage = Storage(db=pg_url, artifacts=s3_bucket,
                      s3_endpoint=s3_server.endpoint)  # type: ignore[attr-defined]
    monkeypatch.setenv(PASSPHRASE_ENV, "a passphrase from the secret store")
    monkeypatch.setenv("HYBRIDML_DB", pg_url)
    monkeypatch.setenv("HYBRIDML_ARTIFACTS", s3_bucket)
    monkeypatch.setenv("HYBRIDML_S3_ENDPOINT", str(storage.s3_endpoint))
    return storage


@pytest.fixture
def replicas(trained_registry: Path, fleet: Storage, tmp_path: Path
             ) -> Iterator[list[CloudServer]]:
    """The session's registry (signed) with a token and telemetry, migrated by the CLI; then
    two replicas serving it with presigned artifact URLs, each with its own cache."""
    old = tmp_path / "embedded"
    shutil.copytree(trained_registry, old)
    TokenStore(old).create("admin", "ops")
    manifest = Registry(old).manifest("iris", 1)
    rows = [dict.fromkeys((f["name"] for f in manifest["schema"]), 5.0)] * 5
    TelemetryStore(Registry(old)).ingest_summaries("pi-1", records("0a1b2c3d4e", [
        summary(manifest, rows, start=1.7e9, end=1.7e9 + 3600)]))
    env = {k: v for k, v in os.environ.items() if k not in ("HYBRIDML_DB", "HYBRIDML_ARTIFACTS")}
    out = subprocess.run(
        [str(BIN / "hybridml-cloud"), "migrate", "--from", str(old), "--db", str(fleet.db),
         "--artifacts", str(fleet.artifacts), "--s3-endpoint", str(fleet.s3_endpoint),
         "--registry", str(tmp_path / "migrate-cache")],
        capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout
    servers = []
    for i in range(2):
        cache = tmp_path / f"replica-{i}"
        cache.mkdir()
        servers.append(CloudServer(cache).start("--artifact-urls", "presign"))
    yield servers
    for s in servers:
        s.stop()


def test_a_migrated_registry_keeps_its_tokens_telemetry_and_key(replicas: list[CloudServer],
                                                                fleet: Storage,
                                                                tmp_path: Path) -> None:
    reg = Registry(tmp_path / "check", storage=fleet)
    assert [m.name for m in reg.models()] == ["eta", "iris", "late"]
    assert [t.name for t in TokenStore(reg).list()] == ["ops"]
    assert len(TelemetryStore(reg).summaries("iris")) == 1
    assert KeyRing(reg).active_id() == KeyRing(tmp_path / "embedded").active_id()


def test_an_edge_syncs_from_the_bucket_and_fails_over_between_replicas(
        replicas: list[CloudServer], fleet: Storage, tmp_path: Path) -> None:
    reg = Registry(tmp_path / "admin", storage=fleet)
    store = trusting(LocalStore(tmp_path / "edge"), reg)
    client = CloudClient([r.url for r in replicas], allow_http=True)
    first = sync(store, client, "late")  # a model and its precomputed table
    assert first.changed and first.version == 1
    assert first.bytes_direct > 0 and first.bytes_cloud == 0  # no byte through a replica
    replicas[0].stop()  # one replica dies
    reg.create_version("late", reg.manifest("late", 1), reg.metadata("late", 1))
    out = subprocess.run([str(BIN / "hybridml-cloud"), "promote", "late", "2",
                          "--registry", str(tmp_path / "admin")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    second = sync(store, client, "late")
    assert second.changed and second.version == 2
    assert second.cloud == replicas[1].url
    client.close()
