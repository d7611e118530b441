"""The device keeps its disk: after every activation and rollback only two versions remain.

Seven iris versions are served by the real cloud app (``tests.edgekit.ThreadCloud``); the edge
syncs each in turn, over HTTP, as a device would after a daily retrain.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import PART_MAX_AGE_S, LocalStore
from hybridml.shared.files import CRASH_ENV
from hybridml.shared.manifest import EDGE_ROLES
from tests.conftest import BIN
from tests.edgekit import ThreadCloud, install, iris_registry

VERSIONS = 7
ROW = [5.1, 3.5, 1.4, 0.2]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Seven iris versions, each a different model (different splits)."""
    return iris_registry(tmp_path_factory.mktemp("gc") / "reg", VERSIONS)


@pytest.fixture(scope="module")
def cloud(registry: Path) -> Iterator[ThreadCloud]:
    """The cloud app over the registry."""
    server = ThreadCloud(registry)
    yield server
    server.close()


def kept_files(store: LocalStore) -> set[str]:
    """Artifact file names in the store."""
    return {p.name for p in store.artifacts.iterdir()}


def version_files(store: LocalStore) -> set[str]:
    """The artifacts the active and previous versions name."""
    return store.referenced()


def promote(registry: Path, version: int) -> None:
    reg = Registry(registry)
    reg.set_alias("iris", "stable", version)
    reg.close()


def test_syncing_six_new_versions_leaves_only_two_versions_files(
        registry: Path, cloud: ThreadCloud, tmp_path: Path) -> None:
    store = LocalStore(cloud.trust(tmp_path / "store"))
    rt = EdgeRuntime(store, "iris", cloud.url, token=cloud.token)
    shas: dict[int, set[str]] = {}
    for v in range(1, VERSIONS + 1):
        promote(registry, v)
        result = rt.sync()
        assert result.changed and result.version == v
        manifest = store.require_active("iris")
        shas[v] = {a.sha256 for a in manifest.artifacts if a.role in EDGE_ROLES}
        assert rt.predict([ROW])[0].model_version == v
        assert kept_files(store) == set().union(*(shas[k] for k in (v - 1, v) if k in shas))
    assert len(shas) == VERSIONS and len(set().union(*shas.values())) > 2
    # Both kept versions are whole: the way back still works after all that cleaning.
    assert rt.rollback().version == VERSIONS - 1
    assert rt.predict([ROW])[0].model_version == VERSIONS - 1
    assert kept_files(store) == shas[VERSIONS - 1] | shas[VERSIONS]
    promote(registry, 1)


def test_status_shows_the_store_bytes_on_disk(cloud: ThreadCloud, tmp_path: Path) -> None:
    store = LocalStore(cloud.trust(tmp_path / "store"))
    EdgeRuntime(store, "iris", cloud.url, token=cloud.token).sync()
    done = subprocess.run([str(BIN / "hybridml-edge"), "status", "--store", str(store.root),
                           "--json"], capture_output=True, text=True, timeout=60, check=True)
    disk = json.loads(done.stdout)["disk_bytes"]
    files = sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
    assert disk == files and disk > sum((store.artifacts / f).stat().st_size
                                        for f in kept_files(store))
    text = subprocess.run([str(BIN / "hybridml-edge"), "status", "--store", str(store.root)],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"({disk:,} B on disk)" in text.splitlines()[0]


def _store_with_leftovers(registry: Path, tmp_path: Path) -> LocalStore:
    """v2 active, v1 previous, plus v3's artifacts (referenced by nothing), a fresh and a
    stale partial download."""
    store = LocalStore(tmp_path / "store")
    reg = Registry(registry)
    install(reg, "iris", store, 3)
    install(reg, "iris", store, 1)
    install(reg, "iris", store, 2)
    reg.close()
    (store.artifacts / f"{'a' * 64}.part").write_bytes(b"x" * 100)
    stale = store.artifacts / f"{'b' * 64}.part"
    stale.write_bytes(b"y" * 100)
    old = time.time() - PART_MAX_AGE_S - 60
    os.utime(stale, (old, old))
    return store


def test_gc_removes_what_no_kept_version_needs_and_abandoned_downloads(
        registry: Path, tmp_path: Path) -> None:
    store = _store_with_leftovers(registry, tmp_path)
    before = kept_files(store)
    result = store.gc()
    assert result is not None and result.files == len(before) - len(version_files(store)) - 1
    assert kept_files(store) == version_files(store) | {f"{'a' * 64}.part"}
    assert store.gc() == type(result)(0, 0)  # nothing left to do


def test_gc_waits_for_a_sync_in_progress(registry: Path, tmp_path: Path) -> None:
    store = _store_with_leftovers(registry, tmp_path)
    before = kept_files(store)
    with store.shared():  # a sync of another model is landing artifacts
        assert store.gc() is None
    assert kept_files(store) == before
    assert store.gc() is not None


def test_sigkill_mid_gc_leaves_the_kept_versions_whole(registry: Path, tmp_path: Path) -> None:
    store = _store_with_leftovers(registry, tmp_path)
    env = {**os.environ, CRASH_ENV: "mid_gc"}
    code = "import sys; from hybridml.edge.store import LocalStore; LocalStore(sys.argv[1]).gc()"
    killed = subprocess.run([sys.executable, "-c", code, str(store.root)], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert version_files(store) <= kept_files(store)  # some leftovers went, no kept file
    rt = EdgeRuntime(store, "iris")
    assert rt.version == 2 and rt.predict([ROW])[0].model_version == 2
    assert rt.rollback().version == 1  # the way back is whole too; its gc finishes the job
    assert kept_files(store) == version_files(store) | {f"{'a' * 64}.part"}
