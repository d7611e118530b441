"""The rollout companion in the store (``companion.json``) and how a sync fills it
(docs/rollouts.md §4): written atomically, kept by gc, fetched and verified before any
pointer moves, and never fatal to the served version."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.registry import Registry
from hybridml.edge.client import CloudClient, ManifestResponse
from hybridml.edge.identity import store_id
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import SyncOptions, sync
from hybridml.shared.errors import IntegrityError, ManifestError
from hybridml.shared.files import CRASH_ENV
from hybridml.shared.manifest import EDGE_ROLES, Manifest
from tests.edge.test_shadow import block_for, make_store, registry, spooled
from tests.edgekit import ThreadCloud

__all__ = ["registry"]  # the module fixture, shared with test_shadow
UNSIGNED = SyncOptions(allow_unsigned=True)


# ---------------------------------------------------------------------------- the store
def test_set_and_clear_the_companion(registry: Path, tmp_path: Path) -> None:
    store, (v1, _) = make_store(registry, "iris", tmp_path / "s")
    assert store.companion("iris") is None
    store.set_companion("iris", v1)
    got = store.companion("iris")
    assert got is not None and got.dumps() == v1.dumps()
    store.set_companion("iris", None)
    assert store.companion("iris") is None
    store.set_companion("iris", None)  # clearing twice is fine
    with pytest.raises(ManifestError) as err:
        store.set_companion("other", v1)
    assert err.value.details["field"] == "name"


def test_gc_keeps_the_companion_artifacts(registry: Path, tmp_path: Path) -> None:
    store, (v1, _) = make_store(registry, "iris", tmp_path / "s")
    (store.model_dir("iris") / "previous.json").unlink()  # v1 is only the companion now
    model = v1.artifact("model")
    assert model is not None
    store.set_companion("iris", v1)
    store.gc()
    assert store.has_artifact(model.sha256, model.size)
    assert model.sha256 in store.referenced()
    store.set_companion("iris", None)
    store.gc()
    assert not store.artifact_path(model.sha256).exists()


_WRITE = """
import sys
from hybridml.edge.store import LocalStore
store = LocalStore(sys.argv[1])
store.set_companion("iris", store.active("iris"))
"""


@pytest.mark.parametrize("crash", ["before_replace:companion.json", None])
def test_a_crash_mid_write_leaves_the_old_or_the_new_companion(
        registry: Path, tmp_path: Path, crash: str | None) -> None:
    store, (v1, v2) = make_store(registry, "iris", tmp_path / "s")
    store.set_companion("iris", v1)
    env = dict(os.environ)
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    proc = subprocess.run([sys.executable, "-c", _WRITE, str(store.root)], env=env,
                          capture_output=True, timeout=60)
    kept = store.companion("iris")
    assert kept is not None
    if crash:
        assert proc.returncode == -signal.SIGKILL
        assert kept.dumps() == v1.dumps()  # the old one, whole
        assert store.clean_temp("iris") == 1  # the temp file the crash left
    else:
        assert proc.returncode == 0, proc.stderr
        assert kept.dumps() == v2.dumps()


# ---------------------------------------------------------------------------- the sync
class _Cloud(CloudClient):
    """A cloud that serves ``body`` as the manifest and the registry's blobs, except the
    ``corrupt`` ones (answered with other bytes)."""

    def __init__(self, registry: Path) -> None:
        super().__init__("http://127.0.0.1:9")
        self.reg = Registry(registry)
        self.body: dict[str, Any] = {}
        self.corrupt: set[str] = set()
        self.fetched: list[str] = []

    def manifest(self, name: str, etag: str | None = None, *, alias: str | None = None
                 ) -> ManifestResponse:
        text = json.dumps(self.body).encode()
        return ManifestResponse(text, f'"{len(text)}.{hash(text) & 0xffff:x}"', len(text))

    def download(self, sha256: str, dest: Path, size: int, *, cancel: Any = None) -> int:
        data = self.reg.blob_path(sha256).read_bytes()
        if sha256 in self.corrupt:
            data = bytes(len(data))
        dest.write_bytes(data)
        self.fetched.append(sha256)
        return len(data)

    def serve(self, served: Manifest, companion: Manifest | None, role: str = "canary"
              ) -> None:
        self.body = dict(served.raw)
        if companion is not None:
            self.body["rollout"] = block_for(served, companion, role)


def _fresh(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "device").ensure()


def _shas(m: Manifest) -> Iterable[str]:
    return [a.sha256 for a in m.artifacts if a.role in EDGE_ROLES]


def test_sync_fetches_the_companion_then_activates(registry: Path, tmp_path: Path) -> None:
    _, (v1, v2) = make_store(registry, "iris", tmp_path / "reg_store")
    cloud = _Cloud(registry)
    cloud.serve(v2, v1)
    store = _fresh(tmp_path)
    result = sync(store, cloud, "iris", UNSIGNED)
    assert (result.changed, result.version, result.role, result.rollout, result.companion,
            result.companion_error) == (True, 2, "canary", 7, 1, None)
    assert "companion.model" in result.downloaded and "model" in result.downloaded
    assert set(cloud.fetched) == {*_shas(v1), *_shas(v2)}
    kept = store.companion("iris")
    assert kept is not None and kept.version == 1
    assert result.to_json()["companion"] == 1

    # the same version without a block: the companion goes, and that is a change
    cloud.serve(v2, None)
    result = sync(store, cloud, "iris", UNSIGNED)
    assert (result.changed, result.role, result.companion) == (True, None, None)
    assert store.companion("iris") is None
    # the same manifest again: nothing changed
    assert not sync(store, cloud, "iris", UNSIGNED).changed
    # and back into the rollout under another role: a change again
    cloud.serve(v2, v1, "canary")
    assert sync(store, cloud, "iris", UNSIGNED).changed
    rt = EdgeRuntime(store, "iris", telemetry=False)
    assert rt.rollout is not None and rt.rollout.companion is not None


def test_a_companion_that_fails_is_not_fatal_and_is_reported(registry: Path,
                                                             tmp_path: Path) -> None:
    _, (v1, v2) = make_store(registry, "iris", tmp_path / "reg_store")
    cloud = _Cloud(registry)
    cloud.serve(v2, v1)
    cloud.corrupt = set(_shas(v1))
    store = _fresh(tmp_path)
    rt = EdgeRuntime(store, "iris", client=cloud, telemetry=False)
    result = rt.sync(UNSIGNED)
    assert (result.version, result.companion) == (2, None)
    assert result.companion_error is not None
    assert (result.companion_error["code"], result.companion_error["version"]) == \
        ("integrity", 1)
    assert rt.version == 2 and rt.rollout is not None and rt.rollout.companion is None
    assert store.companion("iris") is None
    assert "etag" not in store.sync_state("iris")  # the next sync asks again, and retries
    health = spooled(rt, "health")
    assert health == [{"format": 1, "model": "iris", "event": "load_failed", "version": 1,
                       "rollout": 7, "error": {"code": "integrity",
                                               "message": result.companion_error["message"]}}]
    # the cloud heals: the next sync fetches the companion, and the runtime loads it
    cloud.corrupt = set()
    result = rt.sync(UNSIGNED)
    assert (result.changed, result.companion) == (True, 1)
    assert rt.rollout is not None and rt.rollout.companion is not None


def test_a_served_version_that_fails_is_reported_with_its_rollout(registry: Path,
                                                                  tmp_path: Path) -> None:
    _, (v1, v2) = make_store(registry, "iris", tmp_path / "reg_store")
    cloud = _Cloud(registry)
    store = _fresh(tmp_path)
    cloud.serve(v1, None)
    rt = EdgeRuntime(store, "iris", client=cloud, telemetry=False)
    rt.sync(UNSIGNED)
    cloud.serve(v2, v1)
    cloud.corrupt = set(_shas(v2))
    with pytest.raises(IntegrityError) as err:
        rt.sync(UNSIGNED)
    assert (err.value.details["rollout"], err.value.details["version"]) == (7, 2)
    assert rt.version == 1 and store.companion("iris") is None  # stays on what it had
    [health] = spooled(rt, "health")
    assert (health["event"], health["version"], health["rollout"],
            health["error"]["code"]) == ("load_failed", 2, 7, "integrity")


def test_manifest_requests_carry_the_store_id(registry: Path, tmp_path: Path) -> None:
    server = ThreadCloud(registry)
    seen: list[str | None] = []
    inner = server.app.wsgi_app

    def noting(environ: dict[str, Any], start: Any) -> Any:
        if environ.get("PATH_INFO", "").endswith("/manifest"):
            seen.append(environ.get("HTTP_HYBRIDML_DEVICE"))
        return inner(environ, start)

    server.app.wsgi_app = noting  # type: ignore[method-assign]
    try:
        store = LocalStore(server.trust(tmp_path / "device"))
        client = CloudClient(server.url, token=server.token)
        sync(store, client, "iris")
        assert seen == [store_id(store.root)]
        assert client.store_id == store_id(store.root)
    finally:
        server.close()
