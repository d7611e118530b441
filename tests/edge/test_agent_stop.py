"""``hybridml-edge agent`` under systemd's stop: SIGTERM ends it cleanly, with exit code 0.

A real ``hybridml-edge agent`` process syncs from the real cloud app (``ThreadCloud``) through
a fault proxy that drips every artifact one byte at a time. SIGTERM mid-download abandons the
download (its ``.part`` stays), activates nothing and closes the spool; the next sync resumes
the ``.part`` with a Range request. SIGTERM while the agent waits between cycles ends it too.
The bounds below are generous stop deadlines (systemd's ``TimeoutStopSec``), not timings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.shared.manifest import EDGE_ROLES, Manifest
from tests.conftest import BIN
from tests.edgekit import ThreadCloud, iris_registry
from tests.integration.proxy import Fault, FaultProxy

NAME = "iris"
STOP_BOUND_S = 30.0  # systemd's TimeoutStopSec in the unit we ship is 45 s


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadCloud]:
    """The cloud app (tokens required) over a registry with one iris version."""
    server = ThreadCloud(iris_registry(tmp_path_factory.mktemp("stop") / "reg"))
    yield server
    server.close()


def start_agent(cloud: ThreadCloud, url: str, store: Path, log: Path) -> subprocess.Popen[bytes]:
    """``hybridml-edge agent`` as systemd would start it (the token in the environment)."""
    env = dict(os.environ, HYBRIDML_TOKEN=cloud.token)
    with log.open("wb") as err:
        return subprocess.Popen(
            [str(BIN / "hybridml-edge"), "agent", "--store", str(store), "--name", NAME,
             "--cloud", url, "--interval", "3600", "--verbose"],
            stdout=subprocess.DEVNULL, stderr=err, env=env)


def wait_for(check: object, proc: subprocess.Popen[bytes], log: Path,
             timeout_s: float = 60.0) -> None:
    """Poll ``check()`` until true; fail with the agent's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert proc.poll() is None, f"agent exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"gave up waiting:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], log: Path) -> int:
    """SIGTERM, then the exit code (killed and failed past :data:`STOP_BOUND_S`)."""
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=STOP_BOUND_S)
        print(f"AGENTSTOP exit {code} {time.monotonic() - t0:.2f} s after SIGTERM")
        return code
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the agent ignored SIGTERM for {STOP_BOUND_S:g} s:\n"
                    f"{log.read_text()[-3000:]}")


def part_files(store: Path) -> list[Path]:
    """The partial downloads in the store."""
    art = store / "artifacts"
    return sorted(art.glob("*.part")) if art.is_dir() else []


def test_sigterm_mid_download_exits_0_keeps_the_part_and_the_next_sync_resumes(
        cloud: ThreadCloud, tmp_path: Path) -> None:
    store = LocalStore(cloud.trust(tmp_path / "store"))
    log = tmp_path / "agent.log"
    with FaultProxy(cloud.url) as proxy:
        proxy.add(Fault(path="/v1/artifacts/", drip_s=0.01, identity=True))
        proc = start_agent(cloud, proxy.url, store.root, log)
        try:
            # Some bytes are through (the .part file is written in buffered blocks).
            wait_for(lambda: any(len(x.body_sent) >= 100
                                 for x in proxy.requests_to("/v1/artifacts/")), proc, log)
        finally:
            code = stop(proc, log)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "stopping mid-sync" in text and "the next sync resumes it" in text
    assert store.active(NAME) is None  # nothing half-activated
    [part] = part_files(store.root)
    have = part.stat().st_size
    sha = part.name.removesuffix(".part")
    manifest = Manifest.from_json(Registry(cloud.registry).manifest(NAME, "stable"))
    size = next(a.size for a in manifest.artifacts if a.sha256 == sha)
    assert 0 < have < size
    assert not (store.root / "telemetry.db-wal").exists()  # the spool was closed cleanly

    others = sum(a.size for a in manifest.artifacts if a.role in EDGE_ROLES
                 and a.sha256 != sha and not store.has_artifact(a.sha256, a.size))
    client = CloudClient(cloud.url, token=cloud.token)
    result = sync(store, client, NAME)
    client.close()
    assert result.changed and result.version == 1
    # The cut artifact: only its missing bytes were fetched (a Range request); others whole.
    assert result.bytes_downloaded == size - have + others
    assert store.require_active(NAME).version == 1
    assert part_files(store.root) == []


def test_sigterm_while_idle_between_cycles_exits_0(cloud: ThreadCloud, tmp_path: Path) -> None:
    store = LocalStore(cloud.trust(tmp_path / "store"))
    log = tmp_path / "agent.log"
    proc = start_agent(cloud, cloud.url, store.root, log)
    try:
        wait_for(lambda: "last_sync" in store.sync_state(NAME), proc, log)
    finally:
        code = stop(proc, log)
    assert code == 0, log.read_text()[-3000:]
    assert store.require_active(NAME).version == 1
    assert "signal 15" in log.read_text()
