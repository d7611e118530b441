"""The storage guarantees, on both backends: SQLite + a blob directory, and a real PostgreSQL +
a real SeaweedFS started by the tests (docs/storage.md). One suite, parametrised.

A "replica" here is what it is in production: another process (the CLI) or another
:class:`Registry` object with its own connections on the same database and bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hybridml.cloud.auth import AuditLog, promote
from hybridml.cloud.registry import Registry
from hybridml.cloud.rollouts import Rollouts
from hybridml.cloud.signing import KeyRing, Signer
from hybridml.cloud.storage import Storage
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.tokens import TokenStore
from hybridml.shared.errors import RegistryError
from tests.summarykit import records, summary

BIN = Path(sys.executable).parent
BOUND_S = 2.0  # what docs/storage.md §4 promises, with room for a loaded CI machine


def cli(root: Path, *args: str) -> str:
    """Run ``hybridml-cloud`` as another process (another replica) on the same backends."""
    out = subprocess.run([str(BIN / "hybridml-cloud"), *args, "--registry", str(root)],
                         capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    return out.stdout


def at_once(job: Callable[[], None], n: int) -> None:
    """Run ``job`` in ``n`` threads at once (each with connections of its own)."""
    threads = [threading.Thread(target=job) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def seen_within(check: object, bound_s: float = BOUND_S) -> float:
    """Seconds until ``check()`` is true; fails past ``bound_s``."""
    start = time.monotonic()
    while not check():  # type: ignore[operator]
        assert time.monotonic() - start < bound_s, "not seen within the bound"
        time.sleep(0.005)
    return time.monotonic() - start


def test_two_trains_at_once_get_distinct_versions(iris_on: Path, storage: Storage) -> None:
    base = Registry(iris_on, storage=storage)
    manifest = base.manifest("iris", 1)
    got: list[int] = []
    errors: list[BaseException] = []

    def register() -> None:
        reg = Registry(iris_on, storage=storage)  # a connection of its own, as a replica has
        try:
            got.append(reg.create_version("iris", manifest, {})["version"])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            reg.close()

    at_once(register, 8)
    assert not errors
    assert sorted(got) == list(range(3, 11))
    assert [v.version for v in base.versions("iris")] == list(range(1, 11))


def test_an_alias_move_commits_with_its_audit_record_or_not_at_all(iris_on: Path,
                                                                  storage: Storage) -> None:
    reg = Registry(iris_on, storage=storage)
    assert promote(reg, "iris", "stable", 2, actor="ops") == (2, 1)
    entry = AuditLog(reg).entries("iris")[-1]
    assert (entry["from"], entry["to"], entry["by"], entry["action"]) == (1, 2, "ops", "promote")
    sequence = reg.sequence("iris")
    with pytest.raises(RegistryError):  # the record cannot be written: the move is undone
        reg.move_alias("iris", "stable", 1, audit={"by": float("nan")})
    assert reg.aliases("iris")["stable"] == 2
    assert reg.sequence("iris") == sequence
    assert len(AuditLog(reg).entries("iris")) == 1


CRASH = """
import os, sys
from hybridml.cloud.registry import Registry
from hybridml.cloud.storage import Storage
reg = Registry(sys.argv[1], storage=Storage.from_env())
with reg.transaction(write=True) as c:
    c.execute("INSERT INTO policies (name, policy, updated) VALUES ('iris', '{}', 'now')")
    c.execute("UPDATE aliases SET version = 2 WHERE name = 'iris' AND alias = 'stable'")
    os._exit(9)  # the process dies before COMMIT
