"""Shadowing a rollout's companion on the device, off the predict path (docs/rollouts.md §4).

The companion (:mod:`hybridml.edge.companion`) is loaded beside the served version by
:mod:`hybridml.edge.roles`. Roles ``shadow`` and ``canary`` shadow the companion: every
⌈1/sample⌉-th call (a counter, not randomness) hands its encoded rows and the served
answers to :class:`Shadow`'s worker thread through a bounded queue (:data:`QUEUE_BATCHES`;
a full queue drops the batch and counts it in ``skipped``). The worker runs the companion on
the same inputs and counts agreement, the largest class-probability difference per row
(classes aligned by name) or the absolute difference (regression), companion failures and
the companion's time. The caller never waits and its answer is never changed. At each flush
:meth:`Shadow.records` turns the window into one ``shadow`` record per (served, shadow) pair.

The single-row fast path answers without an encoded batch: a sampled fast-path call hands over
a copy of its row, and the worker encodes it and runs both models on it (the served model's
answer to the row is the fast path's, up to the table's float rounding). Rows waiting in the
queue together are encoded, answered by the served model and compared in one go (numpy's
per-call cost paid once); the companion still runs, and is timed, row by row.
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import InferenceError
from hybridml.shared.rollout import RolloutBlock
from hybridml.shared.schema import EncodedBatch

from .companion import Companion, same_columns, tolerance
from .timebase import WindowClock
from .window import FORMAT, LATENCY_EDGES_MS

if TYPE_CHECKING:
    from .loaded import LoadedVersion
    from .observe import Outcome

log = logging.getLogger("hybridml.edge.shadow")

QUEUE_BATCHES = 64
MERGE_ROWS = 64  # queued fast-path rows the worker encodes and compares at once
PROB_EDGES: tuple[float, ...] = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
ABS_EDGES: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 0.01, 0.1, 1, 10, 100)
Records = list[tuple[str, dict[str, Any], str, int]]


# -------------------------------------------------------------------------------- counters
@dataclass
class ShadowCounts:
    """One (rollout, served, shadow) pair's counts in the current window."""

    rollout: int
    role: str
    served: int
    shadow: int
    task: str
    calls: int = 0
    sampled: int = 0
    skipped: int = 0
    rows: int = 0
    errors: int = 0
    agree: int = 0
    prob_diff: np.ndarray | None = None
    abs_diff: np.ndarray | None = None
    abs_sum: float = 0.0
    abs_max: float = 0.0
    latency: np.ndarray = field(
        default_factory=lambda: np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64))

    def __post_init__(self) -> None:
        if self.task == "regression":
            self.abs_diff = np.zeros(len(ABS_EDGES) + 1, dtype=np.int64)
        else:
            self.prob_diff = np.zeros(len(PROB_EDGES) + 1, dtype=np.int64)

    def add(self, got: Compared) -> None:
        """Count one comparison (the caller holds the counts' lock)."""
        self.rows += got.rows
        self.agree += got.agree
        if self.prob_diff is not None:
            self.prob_diff += got.bins
        else:
            assert self.abs_diff is not None
            self.abs_diff += got.bins
            self.abs_sum += got.total
            self.abs_max = max(self.abs_max, got.top)

    def body(self, model: str, start: float, end: float) -> dict[str, Any]:
        """The ``shadow`` record body (docs/rollouts.md §4)."""
        return {
            "format": FORMAT, "model": model, "rollout": self.rollout, "role": self.role,
            "served": self.served, "shadow": self.shadow, "task": self.task,
            "window": {"start": utc_iso(start), "end": utc_iso(end)},
            "calls": self.calls, "sampled": self.sampled, "skipped": self.skipped,
            "rows": self.rows, "errors": self.errors, "agree": self.agree,
            "prob_diff": None if self.prob_diff is None else
            {"edges": list(PROB_EDGES), "counts": self.prob_diff.tolist()},
            "abs_diff": None if self.abs_diff is None else
            {"edges": list(ABS_EDGES), "counts": self.abs_diff.tolist(),
             "sum": self.abs_sum, "max": self.abs_max},
            "latency_ms": {"edges": list(LATENCY_EDGES_MS), "counts": self.latency.tolist()}}


