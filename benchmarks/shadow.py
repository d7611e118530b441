"""What a rollout's shadow costs the caller per prediction (docs/rollouts.md §4).

Four runtimes, each on its own copy of the model's store and all with telemetry on (the
default): no rollout; role ``canary`` (served = the candidate, companion = stable) at sample 0.1
(the canary default) and 1.0; role ``shadow`` at sample 1.0 (the shadow default). They answer
the same calls in interleaved blocks, as :mod:`benchmarks.telemetry` does (its ``blocks_of``,
copied here with a drain between blocks): a single row through ``predict([row])`` (the fast
path) that the table holds (hit) and one it does not (miss), and a batch of 1,000 rows as
dicts. Reported per call: the 10th percentile of block means and the median, and the overhead
vs no rollout (µs, %).

Two regimes, because they differ:

* **tight**: calls back to back, each block a loop timed as a whole. The shadow worker
  competes with the caller for the GIL and the CPU: the worst case. Sampled calls the worker
  cannot keep up with are dropped (the bounded queue; ``skipped``). Every worker is drained
  after each block, outside the timed region, so a block competes with its own runtime's
  worker only, never with the backlog the previous contender's block left behind.
* **spaced**: ``rt.shadow.drain()`` after every call, outside the timed region (each call is
  timed alone and the times summed), as on a device whose requests are spread out: the worker
  has finished before the next call, so only the caller's side is timed (the sampling counter,
  the copy of the row or batch, the queue put).

The worker's own cost is measured in the spaced regime: its thread's CPU time (the POSIX
per-thread CPU clock, ``pthread_getcpuclockid``) per compared row and per sampled call, the
time ``drain`` waited per sampled call, and the companion's latency histogram from the shadow
record.

The companion is the served model itself under another version number (the workspace holds
one version of each model; an identical companion is what ``tests/edge/test_shadow.py`` uses
too), so the worker's model run costs what the served model costs; a companion of another
family costs its own inference instead.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .common import gc_paused
from .telemetry import blocks_of
from .workspace import Model

BATCH = 1000
#: contender -> (role, sample); None: no rollout
CONTENDERS: dict[str, tuple[str, float] | None] = {
    "none": None, "canary_0.1": ("canary", 0.1), "canary_1": ("canary", 1.0),
    "shadow_1": ("shadow", 1.0)}
DOORS = ("hit", "miss", "rows")


def _store(model: Model, work: Path, label: str, role: tuple[str, float] | None) -> Path:
    """A copy of the model's store; in a rollout, its served version activated with a rollout
    block and the companion written beside it (as a sync leaves a device of the cohort)."""
    from hybridml.edge.store import LocalStore
    from hybridml.shared.manifest import DELIVERY_KEYS, Manifest
    from hybridml.shared.rollout import RolloutBlock

    root = work / f"rollout-{model.name}-{label}"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(model.store, root)
    if role is None:
        return root
    kind, sample = role
    store = LocalStore(root)
    base = store.require_active(model.name)
    plain = {k: v for k, v in base.raw.items() if k not in DELIVERY_KEYS}
    stable = Manifest.from_json(plain)
    candidate = Manifest.from_json({**plain, "version": base.version + 1})
    served, companion = (candidate, stable) if kind == "canary" else (stable, candidate)
    block = RolloutBlock[Manifest](
        id=1, strategy=kind, role=kind, serve=served.version, arm="candidate",
        stable=stable.version, candidate=candidate.version,
        step=0 if kind == "canary" else None, percent=5 if kind == "canary" else None,
        sample=sample, forced=False, companion=dict(companion.raw))
    store.set_companion(model.name, companion)
    store.activate(Manifest.from_json({**served.raw, "rollout": block.to_json()}))
    return root


def _worker_ns(rt: Any) -> int | None:
    """ns of CPU time the runtime's shadow worker thread has used (its POSIX thread CPU
    clock; None: no worker yet, or no such clock on this system)."""
    thread = rt.shadow._thread
    cpu_clock = getattr(time, "pthread_getcpuclockid", None)
    if thread is None or thread.ident is None or cpu_clock is None:
        return None
    try:
        return time.clock_gettime_ns(cpu_clock(thread.ident))
    except OSError:
        return None


def _spaced(contenders: dict[str, Callable[[], object]], drains: dict[str, Callable[[], object]],
            calls: int, blocks: int) -> tuple[dict[str, tuple[float, float]], dict[str, float]]:
    """As ``telemetry.blocks_of``, but every call is timed alone and followed, outside the timed
    region, by its runtime's ``drain``: (p10, median) per-call µs of the blocks, and the mean
    µs each contender's drains waited."""
    samples: dict[str, list[float]] = {k: [] for k in contenders}
    waited = dict.fromkeys(contenders, 0)
    for name, fn in contenders.items():
        for _ in range(min(calls, 50)):
            fn()
            drains[name]()
    clock = time.perf_counter_ns
    with gc_paused():
        for _ in range(blocks):
            for name, fn in contenders.items():
                drain = drains[name]
                took = wait = 0
                for _ in range(calls):
                    t0 = clock()
                    fn()
                    t1 = clock()
                    drain()
                    wait += clock() - t1
                    took += t1 - t0
                samples[name].append(took / calls / 1000.0)
                waited[name] += wait
    n = blocks * calls
    return ({k: (float(np.percentile(v, 10)), float(np.median(v))) for k, v in samples.items()},
            {k: w / n / 1000.0 for k, w in waited.items()})


