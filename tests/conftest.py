"""Fixtures shared by every test package: trained registries and a real cloud server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

from hybridml.cloud.serve import free_port

BIN = Path(sys.executable).parent


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
    """A running ``hybridml-cloud serve`` on a loopback port."""

    url: str
    registry: Path
    port: int
    proc: subprocess.Popen[bytes] | None
    # Test servers run with --insecure (loopback, no tokens) unless a test asks for tokens.
    insecure: bool = True

    def stop(self) -> None:
        """Stop gunicorn and its workers."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def start(self, *extra: str) -> CloudServer:
        """Start (or restart) the server and wait for /healthz."""
        self.stop()
        cmd = [str(BIN / "hybridml-cloud"), "serve", "--registry", str(self.registry),
               "--port", str(self.port), *(["--insecure"] if self.insecure else []), *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"cloud exited with {self.proc.returncode}: {err}")
            try:
                if requests.get(self.url + "/healthz", timeout=0.5).ok:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise RuntimeError("cloud did not answer /healthz within 30 s")


def start_cloud(registry: Path, *extra: str, insecure: bool = True) -> CloudServer:
    """Start a server over ``registry`` on a free port (``insecure=False``: tokens required)."""
    port = free_port()
    return CloudServer(f"http://127.0.0.1:{port}", registry, port, None,
                       insecure).start(*extra)


@pytest.fixture(scope="session")
def orders_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The orders CSV (400 rows)."""
    return write_orders_csv(tmp_path_factory.mktemp("data") / "orders.csv")
