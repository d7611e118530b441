"""SD cards (docs/device.md §5): no write on the predict path, and an unchanged sync writes
nothing.

Real stores on the test's directory (a real disk here: ``/tmp`` is ext4 on this machine, and
``write_bytes`` counts nothing on a tmpfs, so ``wchar`` — every ``write`` syscall of the
process, whatever the filesystem — is asserted too). The measured day is
``benchmarks/sdcard.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.client import CloudClient
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.edge.telemetry import TelemetrySettings
from tests.edgekit import ThreadCloud, trusting

ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io`` (all its threads)."""
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(": ") for line in fh)}


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadCloud]:
    root = tmp_path_factory.mktemp("sd") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg", seed=0)
    reg.close()
    server = ThreadCloud(root)
    yield server
    server.close()


def device(cloud: ThreadCloud, root: Path) -> tuple[LocalStore, CloudClient]:
    store = trusting(LocalStore(root), cloud.registry)
    client = CloudClient(cloud.url, token=cloud.token)
    sync(store, client, "iris")
    return store, client


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_predictions_with_telemetry_on_write_nothing(cloud: ThreadCloud, tmp_path: Path
                                                     ) -> None:
    store, _ = device(cloud, tmp_path / "dev")
    rt = EdgeRuntime(store, "iris", telemetry=TelemetrySettings(ring=64))  # bins often
    answers = rt.predict(ROWS)  # warm: the first call loads what it needs
    rt.feedback(answers[0].prediction_id, "setosa")  # the spool is open (a write, before)
    os.sync()
    before = io_counters()
    for i in range(3000):
        rt.predict_one(ROWS[i % 3])
        if i % 100 == 0:
            _ = rt.predict(ROWS)[0].prediction_id  # batches, and ids handed out
    after = io_counters()
    assert (after["write_bytes"] - before["write_bytes"],
            after["wchar"] - before["wchar"], after["syscw"] - before["syscw"]) == (0, 0, 0)
    assert rt.flush()  # the counts were there, in memory
    rt.close()


def test_an_unchanged_sync_does_not_rewrite_sync_json(cloud: ThreadCloud, tmp_path: Path
                                                      ) -> None:
    store, client = device(cloud, tmp_path / "dev")
    state = store.model_dir("iris") / "sync.json"
    before = os.stat(state)
    for _ in range(3):
        assert not sync(store, client, "iris").changed  # 304s
    after = os.stat(state)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