"""


def test_a_crash_before_commit_leaves_nothing_visible(iris_on: Path, storage: Storage) -> None:
    out = subprocess.run([sys.executable, "-c", CRASH, str(iris_on)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    reg = Registry(iris_on, storage=storage)
    assert reg.policies() == {}
    assert reg.aliases("iris")["stable"] == 1
    reg.set_policy("iris", {"schedule": "1d"})  # and the write lock is free again
    assert reg.policies() == {"iris": {"schedule": "1d"}}


def test_telemetry_ids_count_once_whichever_replica_takes_them(iris_on: Path,
                                                             storage: Storage) -> None:
    manifest = Registry(iris_on, storage=storage).manifest("iris", 1)
    rows = [dict.fromkeys((f["name"] for f in manifest["schema"]), 5.0)] * 10
    hour = 3600.0
    batch = records("0a1b2c3d4e", [summary(manifest, rows, start=1.7e9 + k * hour,
                                           end=1.7e9 + (k + 1) * hour) for k in range(20)])
    results: list[tuple[int, int]] = []

    def push() -> None:
        store = TelemetryStore(Registry(iris_on, storage=storage))
        res = store.ingest_summaries("dev-1", batch)
        results.append((len(res.accepted), len(res.duplicates)))
        store.close()

    at_once(push, 4)
    assert sum(a for a, _ in results) == 20  # each record stored by exactly one upload
    assert sum(d for _, d in results) == 60
    store = TelemetryStore(Registry(iris_on, storage=storage))
    assert store.counters()[("records_accepted", "all")] == 20
    assert len(store.summaries("iris")) == 20
    again = store.ingest_summaries("dev-1", batch)  # a retry after a lost answer
    assert (len(again.accepted), len(again.duplicates)) == (0, 20)


def test_an_alias_moved_by_another_replica_reaches_the_resolve_cache(iris_on: Path,
                                                                    storage: Storage) -> None:
    reg = Registry(iris_on, storage=storage)
    assert reg.resolve_cached("iris", "stable") == 1
    seen_within(lambda: reg.stamp() is not None)  # the listener is up (PostgreSQL)
    cli(iris_on, "promote", "iris", "2")
    lag = seen_within(lambda: reg.resolve_cached("iris", "stable") == 2)
    print(f"alias move seen after {lag * 1000:.1f} ms on {storage.describe()}")


def test_a_token_revoked_through_another_replica_is_refused_at_once(iris_on: Path,
                                                                   storage: Storage) -> None:
    tokens = TokenStore(Registry(iris_on, storage=storage))
    info, token = tokens.create("device", "edge-1")
    assert tokens.authenticate(token) == info
    cli(iris_on, "tokens", "revoke", info.id)
    assert tokens.authenticate(token) is None  # read per request: no bound at all


def test_a_new_signing_key_reaches_every_replica(iris_on: Path, storage: Storage) -> None:
    reg = Registry(iris_on, storage=storage)
    first = KeyRing(reg).init()
    signer = Signer(reg)
    assert signer.key_id == first.key_id
    seen_within(lambda: reg.stamp() is not None)
    second = json.loads(cli(iris_on, "keys", "init", "--json"))["key_id"]
    cli(iris_on, "keys", "use", second)
    seen_within(lambda: signer.key_id == second)
    assert signer.sign({"a": 1})["signature"]["key_id"] == second


def test_a_rollout_step_taken_by_another_replica_reaches_the_rollout_cache(
        iris_on: Path, storage: Storage) -> None:
    reg = Registry(iris_on, storage=storage)
    mine = Rollouts(reg)
    assert mine.running("iris") is None
    seen_within(lambda: reg.stamp() is not None)
    cli(iris_on, "rollout", "start", "iris", "--candidate", "2", "--strategy", "canary", "--force")
    seen_within(lambda: mine.running("iris") is not None)
    cli(iris_on, "rollout", "abort", "iris")
    seen_within(lambda: mine.running("iris") is None)


def test_blobs_are_checked_on_the_way_in_and_out(iris_on: Path, storage: Storage) -> None:
    reg = Registry(iris_on, storage=storage)
    sha, size = reg.put_blob(b"hello fleet")
    assert reg.has_blob(sha) and reg.blobs.size(sha) == size
    assert reg.blob_path(sha).read_bytes() == b"hello fleet"
    model = reg.manifest("iris")["artifacts"][0]
    assert reg.blob_path(model["sha256"]).stat().st_size == model["size"]


def test_a_registry_from_the_last_release_upgrades_in_place_without_loss(
        iris_registry: Path, tmp_path: Path) -> None:
    """Schema 4 (the last release): its audit trail was a JSON-lines file beside the
    database. Opening it imports every entry once and keeps the file as ``*.imported``."""
    import shutil
    import sqlite3

    root = tmp_path / "old"
    shutil.copytree(iris_registry, root)
    conn = sqlite3.connect(root / "registry.db")
    conn.execute("DROP TABLE audit")
    conn.execute("DROP TABLE signing_keys")
    conn.execute("PRAGMA user_version = 4")
    conn.commit()
    conn.close()
    lines = [{"time": "2026-11-01T10:00:00Z", "action": "promote", "name": "iris",
              "alias": "stable", "from": 1, "to": 2, "by": "cli:ops"},
             {"time": "2026-11-02T10:00:00Z", "action": "rollback", "name": "iris",
              "alias": "stable", "from": 2, "to": 1, "by": "cli:ops"}]
    text = "".join(json.dumps(e) + "\n" for e in lines) + '{"torn": '
    (root / "audit.jsonl").write_text(text)
    reg = Registry(root)
    assert AuditLog(reg).entries("iris") == lines
    assert AuditLog(reg).replaced("iris", "stable") == (2, 1)
    assert not (root / "audit.jsonl").exists()
    assert (root / "audit.jsonl.imported").read_text() == text
    assert [v.version for v in reg.versions("iris")] == [1, 2]
    assert reg.database.schema_version() == 5
    assert AuditLog(Registry(root)).entries("iris") == lines  # imported once, not twice


def test_an_embedded_cloud_imports_neither_psycopg_nor_boto3(tmp_path: Path) -> None:
    code = ("import sys\n"
            "from hybridml.cloud.registry import Registry\n"
            "from hybridml.cloud.telemetry import TelemetryStore\n"
            "from hybridml.cloud.app import create_app\n"
            f"reg = Registry({str(tmp_path / 'reg')!r})\n"
            "TelemetryStore(reg).counters(); create_app(reg)\n"
            "print(sorted(m for m in ('psycopg', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env={k: v for k, v in os.environ.items()
                                          if not k.startswith("HYBRIDML_")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("storage", ["fleet"], indirect=True)  # SQLite has no server
def test_a_postgresql_restart_fails_requests_cleanly_then_the_cloud_reconnects(
        iris_on: Path, storage: Storage, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridml.cloud.app import create_app
    from hybridml.shared.errors import StorageUnavailableError

    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    server = request.getfixturevalue("pg_server")
    reg = Registry(iris_on, storage=storage)
    client = create_app(reg).test_client()
    assert client.get("/v1/models/iris/manifest").status_code == 200
    seen_within(lambda: reg.stamp() is not None)
    server.stop()
    try:
        with pytest.raises(StorageUnavailableError):
            reg.resolve("iris", "stable")
        down = client.get("/v1/models/iris/manifest")
        assert down.status_code == 503  # retry later: not a 500, not a wrong answer
        assert down.get_json()["error"]["code"] == "storage_unavailable"
        with pytest.raises(StorageUnavailableError):  # nothing half-written either
            reg.set_alias("iris", "stable", 2)
    finally:
        server.start()
    assert reg.aliases("iris")["stable"] == 1  # the same objects reconnect
    promote(reg, "iris", "stable", 2, actor="ops")
    assert client.get("/v1/models/iris/manifest").get_json()["version"] == 2
    seen_within(lambda: reg.stamp() is not None, 10.0)  # the listener is back too