@dataclass(frozen=True)
class Alignment:
    """Two classifiers' classes lined up by name: the columns of the union of both, where
    each model's classes sit in it (models of one line may order or extend them)."""

    width: int
    served_at: np.ndarray
    companion_at: np.ndarray

    @classmethod
    def of(cls, served: Sequence[Any], companion: Sequence[Any]) -> Alignment:
        """The alignment of ``served``'s classes with ``companion``'s."""
        names = [str(c) for c in served]
        names += [str(c) for c in companion if str(c) not in names]
        return cls(len(names), np.array([names.index(str(c)) for c in served], dtype=np.intp),
                   np.array([names.index(str(c)) for c in companion], dtype=np.intp))


@dataclass(frozen=True)
class Compared:
    """What one comparison adds to a :class:`ShadowCounts`."""

    rows: int
    agree: int
    bins: np.ndarray  # the prob_diff (classifiers) or abs_diff (regression) histogram
    total: float = 0.0  # regression: sum and largest absolute difference
    top: float = 0.0


def compare_classes(align: Alignment, s_labels: np.ndarray, s_probs: np.ndarray,
                    c_labels: np.ndarray, c_probs: np.ndarray) -> Compared:
    """Same label (by name; a served label of -1 — an answer no class names — never
    agrees) and the largest absolute difference of any class's probability, per row."""
    a = np.where(s_labels >= 0, align.served_at[np.clip(s_labels, 0, None)], -1)
    agree = int(np.count_nonzero(a == align.companion_at[c_labels]))
    m = len(c_labels)
    ps = np.zeros((m, align.width), dtype=np.float64)
    pc = np.zeros((m, align.width), dtype=np.float64)
    ps[:, align.served_at] = s_probs
    pc[:, align.companion_at] = c_probs
    diff = np.abs(ps - pc).max(axis=1)
    return Compared(m, agree, np.bincount(np.searchsorted(PROB_EDGES, diff, "right"),
                                          minlength=len(PROB_EDGES) + 1))


def compare_values(s_values: np.ndarray, c_values: np.ndarray, tol: float) -> Compared:
    """Regression: rows whose absolute difference is within ``tol`` agree (a NaN answer
    never does), and the differences' histogram, sum and largest."""
    diff = np.abs(np.asarray(s_values, dtype=np.float64)
                  - np.asarray(c_values, dtype=np.float64))
    m = len(diff)
    diff = diff[np.isfinite(diff)]
    return Compared(m, int(np.count_nonzero(diff <= tol)),
                    np.bincount(np.searchsorted(ABS_EDGES, diff, "right"),
                                minlength=len(ABS_EDGES) + 1),
                    float(diff.sum()) if diff.size else 0.0,
                    float(diff.max()) if diff.size else 0.0)


# ------------------------------------------------------------------------------------ plan
class CallCounter:
    """Calls of one served version in a rollout, counted without a lock: ``next`` of an
    ``itertools.count`` is atomic under the GIL, so concurrent callers never lose a count.
    Reading it takes a number too; reads are remembered and left out (call under the
    owner's lock)."""

    __slots__ = ("count", "flushed", "reads")

    def __init__(self) -> None:
        self.count = itertools.count(1)
        self.reads = 0  # numbers taken by reads, not calls
        self.flushed = 0  # calls counted into earlier windows

    def total(self) -> int:
        """Calls counted so far."""
        n = next(self.count) - 1 - self.reads
        self.reads += 1
        return n

    def pending(self) -> int:
        """Calls since the last :meth:`take`."""
        return self.total() - self.flushed

    def take(self) -> int:
        """Calls since the last :meth:`take`, which are now counted."""
        total = self.total()
        n, self.flushed = total - self.flushed, total
        return n


