"""What telemetry costs on the predict path: the same doors with it on and off, interleaved.

Two runtimes on the same store, ``telemetry=True`` and ``telemetry=False``, answer the same
calls in alternating blocks (so drift on a shared machine hits both alike): a single row the
table holds (hit) and one it does not (miss), then a batch of 1,000 rows as dicts/lists and as
arrays. Each block is a loop of calls timed as a whole, so the cost of draining and binning
what telemetry gathered — every few thousand rows — is in the numbers, spread over the calls
that caused it. Reported: the 10th percentile of block means (the steadiest statistic on a
busy machine) and the median, per call, and the overhead on/off.

Targets (docs/monitoring.md §3; issue 11): at most +0.2 µs on a hit and +5 % on a miss. Both
runtimes plan table lookups alike (every batch is looked up), so a batch measures telemetry,
not two cost models deciding differently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import gc_paused
from .workspace import Model

BATCH = 1000


def blocks_of(contenders: dict[str, Callable[[], object]], calls: int, blocks: int,
              settle: Callable[[], object] | None = None) -> dict[str, tuple[float, float]]:
    """(p10, median) of the per-call µs of ``blocks`` loops of ``calls`` calls each, the
    contenders' blocks interleaved. ``settle`` runs after the warm-up and after each block,
    outside the timed region (the rollout suite drains every shadow worker there, so a block
    competes with its own runtime's worker, not with the backlog another left)."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    for fn in contenders.values():
        for _ in range(min(calls, 50)):
            fn()
    if settle is not None:
        settle()
    clock = time.perf_counter_ns
    with gc_paused():
        for _ in range(blocks):
            for name, fn in contenders.items():
                t0 = clock()
                for _ in range(calls):
                    fn()
                samples[name].append((clock() - t0) / calls / 1000.0)
                if settle is not None:
                    settle()
    return {k: (float(np.percentile(v, 10)), float(np.median(v))) for k, v in samples.items()}


def telemetry_overhead(model: Model, *, single_calls: int = 2048, blocks: int = 60,
                       batch_blocks: int = 20) -> dict[str, Any]:
    """Per-call cost of each door with telemetry on and off, and the difference (µs, %)."""
    from hybridml.edge.loaded import TableCost
    from hybridml.edge.runtime import EdgeRuntime

    class LookUp(TableCost):  # both runtimes look every batch up: the same plan
        def plan(self, rows: int) -> str | None:
            return "all"

    off = EdgeRuntime(model.store, model.name, telemetry=False)
    on = EdgeRuntime(model.store, model.name, telemetry=True)
    for rt in (off, on):
        assert rt.loaded is not None
        rt.loaded.cost = LookUp()
    hit, miss = [model.hit_row], [model.miss_row]
    if on.predict(hit)[0].source != "precomputed" or on.predict(miss)[0].source != "edge":
        raise RuntimeError(f"{model.name}: the hit/miss rows are not a hit and a miss")
    rows = (model.rows * (BATCH // max(1, len(model.rows)) + 1))[:BATCH]
    assert off.loaded is not None
    enc = off.loaded.schema.encode(rows)
    arrays = {k: v for k, v in (("num", enc.num), ("cat", enc.cat)) if v.shape[1]}
    got = blocks_of({"hit_off": lambda: off.predict(hit), "hit_on": lambda: on.predict(hit)},
                  single_calls * 4, blocks)
    got.update(blocks_of({"miss_off": lambda: off.predict(miss),
                        "miss_on": lambda: on.predict(miss)}, single_calls // 4, blocks))
    got.update(blocks_of({"rows_off": lambda: off.predict(rows),
                        "rows_on": lambda: on.predict(rows),
                        "arrays_off": lambda: off.predict_arrays(**arrays),
                        "arrays_on": lambda: on.predict_arrays(**arrays)}, 5, batch_blocks))
    out: dict[str, Any] = {"model": model.name, "batch": BATCH, "us_per_call": {}}
    for door in ("hit", "miss", "rows", "arrays"):
        (p_off, m_off), (p_on, m_on) = got[f"{door}_off"], got[f"{door}_on"]
        out["us_per_call"][door] = {
            "off": {"p10": round(p_off, 3), "median": round(m_off, 3)},
            "on": {"p10": round(p_on, 3), "median": round(m_on, 3)},
            "added_us": round(p_on - p_off, 3),
            "added_pct": round((p_on / p_off - 1) * 100, 2) if p_off else None}
    return out


def offline_week(model: Model, work: Path, *, hours: int = 168, per_hour: int = 3600
                 ) -> dict[str, Any]:
    """A week offline at one prediction a second: ``hours`` hourly windows of ``per_hour``
    single-row predictions (a mix of table hits and misses), each window flushed to the spool
    as the runtime's own timer would; then one push to a real cloud. Reports the spool's size
    and records, the predict time with telemetry on, the flush time, and the push time."""
    import shutil

    from hybridml.edge.runtime import EdgeRuntime

    from .servers import cloud
    from .workspace import provision

    store = work / "week-store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(model.store, store)
    provision(store, model.registry)
    rt = EdgeRuntime(store, model.name, telemetry=True)
    rows = [model.hit_row, model.miss_row, *model.rows[:8]]
    flush_s = predict_s = 0.0
    for _ in range(hours):
        t0 = time.perf_counter()
        for i in range(per_hour):
            rt.predict([rows[i % len(rows)]])
        t1 = time.perf_counter()
        rt.flush()
        predict_s += t1 - t0
        flush_s += time.perf_counter() - t1
    spool_file = store / "telemetry.db"
    stats = rt.monitor.spool.stats()
    size = sum(p.stat().st_size for p in store.glob("telemetry.db*"))
    with cloud(model.registry) as server:
        pusher = EdgeRuntime(store, model.name, server.url, telemetry=True)
        t0 = time.perf_counter()
        result = pusher.push()
        push_s = time.perf_counter() - t0
        pusher.close()
    rt.close()
    return {"model": model.name, "hours": hours, "predictions": hours * per_hour,
            "us_per_prediction": round(predict_s / (hours * per_hour) * 1e6, 3),
            "flush_ms_per_window": round(flush_s / hours * 1e3, 3),
            "spool_records": stats.get("pending"), "spool_bytes_on_disk": size,
            "spool_file": spool_file.name, "push_s": round(push_s, 3),
            "pushed": _pushed(result)}


def _pushed(result: Any) -> Any:
    to_json = getattr(result, "to_json", None)
    return to_json() if callable(to_json) else str(result)


def spool_throughput(work: Path, *, records: int = 5000) -> dict[str, Any]:
    """Records a second the spool takes (one at a time, and in one transaction) and serves
    back in upload order."""
    import shutil

    from hybridml.edge.spool import Spool

    root = work / "spool-bench"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    spool = Spool.open(root)
    body = {"format": 1, "model": "m", "version": 1, "rows": 3600,
            "features": {f"f{i}": {"counts": list(range(12)), "missing": 0} for i in range(8)}}
    t0 = time.perf_counter()
    for _ in range(records // 10):
        spool.add("summary", body, model="m", version=1)
    one = (records // 10) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    spool.add_many([("summary", body, "m", 1)] * records)
    many = records / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    queued = spool.queue()
    read = len(queued) / (time.perf_counter() - t0)
    spool.close()
    return {"record_bytes": len(str(body)), "add_one_per_s": round(one),
            "add_many_per_s": round(many), "queue_per_s": round(read)}


def run(models: list[Model], work: Path | None = None, *, week_hours: int = 168,
        **kwargs: Any) -> dict[str, Any]:
    """:func:`telemetry_overhead` for every model; the spool and the offline week with the
    first model when ``work`` is given."""
    out: dict[str, Any] = {"telemetry": [telemetry_overhead(m, **kwargs) for m in models]}
    if work is not None:
        out["spool"] = spool_throughput(work)
        out["offline_week"] = offline_week(models[0], work, hours=week_hours)
    return out


__all__ = ["BATCH", "offline_week", "run", "spool_throughput", "telemetry_overhead"]
