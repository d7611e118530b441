"""Issue 15 item 6: what a day on an SD card costs — bytes written, by path.

A simulated day of a device (docs/device.md §5): one prediction a second through the real
:class:`~hybridml.edge.runtime.EdgeRuntime` (telemetry on, its default settings), a telemetry
window flushed to the spool every hour (as the runtime's own timer does), and the agent's
cycle (sync, then push of the spool) every 300 s (its default interval) against a real cloud
(``hybridml-cloud serve``, gunicorn, another process, so its writes are not counted). The
day runs as fast as the machine allows: the windows are dated by an injected wall clock.

Each path is measured from ``/proc/self/io`` around its calls: ``write_bytes`` (bytes this
process sent towards the block layer: page-cache pages it dirtied) and ``wchar`` (bytes
passed to ``write``-like syscalls, whatever the filesystem). ``os.sync()`` runs after every
write path, so each hour's writes dirty pages again as they would a real hour apart (without
it, pages rewritten within the kernel's 30 s writeback delay would be counted once). Not
counted: the filesystem's own journal and metadata (ext4 commits them from its kernel
thread), the SD card's erase-block amplification, and journald writing the logs (their bytes
are reported as ``log_bytes``: what the edge hands it).

The cloud re-signs each manifest hourly, so a real device rewrites its active pointer and
``sync.json`` about 24 times a day; in a fast simulation the cloud's hour does not pass, so
that path is measured apart against a cloud that re-signs every 2 s
(``HYBRIDML_MANIFEST_LIFETIME_S=8``) and counted 24 times.

``python -m benchmarks.run --only sdcard`` (``--tiny`` simulates an hour and scales it, without
the re-signed manifests).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import child_env, log
from .workspace import Model, provision

CYCLE_S = 300  # the agent's default interval
RESIGNS_PER_DAY = 24  # the cloud re-signs every REFRESH_S (an hour)
FIELDS = ("write_bytes", "wchar", "syscw")


def io_counters() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (zeros where there is none)."""
    try:
        with open("/proc/self/io") as fh:
            found = {k: int(v) for k, v in (line.split(": ") for line in fh)}
    except OSError:
        found = {}
    return {k: found.get(k, 0) for k in FIELDS}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding ``path`` (from ``/proc/mounts``), or ``?``."""
    best, kind = "", "?"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/")
                               ) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


class Meter:
    """Bytes written per path, summed over calls."""

    def __init__(self) -> None:
        self.paths: dict[str, dict[str, int]] = {}

    def measure(self, path: str, fn: Callable[[], Any], *, sync: bool = True) -> Any:
        """Run ``fn`` and add what it wrote (then ``os.sync()``, with ``sync``) to ``path``."""
        before = io_counters()
        out = fn()
        if sync:
            os.sync()
        after = io_counters()
        got = self.paths.setdefault(path, {"calls": 0, **dict.fromkeys(FIELDS, 0)})
        got["calls"] += 1
        for k in FIELDS:
            got[k] += after[k] - before[k]
        return out


class _LogBytes(logging.Handler):
    """Counts the bytes of the edge's log lines (what journald would get)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.bytes = self.lines = 0
        self.by_message: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.bytes += len(self.format(record).encode()) + 1
        self.lines += 1
        key = f"{record.levelname} {record.name}: {record.msg}"[:120]
        self.by_message[key] = self.by_message.get(key, 0) + 1


class _Wall:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _device(model: Model, root: Path) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(model.store, root)
    return provision(root, model.registry)


