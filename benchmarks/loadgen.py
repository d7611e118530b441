"""Load generators for item 6, each in its own process: wrk when installed, else this script.

``python -m benchmarks.loadgen URL BODY_JSON CONNECTIONS SECONDS MAX_REQUESTS`` runs one thread
per connection, each POSTing BODY over a kept-alive ``http.client`` connection (reconnecting
when the server closes it), and prints ``{"requests", "errors", "seconds", "rps", "p50_ms",
"p99_ms"}``. Bounded by both time and request count.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .common import PY, ROOT, child_env, which


def _worker(host: str, port: int, path: str, body: bytes, deadline: float, budget: list[int],
            lock: threading.Lock, lat: list[float], errors: list[int]) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    headers = {"Content-Type": "application/json"}
    while time.perf_counter() < deadline:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                errors[0] += 1
            if resp.will_close:
                conn.close()
        except (OSError, http.client.HTTPException):
            errors[0] += 1
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=10)
            continue
        lat.append(time.perf_counter() - t0)
    conn.close()


def python_load(url: str, body: str, connections: int, seconds: float, max_requests: int
                ) -> dict[str, Any]:
    """Run the bounded Python client in this process and return its summary."""
    parts = urlsplit(url)
    deadline = time.perf_counter() + seconds
    budget, lock = [max_requests], threading.Lock()
    lats: list[list[float]] = [[] for _ in range(connections)]
    errors = [0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_worker, args=(parts.hostname, parts.port, parts.path,
                                                      body.encode(), deadline, budget, lock,
                                                      lats[i], errors))
               for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    all_lat = np.concatenate([np.asarray(x) for x in lats]) if any(lats) else np.zeros(0)
    n = int(all_lat.size)
    return {"tool": "python", "requests": n, "errors": errors[0], "seconds": round(elapsed, 3),
            "rps": round(n / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(float(np.percentile(all_lat, 50)) * 1000, 3) if n else None,
            "p99_ms": round(float(np.percentile(all_lat, 99)) * 1000, 3) if n else None}


def _ms(text: str) -> float:
    for unit, scale in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[:-len(unit)]) * scale
    return float(text)


def wrk_load(url: str, body: str, connections: int, seconds: float) -> dict[str, Any]:
    """Run wrk with a POST script; parse requests/s and the latency percentiles."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                 f"wrk.body = {json.dumps(body)}\n")
        script = fh.name
    try:
        out = subprocess.run(["wrk", "-t", "2", "-c", str(connections), "-d",
                              f"{max(1, round(seconds))}s", "--latency", "-s", script, url],
                             capture_output=True, text=True, timeout=seconds + 30, check=False)
    finally:
        Path(script).unlink(missing_ok=True)
    text = out.stdout
    res: dict[str, Any] = {"tool": "wrk", "raw": text[-1500:]}
    errors = 0
    for line in text.splitlines():
        s = line.split()
        if line.strip().startswith("50%"):
            res["p50_ms"] = _ms(s[1])
        elif line.strip().startswith("99%"):
            res["p99_ms"] = _ms(s[1])
        elif line.startswith("Requests/sec:"):
            res["rps"] = float(s[1])
        elif "requests in" in line:
            res["requests"] = int(s[0])
        elif "Non-2xx" in line or "Socket errors" in line:
            errors += sum(int(x.strip(",")) for x in s if x.strip(",").isdigit())
    res["errors"] = errors
    res["seconds"] = seconds
    return res


def load(url: str, body: str, connections: int, seconds: float, max_requests: int,
         use_wrk: bool = True) -> dict[str, Any]:
    """wrk if present (and allowed), else the Python client in a separate process."""
    if use_wrk and which("wrk"):
        return wrk_load(url, body, connections, seconds)
    proc = subprocess.run([PY, "-m", "benchmarks.loadgen", url, body, str(connections),
                           str(seconds), str(max_requests)], capture_output=True, text=True,
                          timeout=seconds + 60, env=child_env(), cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(python_load(a[0], a[1], int(a[2]), float(a[3]), int(a[4]))))