def _window(rt: Any) -> dict[str, Any]:
    """The shadow window's counts so far (zeros without a rollout)."""
    rt.shadow.drain(30)
    bodies = rt.shadow.snapshot()
    if not bodies:
        return {"calls": 0, "sampled": 0, "skipped": 0, "rows": 0, "agree": 0,
                "latency_ms": None}
    b = bodies[0]
    return {k: b[k] for k in ("calls", "sampled", "skipped", "rows", "agree", "latency_ms")}


def _every(label: str) -> int:
    """Every how many calls the contender's counter samples one (⌈1/sample⌉)."""
    role = CONTENDERS[label]
    return 0 if role is None else max(1, math.ceil(1.0 / role[1] - 1e-9))


def _median_bin(hist: dict[str, Any] | None) -> str | None:
    """The latency bin holding the median companion run, as ``"≤ x ms"`` / ``"> x ms"``."""
    if not hist or not sum(hist["counts"]):
        return None
    counts, edges = np.asarray(hist["counts"]), hist["edges"]
    i = int(np.searchsorted(np.cumsum(counts), counts.sum() / 2.0))
    return f"≤ {edges[i]} ms" if i < len(edges) else f"> {edges[-1]} ms"


def rollout_overhead(model: Model, work: Path, *, single_calls: int = 512, blocks: int = 40,
                     batch_calls: int = 5, batch_blocks: int = 20) -> dict[str, Any]:
    """Per-call cost of each door in each rollout contender, tight and spaced, vs no rollout;
    and the shadow worker's time per compared row."""
    from hybridml.edge.runtime import EdgeRuntime

    rts = {label: EdgeRuntime(_store(model, work, label, role), model.name, telemetry=True)
           for label, role in CONTENDERS.items()}
    for label, rt in rts.items():
        r = rt.rollout
        want = CONTENDERS[label]
        if want is not None and (r is None or r.plan is None or r.block.role != want[0]):
            raise RuntimeError(f"{model.name}/{label}: the runtime did not load the rollout")
    hit, miss = [model.hit_row], [model.miss_row]
    base = rts["none"]
    if base.predict(hit)[0].source != "precomputed" or base.predict(miss)[0].source != "edge":
        raise RuntimeError(f"{model.name}: the hit/miss rows are not a hit and a miss")
    rows = (model.rows * (BATCH // max(1, len(model.rows)) + 1))[:BATCH]
    args = {"hit": (hit, single_calls * 4, blocks), "miss": (miss, single_calls, blocks),
            "rows": (rows, batch_calls, batch_blocks)}

    def door_fns(x: list[Any]) -> dict[str, Callable[[], object]]:
        return {label: partial(rt.predict, x) for label, rt in rts.items()}

    out: dict[str, Any] = {"model": model.name, "batch": BATCH, "contenders":
                           {k: None if v is None else {"role": v[0], "sample": v[1]}
                            for k, v in CONTENDERS.items()},
                           "tight": {}, "spaced": {}, "worker": {}}
    drains = {label: rt.shadow.drain for label, rt in rts.items()}

    def settle() -> None:
        for rt in rts.values():
            rt.shadow.drain()
    for door in DOORS:
        x, calls, nblocks = args[door]
        fns = door_fns(x)
        for rt in rts.values():  # a fresh window per door and regime
            rt.shadow.records()
        tight = blocks_of(fns, calls, nblocks, settle)
        counts = {label: _window(rt) for label, rt in rts.items()}
        out["tight"][door] = _rows(tight, counts)
        for rt in rts.values():
            rt.shadow.records()
        cpu0 = {label: _worker_ns(rt) for label, rt in rts.items()}
        spaced, waited = _spaced(fns, drains, calls, nblocks)
        cpu1 = {label: _worker_ns(rt) for label, rt in rts.items()}
        counts = {label: _window(rt) for label, rt in rts.items()}
        out["spaced"][door] = _rows(spaced, counts)
        worker: dict[str, Any] = {}
        for label in rts:
            if CONTENDERS[label] is None:
                continue
            c = counts[label]
            a, b = cpu0[label], cpu1[label]
            compared = c["sampled"] - c["skipped"]
            worker[label] = {
                "rows_compared": c["rows"], "calls_compared": compared,
                "cpu_us_per_row": round((b - a) / c["rows"] / 1000.0, 3)
                if a is not None and b is not None and c["rows"] else None,
                "cpu_us_per_sampled_call": round((b - a) / compared / 1000.0, 3)
                if a is not None and b is not None and compared else None,
                "drain_wait_us_per_call": round(waited[label], 3),
                "drain_wait_us_per_sampled_call": round(waited[label] * _every(label), 3),
                "companion_latency_median": _median_bin(c["latency_ms"]),
                "companion_latency_ms": c["latency_ms"]}
        out["worker"][door] = worker
    for rt in rts.values():
        rt.close()
    return out


def _rows(got: dict[str, tuple[float, float]], counts: dict[str, dict[str, Any]]
          ) -> dict[str, Any]:
    """Per contender: p10, median, the overhead over no rollout, and the shadow's counts."""
    p_none = got["none"][0]
    res: dict[str, Any] = {}
    for label, (p10, med) in got.items():
        c = counts[label]
        res[label] = {"p10": round(p10, 3), "median": round(med, 3),
                      "added_us": round(p10 - p_none, 3),
                      "added_pct": round((p10 / p_none - 1) * 100, 2) if p_none else None,
                      "calls": c["calls"], "sampled": c["sampled"], "skipped": c["skipped"],
                      "rows_compared": c["rows"]}
    return res


def run(models: list[Model], work: Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`rollout_overhead` for every model."""
    return {"rollout": [rollout_overhead(m, work, **kwargs) for m in models]}


__all__ = ["BATCH", "CONTENDERS", "DOORS", "rollout_overhead", "run"]