class ShadowPlan:
    """Which calls of one served version are shadowed with one companion, and how the two
    models' answers line up (class order by name, the regression tolerance).

    :meth:`pick` is all a call pays when it is not sampled: one ``next`` of a counter."""

    def __init__(self, owner: Shadow, served: LoadedVersion, companion: Companion,
                 block: RolloutBlock) -> None:
        self.owner = owner
        self.served = served
        self.companion = companion
        self.block = block
        self.every = 0 if block.sample <= 0 else max(1, math.ceil(1.0 / block.sample - 1e-9))
        self.key = (block.id, served.version, companion.version)
        self.problem = same_columns(served, companion)
        self.tolerance = tolerance(block, served.manifest, companion.manifest)
        self.is_clf = served.is_clf
        self.counter = CallCounter()
        self.align = Alignment.of(served.classes, companion.classes)

    def on(self, v: LoadedVersion) -> ShadowPlan:
        """This plan for another snapshot of the same served version (sharing its counter)."""
        plan = ShadowPlan.__new__(ShadowPlan)
        plan.__dict__.update(self.__dict__)
        plan.served = v
        return plan

    def pick(self) -> bool:
        """Count a call; True when this call is to be shadowed."""
        n = next(self.counter.count)
        return self.every > 0 and n % self.every == 0

    def batch(self, batch: EncodedBatch, outcome: Outcome | None, copy: bool = False) -> None:
        """Hand a sampled call's encoded rows and served answers to the worker (``copy``: the
        arrays may be the caller's own, which it may reuse)."""
        if copy:
            batch = EncodedBatch(batch.num.copy(), batch.cat.copy(), None, batch.out_of_range,
                                 batch.unseen)
        self.owner.submit(self, batch, outcome, None)

    def row(self, row: Any) -> None:
        """Hand a sampled fast-path call's row (copied: callers reuse their dicts)."""
        kept = dict(row) if isinstance(row, Mapping) else list(row)
        self.owner.submit(self, None, None, kept)


# ---------------------------------------------------------------------------------- worker
def drain(q: queue.Queue[Any], timeout: float | None = None) -> bool:
    """Wait until every item put on ``q`` is done (``task_done``); False if ``timeout``
    (seconds) passed first. ``Queue.join`` without the timeout a caller needs."""
    end = None if timeout is None else time.monotonic() + timeout
    with q.all_tasks_done:
        while q.unfinished_tasks:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return False
            q.all_tasks_done.wait(left)
    return True


