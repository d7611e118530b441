"""SIGKILL at every step of sync, activation and rollback: the store is never broken.

``hybridml-edge sync`` runs as a subprocess with ``HYBRIDML_TEST_CRASH_AT=<step>`` (the hook in
``hybridml.shared.files.crash_point``), which makes it SIGKILL itself at that step. After each
kill, ``hybridml-edge status`` must report a whole version — the old one before ``active.json``
is replaced, the new one after — the runtime must serve it, and the next sync must finish the
job and leave no temp or partial file behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from hybridml.edge import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.files import CRASH_ENV
from tests.conftest import BIN
from tests.integration.faultkit import (
    NAME,
    TwoVersions,
    assert_intact,
    fresh_store,
    leftovers,
    two_versions,
)

__all__ = ["two_versions"]  # the fixture, imported so pytest finds it here

# Each step of one sync, in order, and the version the store must be on after a kill there.
SYNC_STEPS = [
    ("mid_download", 1),
    ("after_download", 1),
    ("after_commit", 1),
    ("after_verify", 1),
    ("before_replace:previous.json", 1),
    ("after_previous", 1),
    ("before_replace:active.json", 1),
    ("after_active", 2),
    ("before_replace:sync.json", 2),
]


def edge(*args: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``hybridml-edge`` with the crash hook armed at ``crash_at``."""
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run([str(BIN / "hybridml-edge"), *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def status(store: LocalStore) -> dict[str, object]:
    """``hybridml-edge status --json`` for the fault model."""
    done = edge("status", "--store", str(store.root), "--name", NAME, "--json")
    assert done.returncode == 0, done.stderr
    models = json.loads(done.stdout)["models"]
    assert len(models) == 1
    return dict(models[0])


@pytest.mark.parametrize(("step", "expected"), SYNC_STEPS)
def test_sigkill_during_sync_leaves_old_or_new_version_and_next_sync_finishes(
        two_versions: TwoVersions, tmp_path: Path, step: str, expected: int) -> None:
    tv = two_versions
    store = fresh_store(tv, tmp_path / "s")
    killed = edge("sync", "--store", str(store.root), "--cloud", tv.cloud.url, "--name", NAME,
                  crash_at=step)
    assert killed.returncode == -signal.SIGKILL, f"{step}: {killed.stderr}"

    st = status(store)
    assert st["active_version"] == expected, f"after a kill at {step}"
    rt = EdgeRuntime(store, NAME)
    assert rt.version == expected
    assert rt.predict([tv.row()])[0].model_version == expected

    result = EdgeRuntime(store, NAME, tv.cloud.url).sync()
    assert result.version == 2
    _, size = tv.model2
    if step == "mid_download":
        assert 0 < result.bytes_downloaded < size  # resumed, not started over
    elif expected == 1:
        assert result.bytes_downloaded == 0  # the finished download was kept
    assert_intact(store, 2, tv.row())
    assert status(store)["active_version"] == 2


@pytest.mark.parametrize("step", ["rollback_journal", "rollback_between"])
def test_sigkill_mid_rollback_serves_the_rolled_back_version_and_keeps_the_way_back(
        two_versions: TwoVersions, tmp_path: Path, step: str) -> None:
    tv = two_versions
    store = fresh_store(tv, tmp_path / "s")
    EdgeRuntime(store, NAME, tv.cloud.url).sync()
    killed = edge("rollback", "--store", str(store.root), "--name", NAME, crash_at=step)
    assert killed.returncode == -signal.SIGKILL
    # The journal committed the swap: v1 is served and v2 is still the way back, whether or
    # not the pointers were rewritten yet.
    st = status(store)
    assert st["active_version"] == 1 and st["previous_version"] == 2
    assert_intact(store, 1, tv.row())
    again = edge("rollback", "--store", str(store.root), "--name", NAME)
    assert again.returncode == 0, again.stderr
    st = status(store)
    assert st["active_version"] == 2 and st["previous_version"] == 1
    assert_intact(store, 2, tv.row())
    assert not (store.model_dir(NAME) / "rollback.json").exists()
    assert leftovers(store) == []


def test_sigkill_mid_download_then_cloud_gone_still_serves_old_version(
        two_versions: TwoVersions, tmp_path: Path) -> None:
    tv = two_versions
    store = fresh_store(tv, tmp_path / "s")
    killed = edge("sync", "--store", str(store.root), "--cloud", tv.cloud.url, "--name", NAME,
                  crash_at="mid_download")
    assert killed.returncode == -signal.SIGKILL
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    failed = edge("sync", "--store", str(store.root), "--cloud", dead, "--name", NAME)
    assert failed.returncode == 2 and "cannot reach the cloud" in failed.stderr
    st = status(store)
    assert st["active_version"] == 1 and "cloud_unavailable" in str(st["last_error"])
    assert_intact(store, 1, tv.row(), allow_part=True)
