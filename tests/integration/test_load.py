"""Load on a real gunicorn (2 workers): capacity, a soak at capacity, overload that is shed.

The load comes from a separate process, this module run as ``python -m
tests.integration.test_load``: asyncio over raw keep-alive sockets, in closed loop (N
connections, each sending its next request when the last is answered) or open loop (a fixed
arrival rate, whatever the server does). In open loop each latency counts from the request's
*scheduled* send time, so a server that queues cannot hide it.

The default suite runs a short overload (a server configured to hold 2 requests per worker)
that must be shed with 503 + Retry-After and recovered from. The 60 s soak at capacity and the
3x-capacity run are ``@pytest.mark.load`` (excluded by default; run ``pytest -m load``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import CloudServer, start_cloud

ROOT = Path(__file__).resolve().parents[2]
PREDICT = "/v1/models/iris/predict"
ROWS = 100  # rows per request: a device's batch; keeps the generator's share of the CPU small
CAPACITY_CONNS = 16
_CL = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


def batch(n: int = ROWS) -> list[list[float]]:
    """``n`` iris rows in schema order."""
    return [[4.5 + (i % 9) * 0.4, 2.5 + (i % 4) * 0.3, 1.0 + (i % 6), 0.1 + (i % 5) * 0.5]
            for i in range(n)]


@dataclass
class LoadResult:
    """What the generator saw."""

    counts: dict[str, int]  # by status code, or by exception name for failed requests
    duration_s: float
    ok_per_s: float
    p50_ms: float | None  # of 200 answers
    p99_ms: float | None
    shed_p99_ms: float | None  # of 503 answers
    served_p99_ms: float | None  # of 200 answers, from when the request was actually written
    send_lag_p99_ms: float | None  # how far the generator fell behind its schedule
    drain_s: float  # from the end of the offered load to the last answer (the queue left)
    client_cpu_s: float
    timeline: dict[str, dict[str, int]]  # second -> status -> count
    sample_503: str

    @property
    def errors(self) -> int:
        """Requests that got no HTTP answer (reset, timeout, ...)."""
        return sum(v for k, v in self.counts.items() if not k.isdigit())

    @property
    def total(self) -> int:
        """All requests sent."""
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        """The figures worth printing."""
        return {k: v for k, v in self.__dict__.items() if k not in ("timeline", "sample_503")}


def run_load(port: int, *, duration: float, conns: int, rate: float = 0.0,
             rows: int = ROWS) -> LoadResult:
    """Run the generator in its own process: open loop at ``rate`` req/s, else closed loop."""
    cmd = [sys.executable, "-m", "tests.integration.test_load", "--port", str(port),
           "--duration", str(duration), "--conns", str(conns), "--rate", str(rate),
           "--rows", str(rows)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=duration + 60)
    return LoadResult(**json.loads(out.stdout))


# ------------------------------------------------------------------------------ generator
async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    m = _CL.search(head)
    body = await reader.readexactly(int(m.group(1))) if m else b""
    return int(head[9:12]), head + body


async def _generate(port: int, request: bytes, rate: float, duration: float, conns: int,
                    timeout: float = 5.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[float | None] = asyncio.Queue()
    counts: Counter[str] = Counter()
    latency: dict[int, list[float]] = defaultdict(list)
    timeline: dict[int, Counter[str]] = defaultdict(Counter)
    sample: list[str] = []
    served: list[float] = []  # 200s, from the moment the request was written
    lag: list[float] = []  # how late the generator sent each request (open loop)
    done = [0.0]  # when the last answer arrived
    t0 = loop.time() + 0.05
    end = t0 + duration

    in_flight: dict[int, tuple[float, asyncio.StreamWriter]] = {}  # connection -> sent at
    timed_out: set[int] = set()

    async def watchdog() -> None:
        # One timer for all connections: asyncio.wait_for per request costs a task each.
        while True:
            await asyncio.sleep(0.1)
            now = loop.time()
            for c, (sent, writer) in list(in_flight.items()):
                if now - sent > timeout:
                    timed_out.add(c)
                    writer.transport.abort()

    async def connection(c: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        used = 0.0
        while (scheduled := await queue.get()) is not None:
            sent = loop.time()
            start = scheduled if rate else sent
            if writer is not None and sent - used > 4.0:  # gunicorn closes idle ones at 5 s
                writer.close()
                writer = None
            used = sent
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                assert reader is not None
                in_flight[c] = (sent, writer)
                writer.write(request)
                status, raw = await _answer(reader)
                key = str(status)
                latency[status].append(loop.time() - start)
                if status == 200:
                    served.append(loop.time() - sent)
                if status == 503 and not sample:
                    sample.append(raw.decode("latin-1"))
                if b"connection: close" in raw[:raw.find(b"\r\n\r\n")].lower():
                    writer.close()
                    writer = None
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                    ValueError) as exc:
                key = "Timeout" if c in timed_out else type(exc).__name__
                timed_out.discard(c)
                if writer is not None:
                    writer.close()
                    writer = None
            in_flight.pop(c, None)
            lag.append(sent - start)
            counts[key] += 1
            done[0] = loop.time()
            timeline[int(done[0] - t0)][key] += 1
            if not rate and loop.time() < end:
                queue.put_nowait(0.0)
        if writer is not None:
            writer.close()

    dog = asyncio.create_task(watchdog())
    tasks = [asyncio.create_task(connection(c)) for c in range(conns)]
    if rate:  # open loop: release requests on schedule, whatever the answers do
        total, sent = int(rate * duration), 0
        while sent < total:
            due = min(total, int((loop.time() - t0) * rate) + 1)
            for i in range(sent, due):
                queue.put_nowait(t0 + i / rate)
            sent = due
            await asyncio.sleep(0.002)
    else:
        for _ in range(conns):
            queue.put_nowait(0.0)
        await asyncio.sleep(max(0.0, end - loop.time()))
    for _ in range(conns):
        queue.put_nowait(None)
    await asyncio.gather(*tasks)
    dog.cancel()

    def pct(xs: list[float], q: float) -> float | None:
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 2) if xs else None

    return {"counts": dict(counts), "duration_s": duration,
            "ok_per_s": round(counts["200"] / duration, 1),
            "p50_ms": pct(latency[200], 0.5), "p99_ms": pct(latency[200], 0.99),
            "shed_p99_ms": pct(latency[503], 0.99), "served_p99_ms": pct(served, 0.99),
            "send_lag_p99_ms": pct(lag, 0.99), "drain_s": round(max(0.0, done[0] - end), 3),
            "timeline": {str(s): dict(c) for s, c in sorted(timeline.items())},
            "sample_503": sample[0] if sample else ""}


def main(argv: list[str] | None = None) -> None:
    """Generator entry point: prints a LoadResult as JSON."""
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--rate", type=float, default=0.0)
    p.add_argument("--rows", type=int, default=ROWS)
    a = p.parse_args(argv)
    body = json.dumps({"inputs": batch(a.rows)}).encode()
    request = (f"POST {PREDICT} HTTP/1.1\r\nHost: 127.0.0.1:{a.port}\r\n"
               "Content-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    cpu = time.process_time()
    result = asyncio.run(_generate(a.port, request, a.rate, a.duration, a.conns))
    result["client_cpu_s"] = round(time.process_time() - cpu, 2)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------- tests
def predict_once(server: CloudServer) -> int:
    """Status of one batch prediction."""
    return requests.post(server.url + PREDICT, json={"inputs": batch()}, timeout=10).status_code


def wait_recovered(server: CloudServer, limit_s: float = 15.0) -> float:
    """Seconds until predictions answer 200 again; then 20 in a row must."""
    t0 = time.monotonic()
    while predict_once(server) != 200:
        assert time.monotonic() - t0 < limit_s, "the server did not recover"
        time.sleep(0.02)
    took = time.monotonic() - t0
    assert all(predict_once(server) == 200 for _ in range(20))
    return took


@pytest.fixture
def small_cloud(registry_copy: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CloudServer]:
    """gunicorn, 2 workers x 2 threads, 503 past 2 pending requests per worker."""
    monkeypatch.setenv("HYBRIDML_MAX_PENDING", "2")
    monkeypatch.setenv("HYBRIDML_THREADS", "2")
    server = start_cloud(registry_copy)
    yield server
    server.stop()


def test_overload_is_shed_with_503_and_the_server_recovers(small_cloud: CloudServer) -> None:
    assert predict_once(small_cloud) == 200
    result = run_load(small_cloud.port, duration=3, conns=48, rate=1500)
    assert result.counts.get("503", 0) > 0 and result.counts.get("200", 0) > 0
    assert set(result.counts) <= {"200", "503"}, result.counts  # answers, not resets
    head, _, body = result.sample_503.partition("\r\n\r\n")
    assert "retry-after: 1" in head.lower()
    assert json.loads(body)["error"]["code"] == "overloaded"
    wait_recovered(small_cloud)
    assert small_cloud.proc is not None and small_cloud.proc.poll() is None
    assert requests.get(small_cloud.url + "/healthz", timeout=5).json()["status"] == "ok"


@pytest.fixture
def load_cloud(registry_copy: Path) -> Iterator[CloudServer]:
    """gunicorn with the default settings (2 workers, ServeConfig defaults)."""
    server = start_cloud(registry_copy)
    run_load(server.port, duration=2, conns=CAPACITY_CONNS)  # warm both workers
    yield server
    server.stop()


def report(label: str, result: LoadResult, **extra: Any) -> None:
    """Print a run's figures (pytest -s shows them)."""
    print(f"\n{label}: " + json.dumps(result.summary() | extra))