class Shadow:
    """The shadow worker of one runtime (``EdgeRuntime.shadow``): a bounded queue, one
    daemon thread (started on the first sampled call) and the window's counts.

    ``clock`` (POSIX seconds) dates windows; tests pass their own."""

    def __init__(self, model: str, *, clock: Callable[[], float] = time.time,
                 queue_batches: int = QUEUE_BATCHES) -> None:
        self.model = model
        self.clock = clock
        self._queue: queue.Queue[tuple[ShadowPlan, EncodedBatch | None, Any, Any]] = \
            queue.Queue(maxsize=queue_batches)
        self._lock = threading.Lock()
        self._window: dict[tuple[int, int, int], ShadowCounts] = {}
        self._plans: list[ShadowPlan] = []
        self._windows = WindowClock(clock)
        self._thread: threading.Thread | None = None
        self._warned: set[tuple[int, int, int]] = set()
        self.disabled = 0  # companions not shadowed because their columns differ

    def plan(self, served: LoadedVersion, companion: Companion, block: RolloutBlock
             ) -> ShadowPlan | None:
        """A plan for shadowing ``companion`` beside ``served``; None (logged once, counted
        in :attr:`disabled`) when the companion cannot run the served version's rows."""
        plan = ShadowPlan(self, served, companion, block)
        if plan.problem is not None:
            if plan.key not in self._warned:
                self._warned.add(plan.key)
                log.warning("rollout %s: not shadowing %s v%s beside v%s: %s", block.id,
                            self.model, companion.version, served.version, plan.problem)
            self.disabled += 1
            return None
        with self._lock:
            self._plans.append(plan)
        return plan

    def submit(self, plan: ShadowPlan, batch: EncodedBatch | None, outcome: Any,
               row: Any) -> None:
        """Queue one sampled call for the worker; a full queue drops it (``skipped``)."""
        if self._thread is None:
            self._start_worker()
        try:
            self._queue.put_nowait((plan, batch, outcome, row))
            full = False
        except queue.Full:
            full = True
        with self._lock:
            c = self._counts_locked(plan)
            c.sampled += 1
            c.skipped += full

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued batch has been compared; False if ``timeout`` (seconds)
        passed first."""
        return drain(self._queue, timeout)

    def records(self, drain_s: float = 1.0) -> Records:
        """End the window: one ``shadow`` record ``(kind, body, model, served version)`` per
        pair that was called in it; the counts start again from zero. Waits up to
        ``drain_s`` for queued batches first, so they count in this window."""
        self.drain(drain_s)
        with self._lock:
            plans, window = list(self._plans), self._window
            for plan in plans:
                calls = plan.counter.take()
                if calls:
                    c = window.get(plan.key) or self._new(plan, window)
                    c.calls += calls
            self._window = {}
            live = plans[-1:]  # the newest plan is the loaded one; older ones are done
            self._plans = live
            start, end = self._windows.cut()
        return [("shadow", c.body(self.model, start, end), self.model, c.served)
                for _, c in sorted(window.items()) if c.calls or c.sampled or c.rows]

    def snapshot(self) -> list[dict[str, Any]]:
        """The current window's counts (record bodies; the window goes on)."""
        with self._lock:
            out = []
            for key, c in sorted(self._window.items()):
                body = c.body(self.model, *self._windows.peek())
                plan = next((p for p in self._plans if p.key == key), None)
                body["calls"] += 0 if plan is None else plan.counter.pending()
                out.append(body)
            return out

    # ---------------------------------------------------------------------------- internals
    @staticmethod
    def _new(plan: ShadowPlan, window: dict[tuple[int, int, int], ShadowCounts]
             ) -> ShadowCounts:
        c = window[plan.key] = ShadowCounts(plan.block.id, plan.block.role,
                                            plan.served.version, plan.companion.version,
                                            plan.served.manifest.task)
        return c

    def _start_worker(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hybridml-shadow",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while len(items) < MERGE_ROWS:  # what else is waiting: fast-path rows merge
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self._compare_all(items)
            except Exception as exc:  # the worker must live: these batches go uncounted
                log.warning("shadow comparison failed: %s: %s", type(exc).__name__, exc)
            finally:
                for _ in items:
                    self._queue.task_done()

    def _compare_all(self, items: list[tuple[ShadowPlan, EncodedBatch | None, Any, Any]]
                     ) -> None:
        """Compare queued calls: each batch alone; the fast path's single rows of one plan
        encoded, answered by the served model and compared together, with the companion
        still run (and timed) row by row, as each call would have been."""
        rows: dict[int, tuple[ShadowPlan, list[Any]]] = {}
        for plan, batch, outcome, row in items:
            if batch is not None:
                self._compare(plan, batch, outcome, single=False)
            else:
                rows.setdefault(id(plan), (plan, []))[1].append(row)
        for plan, group in rows.values():
            batch = plan.served.schema.encode(group)
            out = plan.served.session.run(batch)
            self._compare(plan, batch, out, single=True)

    def _compare(self, plan: ShadowPlan, batch: EncodedBatch, served: Any, single: bool
                 ) -> None:
        """Run the companion on ``batch`` (row by row when ``single``: each row was its own
        call) and count how its answers differ from ``served`` (an ``Outcome`` or the
        served model's ``Outputs``)."""
        n = len(batch)
        session = plan.companion.session
        parts = [batch.take([i]) for i in range(n)] if single and n > 1 else [batch]
        took: list[float] = []
        outs: list[Any] = []
        ok = np.ones(n, dtype=bool)
        for i, part in enumerate(parts):
            t0 = time.perf_counter()
            try:
                outs.append(session.run(part))
            except InferenceError:
                ok[i:i + len(part)] = False
            took.append((time.perf_counter() - t0) * 1000.0)
        latency = np.bincount(np.searchsorted(LATENCY_EDGES_MS, took, "right"),
                              minlength=len(LATENCY_EDGES_MS) + 1)
        failed = n - int(ok.sum())
        if not outs:
            with self._lock:
                c = self._counts_locked(plan)
                c.errors += failed
                c.latency += latency
            return
        if plan.is_clf:
            got = compare_classes(plan.align, served.labels[ok], served.probabilities[ok],
                                  np.concatenate([o.labels for o in outs]),
                                  np.concatenate([o.probabilities for o in outs]))
        else:
            got = compare_values(np.asarray(served.values)[ok],
                                 np.concatenate([o.values for o in outs]), plan.tolerance)
        with self._lock:
            c = self._counts_locked(plan)
            c.add(got)
            c.errors += failed
            c.latency += latency

    def _counts_locked(self, plan: ShadowPlan) -> ShadowCounts:
        return self._window.get(plan.key) or self._new(plan, self._window)


# ------------------------------------------------------------------------------- flushing
__all__ = [
    "ABS_EDGES",
    "PROB_EDGES",
    "QUEUE_BATCHES",
    "Alignment",
    "CallCounter",
    "Compared",
    "Shadow",
    "ShadowCounts",
    "ShadowPlan",
    "compare_classes",
    "compare_values",
    "drain",
]
