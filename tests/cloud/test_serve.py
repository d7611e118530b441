"""gunicorn's SheddingWorker: new connections go to the less busy worker (Linux /proc checks)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from hybridml.cloud.serve import _waiting
from tests.conftest import CloudServer, start_cloud

PROC = Path("/proc")
linux_only = pytest.mark.skipif(not (PROC / "net" / "tcp").exists(), reason="needs Linux /proc")
BODY = (b'{"inputs": [{"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, '
        b'"petal_width_cm": 0.2}]}')


def owner_by_client_port(server_port: int, pids: list[int]) -> dict[int, int]:
    """{client port: worker pid} for the server's established loopback connections."""
    inode_port: dict[str, int] = {}
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
        if state == "01" and int(local.split(":")[1], 16) == server_port:
            inode_port[inode] = int(remote.split(":")[1], 16)
    owners = {}
    for pid in pids:
        for fd in (PROC / str(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inode_port:
                owners[inode_port[target[8:-1]]] = pid
    return owners


def idle_workers(server: CloudServer, n: int) -> bool:
    """True when ``n`` workers run and each waits in epoll, its boot done."""
    pids = server.workers()
    waits = []
    for pid in pids:
        try:
            waits.append((PROC / str(pid) / "wchan").read_text())
        except OSError:
            return False
    return len(pids) == n and all("epoll" in w for w in waits)


@linux_only
def test_kept_alive_clients_are_spread_over_both_workers(iris_registry: Path, tmp_path: Path
                                                         ) -> None:
    root = tmp_path / "reg"
    shutil.copytree(iris_registry, root)
    server = start_cloud(root, "--workers", "2")
    conns: list[http.client.HTTPConnection] = []
    try:
        assert server.proc is not None
        # /healthz answered from one worker; let the other one boot before the clients come:
        # a booted worker waits in epoll for connections (its kernel wait channel says so).
        deadline = time.monotonic() + 20
        while not idle_workers(server, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert idle_workers(server, 2), "both workers did not finish booting in 20 s"
        conns = [http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                 for _ in range(16)]
        for c in conns:
            c.connect()
        for _ in range(3):  # a few rounds on every kept-alive connection, all at once
            for c in conns:
                c.request("POST", "/v1/models/iris/predict", BODY,
                          {"Content-Type": "application/json"})
            for c in conns:
                resp = c.getresponse()
                assert resp.status == 200 and not resp.will_close, resp.read()[:200]
                resp.read()
        workers = server.workers()
        owners = owner_by_client_port(server.port, workers)
        per_worker = Counter(owners[c.sock.getsockname()[1]] for c in conns)
        assert len(workers) == 2 and len(per_worker) == 2, per_worker
        assert min(per_worker.values()) >= 3, per_worker  # was 0-2 of 16 before
    finally:
        for c in conns:
            c.close()
        server.stop()


@linux_only
def test_waiting_counts_connections_not_yet_accepted() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        assert _waiting(listener) == 3
        listener.accept()[0].close()
        assert _waiting(listener) == 2
        for c in clients:
            c.close()


def test_server_module_does_not_load_onnxruntime_before_workers_fork() -> None:
    # A process forked from one that loaded onnxruntime hangs or aborts in its C++
    # destructors at exit: gunicorn's master must leave it to the workers.
    code = ("import sys, hybridml.cloud.serve, hybridml.cloud.cli; "
            "sys.exit('onnxruntime' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_workers_exit_cleanly_when_stopped_with_a_kept_alive_client(iris_registry: Path) -> None:
    server = start_cloud(iris_registry)
    proc = server.proc
    assert proc is not None
    with requests.Session() as client:  # keeps its connection open across the stop
        for _ in range(3):
            got = client.post(server.url + "/v1/models/iris/predict", data=BODY,
                              headers={"Content-Type": "application/json"}, timeout=10)
            assert got.status_code == 200, got.text
        server.stop()
    err = server.log_text()
    assert proc.returncode == 0, err
    assert "terminate called" not in err and "SIGABRT" not in err and "SIGKILL" not in err
