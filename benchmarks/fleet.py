"""Item 7: a fleet of simulated edge devices against one cloud (gunicorn, 2 workers).

Each device is a real :class:`LocalStore` directory and :class:`CloudClient` driven by the
kit's ``sync()``. Per fleet size N: a rollout (every device syncs for the first time and
downloads the model and table), then steady state (each device does a bounded number of rounds
of one conditional sync — a 304 — and one fallback prediction). A thread pool of fixed size
drives the devices; the cloud's CPU is read from /proc for its whole process group.

:class:`Device` is also the device of the fleet-scale suite (:mod:`benchmarks.fleet_scale`):
there it takes several replica URLs and keeps a telemetry spool it pushes. That suite drives
its devices with :class:`Fleet` (closed-loop or paced, faults at a share of the work),
records every request with :class:`Recorder` and samples the CPU of every process of the
setup and PostgreSQL's connections with :class:`Sampler`; they live here, with the device.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import Stats, log, proc_stats
from .servers import cloud
from .workspace import Model, provision

if TYPE_CHECKING:
    from hybridml.edge.push import PushResult
    from hybridml.edge.sync import SyncResult


class Device:
    """One simulated device: a store and a client (of one cloud URL, or of several replicas,
    failing over between them as :class:`~hybridml.edge.client.CloudClient` does).

    ``registry`` provisions the store with the registry's signing key; without it ``root``
    must already be a provisioned store (a copy of a template: 1,000 devices are made fast).
    With ``spool`` the device keeps a telemetry spool: :meth:`record` adds records to it and
    :meth:`push` uploads them; :attr:`sent` keeps every id it made, to count at the end.
    """

    def __init__(self, root: Path, url: str | Sequence[str], name: str, i: int,
                 registry: Path | None = None, *, spool: bool = False) -> None:
        from hybridml.edge.client import CloudClient
        from hybridml.edge.spool import Spool
        from hybridml.edge.store import LocalStore

        store_dir = root / f"dev{i:04d}" if registry is not None else root
        if registry is not None:
            provision(store_dir, registry)
        self.store = LocalStore(store_dir)
        self.client = CloudClient(url, device=f"dev{i:04d}")
        self.name = name
        self.spool = Spool.open(store_dir) if spool else None
        self.sent: list[str] = []
        self._ticks = 0

    def sync(self) -> bool:
        """One sync; True if a new version was activated."""
        return self.sync_result().changed

    def sync_result(self) -> SyncResult:
        """One sync, and what it did (bytes by origin, the replica used)."""
        from hybridml.edge.sync import sync

        return sync(self.store, self.client, self.name)

    def fallback(self, row: Any) -> None:
        """One cloud prediction, as the fallback path sends it."""
        self.client.predict(self.name, [row], 2.0)

    def record(self, n: int) -> list[str]:
        """Spool ``n`` small health records (a heartbeat, as a device's agent writes one)."""
        assert self.spool is not None, "a Device(spool=True) keeps records"
        self._ticks += 1
        body = {"event": "heartbeat", "model": self.name, "tick": self._ticks}
        ids = self.spool.add_many([("health", dict(body, part=k), None, None)
                                   for k in range(n)])
        self.sent += ids
        return ids

    def push(self) -> PushResult:
        """Upload the spool (what the cloud does not take stays for the next push)."""
        from hybridml.edge.push import push

        assert self.spool is not None, "a Device(spool=True) keeps records"
        return push(self.spool, self.client)

    def close(self) -> None:
        """Close the connection pool and the spool."""
        self.client.close()
        if self.spool is not None:
            self.spool.close()


# ------------------------------------------------------------------------- fleet scale: driving
class Recorder:
    """Every request the devices made: (time, phase, kind, ms, error code or None)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.ops: list[tuple[float, str, str, float, str | None]] = []
        self.bytes: dict[str, dict[str, int]] = {}
        self.phases: list[Any] = []  # fleet_scale.Phase
        self.faults: list[dict[str, Any]] = []
        self.examples: dict[str, str] = {}
        self.phase = ""
        self._lock = threading.Lock()

    def now(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.t0

    def op(self, kind: str, ms: float, error: str | None = None, message: str = "") -> None:
        """Record one request (list.append is atomic under the GIL); the first message of
        each error code is kept as its example."""
        self.ops.append((self.now(), self.phase, kind, ms, error))
        if error is not None and error not in self.examples:
            self.examples[error] = message[:300]

    def add_bytes(self, **counts: int) -> None:
        """Add byte counts to the current phase."""
        with self._lock:
            got = self.bytes.setdefault(self.phase, {})
            for k, v in counts.items():
                got[k] = got.get(k, 0) + v


class Sampler:
    """Every ``every_s``: CPU seconds of each process of the setup (a process that died and
    came back keeps its total) and PostgreSQL's client connections."""

    def __init__(self, rec: Recorder, cpu: dict[str, Callable[[], float]],
                 pg_url: str | None, every_s: float = 0.5) -> None:
        self.rec, self.cpu, self.pg_url, self.every_s = rec, cpu, pg_url, every_s
        self._base: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self.connections: list[tuple[float, int, dict[str, int]]] = []
        self._stop = threading.Event()
        self._lock = threading.RLock()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")

    def start(self) -> Sampler:
        """Start sampling."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join()

    def around(self, fn: Callable[[], None]) -> None:
        """Read, run ``fn`` (a process dies), read again; no other reading in between."""
        with self._lock:
            self.cpu_now()
            fn()
            self.cpu_now()

    def cpu_now(self) -> dict[str, float]:
        """Cumulative CPU seconds of each source, plus the client's and the machine's."""
        out = {}
        with self._lock:
            for name, read in self.cpu.items():
                try:
                    v = read()
                except (OSError, ValueError):
                    v = 0.0
                last = self._last.get(name, 0.0)
                if v < last - 0.01:  # the process is gone (killed) or was restarted
                    self._base[name] = self._base.get(name, 0.0) + last
                self._last[name] = v
                out[name] = self._base.get(name, 0.0) + v
        out["client"] = time.process_time()
        out["machine_busy"], out["machine_total"] = machine_jiffies()
        return out

    def _run(self) -> None:
        conn: Any = None
        while not self._stop.wait(self.every_s):
            self.cpu_now()
            if self.pg_url is None:
                continue
            try:
                if conn is None or conn.closed:
                    import psycopg

                    conn = psycopg.connect(self.pg_url, autocommit=True, connect_timeout=2)
                rows = conn.execute(
                    "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity "
                    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
                    "GROUP BY 1").fetchall()
                by_app = {str(a): int(n) for a, n in rows}
                self.connections.append((self.rec.now(), sum(by_app.values()), by_app))
            except Exception:
                with contextlib.suppress(Exception):
                    if conn is not None:
                        conn.close()
                conn = None
        if conn is not None:
            conn.close()


def machine_jiffies() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        parts = [float(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    return sum(parts) - idle, sum(parts)


def tree_cpu_seconds(root: int) -> float:
    """user+system CPU seconds of ``root`` and all its descendants, those that exited and
    were reaped included (their parents' ``cutime``/``cstime``: PostgreSQL's backends come and
    go with their connections)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for pid, fields in proc_stats():
        parent[pid] = int(fields[1])
        cpu[pid] = sum(int(x) for x in fields[11:15]) / tick
    total = 0.0
    for pid, c in cpu.items():
        p = pid
        while p and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += c
    return total


# ------------------------------------------------------------------------------ the fleet
class Fleet:
    """The devices and the pool that drives them."""

    def __init__(self, rec: Recorder, devices: list[Device], threads: int, row: Any,
                 records: int) -> None:
        self.rec, self.devices, self.threads = rec, devices, threads
        self.row, self.records = row, records
        self.accepted = self.duplicates = 0
        self.started: dict[int, float] = {}  # id(device) -> when its last tick started
        self.solo = False  # True while devices sync one at a time (no queueing)
        self._lock = threading.Lock()

    def sync(self, d: Device) -> None:
        """One sync, timed; a download is a ``sync_dl``."""
        t0 = time.perf_counter()
        try:
            r = d.sync_result()
        except Exception as exc:
            self.rec.op("sync", _ms(t0), _code(exc), str(exc))
            return
        kind = "sync" if not r.downloaded else "sync_solo" if self.solo else "sync_dl"
        self.rec.op(kind, _ms(t0))
        self.rec.add_bytes(direct=r.bytes_direct, cloud=r.bytes_cloud,
                           manifest=r.wire_bytes - r.bytes_downloaded,
                           direct_failures=r.direct_failures)

    def push(self, d: Device, spool_more: bool = True) -> None:
        """Spool this tick's records and push the spool, timed."""
        if spool_more:
            d.record(self.records)
        t0 = time.perf_counter()
        try:
            r = d.push()
        except Exception as exc:
            self.rec.op("push", _ms(t0), _code(exc), str(exc))
            return
        with self._lock:
            self.accepted += r.accepted
            self.duplicates += r.duplicates
        self.rec.op("push", _ms(t0), None if r.ok else _push_code(r.error), r.error or "")

    def predict(self, d: Device) -> None:
        """One fallback prediction, timed."""
        t0 = time.perf_counter()
        try:
            d.fallback(self.row)
        except Exception as exc:
            self.rec.op("predict", _ms(t0), _code(exc), str(exc))
            return
        self.rec.op("predict", _ms(t0))

    def tick(self, d: Device) -> None:
        """What a device does each interval."""
        self.started[id(d)] = self.rec.now()
        self.sync(d)
        self.push(d)
        self.predict(d)

    def drive(self, step: Callable[[Device], None], ticks: int = 1,
              at: tuple[float, Callable[[], None]] | None = None,
              rate: float | None = None) -> dict[str, Any]:
        """Run ``step`` ``ticks`` times on every device, device after device, round after
        round; a device never runs two steps at once.

        Closed loop (``rate`` None): every thread takes the next step as soon as it is free.
        Paced: step ``j`` starts at ``j / rate`` seconds, open loop (a step that finds no free
        thread starts late: the lag is returned, so a rate the setup could not hold shows).
        ``at=(share, fault)`` starts ``fault`` in a thread of its own once that share of the
        steps is done."""
        order = [d for _ in range(ticks) for d in self.devices]
        total = len(order)
        trigger = max(1, int(total * at[0])) if at else 0
        nxt, done = itertools.count(), itertools.count(1)
        locks = {id(d): threading.Lock() for d in self.devices}
        lags: list[float] = []
        fired: list[threading.Thread] = []
        start = time.monotonic() + 0.05

        def worker() -> None:
            while (j := next(nxt)) < total:
                d = order[j]
                if rate:
                    late = time.monotonic() - (start + j / rate)
                    if late < 0:
                        time.sleep(-late)
                    lags.append(max(0.0, late))
                with locks[id(d)]:
                    step(d)
                if at and next(done) == trigger:
                    t = threading.Thread(target=at[1], name="bench-fault")
                    fired.append(t)
                    t.start()

        pool = [threading.Thread(target=worker, name=f"bench-device-{w}")
                for w in range(min(self.threads, total))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        for t in fired:
            t.join()
        if not rate:
            return {}
        return {"offered_ticks_per_s": rate, "start_lag_p99_ms": round(
            float(np.percentile(lags, 99)) * 1000, 1) if lags else 0.0,
            "start_lag_max_ms": round(max(lags, default=0.0) * 1000, 1)}

    def rollout(self, solo: int, at: tuple[float, Callable[[], None]] | None = None) -> None:
        """A new version out: ``solo`` devices tick one after the other first (their
        download latency is the service's, without queueing), then the rest, closed-loop."""
        self.solo = True
        for d in self.devices[:solo]:
            self.tick(d)
        self.solo = False
        rest = Fleet(self.rec, self.devices[solo:], self.threads, self.row, self.records)
        rest.started, rest.solo = self.started, False
        rest.drive(rest.tick, at=at)
        self.accepted += rest.accepted
        self.duplicates += rest.duplicates

    def drain(self, attempts: int = 8) -> int:
        """Push until every spool is empty (or ``attempts`` pushes each); returns the
        records still pending."""
        left = [0]
        lock = threading.Lock()

        def one(d: Device) -> None:
            for i in range(attempts):
                assert d.spool is not None
                t0 = time.perf_counter()
                r = d.push()
                if r.uploads or not r.ok:  # an empty spool sends nothing: not a request
                    self.rec.op("push", _ms(t0), None if r.ok else _push_code(r.error),
                                r.error or "")
                with self._lock:
                    self.accepted += r.accepted
                    self.duplicates += r.duplicates
                if r.ok and r.pending == 0:
                    return
                time.sleep(0.2 * (i + 1))
            with lock:
                left[0] += r.pending

        self.drive(one)
        return left[0]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _code(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return str(code) if code else type(exc).__name__


def _push_code(error: str | None) -> str:
    """A short label for why a push stopped (its message names the cloud's answer)."""
    text = (error or "push").lower()
    for needle, label in (("unavailable", "storage_unavailable"),
                          ("cannot connect to the", "storage_unavailable"), ("503", "http_503"),
                          ("timed out", "timeout"), ("in time", "timeout"),
                          ("cannot reach", "unreachable"), ("500", "http_500")):
        if needle in text:
            return label
    return "other"


def _drive(devices: list[Device], job: Any, threads: int) -> tuple[list[float], int, float]:
    """Run ``job(device)`` for every device; return latencies (s), errors and wall time."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(d: Device) -> None:
        t0 = time.perf_counter()
        try:
            job(d)
        except Exception:  # any failure is an error of the fleet run; counted, not raised
            with lock:
                errors[0] += 1
            return
        with lock:
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, devices))
    return lat, errors[0], time.perf_counter() - t0


def run(model: Model, work: Path, *, sizes: tuple[int, ...], request_budget: int,
        threads: int = 16) -> dict[str, Any]:
    """Rollout and steady-state numbers for each fleet size."""
    row = model.miss_row
    results = []
    with cloud(model.registry) as server:
        for n in sizes:
            log(f"fleet: {n} devices")
            root = work / f"fleet-{n}"
            shutil.rmtree(root, ignore_errors=True)
            devices = [Device(root, server.url, model.name, i, model.registry) for i in range(n)]
            cpu0 = server.cpu_seconds()
            lat, err, wall = _drive(devices, Device.sync, threads)
            cpu1 = server.cpu_seconds()
            rollout = {"syncs": n, "errors": err, "error_rate": round(err / n, 4),
                       "wall_s": round(wall, 3), "syncs_per_s": round(n / wall, 1),
                       "latency_ms": Stats.of(np.asarray(lat) * 1000).to_json(),
                       "cloud_cpu_ms_per_device": round((cpu1 - cpu0) * 1000 / n, 3)}
            rounds = max(1, request_budget // (2 * n))
            s_lat: list[float] = []
            p_lat: list[float] = []
            s_err = p_err = 0
            s_wall = p_wall = 0.0
            cpu0 = server.cpu_seconds()
            for _ in range(rounds):
                lat, e, w = _drive(devices, Device.sync, threads)
                s_lat += lat
                s_err += e
                s_wall += w
                lat, e, w = _drive(devices, lambda d: d.fallback(row), threads)
                p_lat += lat
                p_err += e
                p_wall += w
            cpu1 = server.cpu_seconds()
            steady = {"rounds": rounds, "syncs": rounds * n, "fallbacks": rounds * n,
                      "syncs_per_s": round(rounds * n / s_wall, 1),
                      "fallbacks_per_s": round(rounds * n / p_wall, 1),
                      "error_rate": round((s_err + p_err) / (2 * rounds * n), 4),
                      "sync_latency_ms": Stats.of(np.asarray(s_lat) * 1000).to_json(),
                      "fallback_latency_ms": Stats.of(np.asarray(p_lat) * 1000).to_json(),
                      "cloud_cpu_ms_per_device": round((cpu1 - cpu0) * 1000 / n, 3),
                      "cloud_cpu_ms_per_request": round((cpu1 - cpu0) * 1000
                                                        / (2 * rounds * n), 3)}
            for d in devices:
                d.close()
            shutil.rmtree(root, ignore_errors=True)
            results.append({"devices": n, "rollout": rollout, "steady": steady})
    return {"model": model.name, "threads": threads, "fleets": results}