@pytest.mark.load
def test_capacity_holds_for_a_60_s_soak_without_errors(load_cloud: CloudServer) -> None:
    capacity = run_load(load_cloud.port, duration=10, conns=CAPACITY_CONNS)
    report("capacity", capacity)
    soak_s = float(os.environ.get("HYBRIDML_LOAD_SOAK_S", "60"))
    soak = run_load(load_cloud.port, duration=soak_s, conns=CAPACITY_CONNS)
    report("soak", soak)
    assert soak.counts == {"200": soak.total} and soak.total > 0


@pytest.mark.load
def test_three_times_capacity_is_shed_and_the_server_recovers(
        load_cloud: CloudServer) -> None:
    capacity = run_load(load_cloud.port, duration=8, conns=CAPACITY_CONNS)
    report("capacity", capacity)
    rate = 3 * capacity.ok_per_s
    overload_s = float(os.environ.get("HYBRIDML_LOAD_OVERLOAD_S", "30"))
    over = run_load(load_cloud.port, duration=overload_s, conns=512, rate=rate)
    probe_s = wait_recovered(load_cloud)
    shed = over.counts.get("503", 0) / max(over.total, 1)
    report("3x", over, offered_per_s=rate, shed_share=round(shed, 3),
           recovery_s=round(over.drain_s + probe_s, 3))
    assert shed > 0 and over.counts.get("200", 0) > 0
    assert over.errors == 0, over.counts  # every request was answered: nothing queued to a timeout


if __name__ == "__main__":
    main()