def day(model: Model, work: Path, hours: int = 24) -> dict[str, Any]:
    """``hours`` simulated hours (module docstring); bytes per path, scaled to a day."""
    from hybridml.edge.agent import Agent
    from hybridml.edge.client import CloudClient
    from hybridml.edge.runtime import EdgeRuntime
    from hybridml.edge.store import LocalStore
    from hybridml.edge.sync import SyncOptions, sync
    from hybridml.edge.telemetry import Telemetry, TelemetrySettings

    from .servers import cloud

    root = _device(model, work / "sdcard-store")
    meter = Meter()
    wall = _Wall(time.time())
    counted = _LogBytes()
    edge_log = logging.getLogger("hybridml")
    level = edge_log.level
    edge_log.addHandler(counted)
    edge_log.setLevel(logging.INFO)
    rows = [model.hit_row, model.miss_row, *model.rows[:8]]
    try:
        with cloud(model.registry, verbose=False) as server:
            store = LocalStore(root)
            client = CloudClient(server.url)
            sync(store, client, model.name)  # the device as it runs: synced, an ETag kept
            settings = TelemetrySettings.from_env()
            tel = Telemetry(model.name, settings, clock=wall, monotonic=wall)
            rt = EdgeRuntime(store, model.name, telemetry=tel)
            spool = rt.monitor.spool  # opened (made) before the day starts
            agent = Agent(store, client, model.name, options=SyncOptions(clock=wall),
                          spool=spool, seed=0)
            counted.bytes = counted.lines = 0
            t0 = time.perf_counter()
            for cycle in range(hours * 3600 // CYCLE_S):
                def predict(start: int = cycle * CYCLE_S) -> None:
                    for i in range(start, start + CYCLE_S):
                        rt.predict_one(rows[i % len(rows)])
                meter.measure("predict (a block of 300 calls)", predict, sync=False)
                wall.now += CYCLE_S
                if (cycle + 1) * CYCLE_S % 3600 == 0:  # the runtime's hourly window
                    meter.measure("telemetry window flush (spool)", rt.flush)
                    meter.measure("agent cycle: sync 304 + push", agent.step)
                else:
                    meter.measure("agent cycle: sync 304, nothing to push", agent.step)
            seconds = time.perf_counter() - t0
            log_bytes, log_lines = counted.bytes, counted.lines
            spool_stats = spool.stats()
            pushed = getattr(agent.last_push, "to_json", lambda: None)()
            rt.close()
        if hours >= 24:  # a second cloud costs ~10 s: not in the smoke test's tiny hour
            _resigns(model, work, meter, samples=3)
    finally:
        edge_log.removeHandler(counted)
        edge_log.setLevel(level)
    scale = 24 / hours
    per_day: dict[str, dict[str, float]] = {}
    for path, got in meter.paths.items():
        k = RESIGNS_PER_DAY / max(1, got["calls"]) if path.startswith("re-signed") else scale
        per_day[path] = {f: round(got[f] * k) for f in ("calls", *FIELDS)}
    per_day["logs (to journald)"] = {"calls": round(log_lines * scale),
                                     "write_bytes": 0, "wchar": 0, "syscw": 0,
                                     "log_bytes": round(log_bytes * scale)}
    total = {f: sum(p[f] for p in per_day.values()) for f in FIELDS}
    return {"model": model.name, "hours_simulated": hours, "predictions": hours * 3600,
            "agent_cycles": hours * 3600 // CYCLE_S, "seconds": round(seconds, 1),
            "store_filesystem": filesystem(root), "store": str(root),
            "measured": meter.paths, "per_day": per_day,
            "total_per_day": total,
            "mb_per_day": round(total["write_bytes"] / 1e6, 3),
            "wchar_mb_per_day": round(total["wchar"] / 1e6, 3),
            "log_bytes_per_day": round(log_bytes * scale),
            "log_lines": counted.by_message,
            "spool_after": spool_stats, "last_push": pushed}


def _resigns(model: Model, work: Path, meter: Meter, samples: int) -> None:
    """Syncs that receive the same model re-signed (a new ``issued``), as happens hourly."""
    from hybridml.edge.client import CloudClient
    from hybridml.edge.store import LocalStore
    from hybridml.edge.sync import sync

    from .servers import cloud

    root = _device(model, work / "sdcard-resign")
    env = child_env(HYBRIDML_MANIFEST_LIFETIME_S="8")  # re-signed every 2 s
    with cloud(model.registry, env=env, verbose=False) as server:
        store, client = LocalStore(root), CloudClient(server.url)
        sync(store, client, model.name)
        for _ in range(samples):
            time.sleep(2.1)
            meter.measure("re-signed manifest: active pointer + sync.json",
                          lambda: sync(store, client, model.name))


def section(doc: dict[str, Any]) -> str:
    """The REPORT.md section."""
    lines = [f"## SD card: bytes written per day ({doc['model']})\n",
             f"{doc['hours_simulated']} h simulated ({doc['predictions']:,} predictions, "
             f"{doc['agent_cycles']} agent cycles), scaled to a day; store on "
             f"{doc['store_filesystem']}. **{doc['mb_per_day']} MB/day** (`write_bytes`), "
             f"{doc['wchar_mb_per_day']} MB/day of `write` syscalls (`wchar`).\n",
             "| path | calls/day | write_bytes/day | wchar/day |", "|---|---|---|---|"]
    for path, got in doc["per_day"].items():
        lines.append(f"| {path} | {got['calls']:,} | {got['write_bytes']:,} | "
                     f"{got['wchar']:,} |")
    lines.append(f"\nLog lines: {doc['log_bytes_per_day']:,} bytes/day handed to journald.\n")
    return "\n".join(lines)


def run(model: Model, work: Path, mode: str) -> dict[str, Any]:
    """The suite: a day (``full``, ``quick``) or an hour (``tiny``)."""
    hours = 1 if mode == "tiny" else 24
    log(f"sdcard: {hours} simulated hour(s) of {model.name}")
    return {"suite": "sdcard", **day(model, work, hours)}
