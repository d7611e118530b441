"""Fixtures shared by every test package: trained registries and a real cloud server."""

from __future__ import annotations

import itertools
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import requests

# Fixtures of the real PostgreSQL and SeaweedFS servers (session-wide; see tests/servers.py).
from tests.servers import pg_server, pg_url, s3_bucket, s3_server, stop_group  # noqa: F401

# The modules that take a minute or more (benchmark smoke runs, the demos, server fleets) run
# first: `make test` hands whole modules to its workers in collection order, and a long module
# collected last would leave the other workers idle while it finishes alone.
LONG_MODULES = ("test_bench_fleet_smoke.py", "test_demos.py", "test_bench_smoke.py",
                "test_failover.py", "test_fleet_rollouts.py", "test_fleet_backends.py",
                "test_parity_ties.py", "test_precompute.py", "test_storage_backends.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Long modules first, in :data:`LONG_MODULES` order; the rest keep theirs."""
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


BIN = Path(sys.executable).parent
START_TIMEOUT_S = 30.0


def write_orders_csv(path: Path, n: int = 400, seed: int = 0) -> Path:
    """A mixed numeric/categorical CSV with missing values: food-delivery orders."""
    rng = np.random.default_rng(seed)
    lines = ["restaurant,hour,distance_km,rain,items,delivery_minutes,late"]
    for _ in range(n):
        rest = f"r{rng.integers(0, 5):03d}"
        hour = int(rng.integers(8, 23))
        dist = round(float(rng.uniform(0.5, 9.0)), 2)
        rain = str(rng.choice(["yes", "no", ""]))
        items = int(rng.integers(1, 8))
        minutes = 10 + 3.5 * dist + 1.5 * items + (8 if rain == "yes" else 0) + \
            (5 if rest == "r003" else 0) + rng.normal(0, 2)
        late = "late" if minutes > 35 else "on_time"
        dist_s = "" if rng.random() < 0.05 else str(dist)
        lines.append(f"{rest},{hour},{dist_s},{rain},{items},{minutes:.1f},{late}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class CloudServer:
    """``hybridml-cloud serve`` on loopback: any free port at first, the same one on restart.

    The server binds port 0 and writes its URL to a ready file, so no port is chosen here
    and bound later by someone else. Its stderr goes to ``log_path`` (under ``log_dir``,
    by default next to the registry, in the test's temporary directory).
    """

    registry: Path
    # Test servers run with --insecure (loopback, no tokens) unless a test asks for tokens.
    insecure: bool = True
    log_dir: Path | None = None
    port: int = 0  # 0 until the first start
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _runs: itertools.count[int] = field(default_factory=itertools.count, repr=False)
    ca: Path | None = None  # the CA file of a server started with --certfile (https)

    def workers(self) -> list[int]:
        """PIDs of the gunicorn workers: the children of the server's process."""
        assert self.proc is not None
        out = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                out.append(int(stat.parent.name))
        return out

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        stop_group(self.proc)
        self.proc = None

    def start(self, *extra: str) -> CloudServer:
        """Start (or restart on the same port) and wait for /healthz.

        A restart retries while the old port is still taken (by a lingering process, say).
        """
        self.stop()
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="serve-", dir=self.registry.parent))
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            run = next(self._runs)
            ready = self.log_dir / f"ready-{run}"
            self.log_path = self.log_dir / f"serve-{run}.log"
            cmd = [str(BIN / "hybridml-cloud"), "serve", "--registry", str(self.registry),
                   "--port", str(self.port), "--ready-file", str(ready),
                   *(["--insecure"] if self.insecure else []), *extra]
            with self.log_path.open("wb") as err:
                self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err,
                                             start_new_session=True)
            url = self._wait_for_file(ready, deadline)
            if url is not None:
                break
            log = self.log_text()
            if self.port and "in use" in log and time.monotonic() < deadline:
                continue  # the same port, briefly taken: try again
            raise RuntimeError(f"cloud exited with {self.proc.returncode}:\n{log[-3000:]}")
        self.url, self.port = url, int(url.rsplit(":", 1)[1])
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/healthz", timeout=1,
                                verify=str(self.ca) if self.ca else True).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cloud did not answer /healthz within {START_TIMEOUT_S:g} s:\n"
                           f"{self.log_text()[-3000:]}")

    def _wait_for_file(self, ready: Path, deadline: float) -> str | None:
        """The URL in ``ready`` once written; None if the server exited first."""
        assert self.proc is not None
        while time.monotonic() < deadline:
            if ready.exists():
                return ready.read_text().strip()
            if self.proc.poll() is not None:
                return None
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"cloud did not listen within {START_TIMEOUT_S:g} s:\n"
                           f"{self.log_text()[-3000:]}")

    def trust(self, store: Path) -> Path:
        """Provision the device store at ``store`` with this cloud's signing key (created if
        the registry has none; the server signs with it from its next request)."""
        from tests.edgekit import trusting

        trusting(store, self.registry)
        return store

    def log_text(self) -> str:
        """What the server wrote to stderr so far (its last run)."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")


def start_cloud(registry: Path, *extra: str, insecure: bool = True,
                log_dir: Path | None = None, ca: Path | None = None) -> CloudServer:
    """Start a server over ``registry`` on a free port (``insecure=False``: tokens required;
    ``ca``: the CA that signed the ``--certfile`` passed in ``extra``)."""
    return CloudServer(registry, insecure, log_dir, ca=ca).start(*extra)


@pytest.fixture(scope="session")
def orders_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The orders CSV (400 rows)."""
    return write_orders_csv(tmp_path_factory.mktemp("data") / "orders.csv")
