"""The device side of a rollout: the companion model, and shadowing it (docs/rollouts.md §4).

A device in a rollout's cohort has a ``rollout`` block in its active manifest
(:mod:`hybridml.shared.rollout`) and the other version, the *companion*, in
``companion.json`` (:meth:`~hybridml.edge.store.LocalStore.companion`).
:func:`load_rollout` pairs the loaded served version with its loaded companion in one
:class:`Rollout`, which the runtime swaps in beside the version; a call uses it only when its
``served`` is the very version the call read, so no call ever pairs a version with another
version's companion.

Roles ``shadow`` and ``canary`` shadow the companion: every ⌈1/sample⌉-th call (a counter, not
randomness) hands its encoded rows and the served answers to :class:`Shadow`'s worker thread
through a bounded queue (:data:`QUEUE_BATCHES`; a full queue drops the batch and counts it in
``skipped``). The worker runs the companion on the same inputs and counts agreement, the
largest class-probability difference per row (classes aligned by name) or the absolute
difference (regression), companion failures and the companion's time. The caller never waits
and its answer is never changed. At each flush :meth:`Shadow.records` turns the window into one
``shadow`` record per (served, shadow) pair.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import HybridMLError, InferenceError, ModelLoadError
from hybridml.shared.manifest import DELIVERY_KEYS, Manifest, canonical_json
from hybridml.shared.rollout import SHADOW_ROLES, RolloutBlock
from hybridml.shared.schema import EncodedBatch

from .session import ModelSession
from .window import FORMAT, LATENCY_EDGES_MS

if TYPE_CHECKING:
    from .loaded import LoadedVersion
    from .observe import Outcome
    from .store import LocalStore

log = logging.getLogger("hybridml.edge.shadow")

QUEUE_BATCHES = 64
MERGE_ROWS = 64  # queued fast-path rows the worker encodes and compares at once
PROB_EDGES: tuple[float, ...] = (0.001, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
ABS_EDGES: tuple[float, ...] = (1e-6, 1e-4, 1e-3, 0.01, 0.1, 1, 10, 100)
DEFAULT_TOLERANCE = 1e-3
COMPANION_ROLES = (*SHADOW_ROLES, "interleave")  # roles that load the companion
Records = list[tuple[str, dict[str, Any], str, int]]


# ---------------------------------------------------------------------------- the companion
@dataclass(frozen=True)
class Companion:
    """The loaded companion: its manifest and onnxruntime session."""

    manifest: Manifest
    session: ModelSession

    @property
    def version(self) -> int:
        """The companion's version."""
        return self.manifest.version

    @property
    def classes(self) -> tuple[Any, ...]:
        """The companion's classes (empty for regression)."""
        return tuple(self.manifest.classes or ())


@dataclass(frozen=True)
class Rollout:
    """The rollout a loaded version takes part in: its ``block``, the loaded ``companion``
    (None when the store has none that fits, or it failed to load) and, for roles shadow and
    canary with a companion of the same columns, the shadow ``plan``."""

    served: LoadedVersion
    block: RolloutBlock
    companion: Companion | None
    plan: ShadowPlan | None

    def on(self, v: LoadedVersion) -> Rollout:
        """This rollout for another snapshot of the same version (a new table or policy)."""
        plan = None if self.plan is None else self.plan.on(v)
        return replace(self, served=v, plan=plan)


def load_rollout(store: LocalStore, name: str, v: LoadedVersion, shadow: Shadow,
                 threads: int = 1) -> tuple[Rollout | None, HybridMLError | None]:
    """The :class:`Rollout` of the loaded version ``v`` (None outside a rollout) and the
    error its companion failed to load with (None if it loaded, or none was needed)."""
    block = RolloutBlock.of(v.manifest)
    if block is None:
        return None, None
    wanted = block.companion_manifest() if block.role in COMPANION_ROLES else None
    if wanted is None:
        return Rollout(v, block, None, None), None
    kept = store.companion(name)
    if kept is None or kept.content() != wanted.content():
        log.warning("rollout %s: the store holds no companion v%s for %s v%s (a sync did not "
                    "fetch it, or it failed its checks); serving alone", block.id,
                    wanted.version, name, v.version)
        return Rollout(v, block, None, None), None
    model = kept.artifact("model")
    assert model is not None  # Manifest.from_json guarantees a model artifact
    try:
        session = ModelSession(store.artifact_path(model.sha256), kept.schema, kept.task,
                               threads=threads)
        session.warm()
    except (ModelLoadError, InferenceError, OSError) as exc:
        err = exc if isinstance(exc, HybridMLError) else \
            ModelLoadError(f"cannot open companion v{kept.version}: {exc}")
        log.warning("rollout %s: companion %s v%s failed to load, serving v%s alone: %s",
                    block.id, name, kept.version, v.version, err.message)
        return Rollout(v, block, None, None), err
    companion = Companion(kept, session)
    plan = shadow.plan(v, companion, block) if block.role in SHADOW_ROLES else None
    return Rollout(v, block, companion, plan), None


def companion_changed(store: LocalStore, name: str, v: LoadedVersion,
                      rollout: Rollout | None) -> bool:
    """Whether the store now holds another companion for the loaded ``v`` than ``rollout``
    has loaded (a sync fetched it after ``v`` was loaded alone, say)."""
    block = RolloutBlock.of(v.manifest)
    have = None if rollout is None or rollout.served is not v or rollout.companion is None \
        else rollout.companion.manifest.content()
    if block is None or block.companion is None or block.role not in COMPANION_ROLES:
        return have is not None
    kept = store.companion(name)
    fits = kept is not None and kept.content() == canonical_json(
        {k: x for k, x in block.companion.items() if k not in DELIVERY_KEYS})
    return (kept.content() if fits and kept is not None else None) != have


def same_columns(v: LoadedVersion, companion: Companion) -> str | None:
    """Why the companion cannot run the served version's encoded rows, or None if it can
    (the same feature names and kinds in the same order, and the same kind of task)."""
    a, b = v.schema, companion.manifest.schema
    if a.names != b.names or [f.kind for f in a.features] != [f.kind for f in b.features]:
        return f"its columns {list(b.names)} differ from the served version's {list(a.names)}"
    if (v.manifest.task == "regression") != (companion.manifest.task == "regression"):
        return f"its task {companion.manifest.task!r} is not comparable to {v.manifest.task!r}"
    return None


def tolerance(block: RolloutBlock, served: Manifest, companion: Manifest) -> float:
    """Regression agreement bound: 10 % of the stable version's holdout RMSE (the companion
    in a canary, else the served version), else :data:`DEFAULT_TOLERANCE`."""
    stable = companion if block.role == "canary" else served
    metrics = stable.raw.get("metrics")
    if isinstance(metrics, Mapping):
        for where in (metrics, metrics.get("edge_test"), metrics.get("sklearn_test")):
            rmse = where.get("rmse") if isinstance(where, Mapping) else None
            if isinstance(rmse, (int, float)) and not isinstance(rmse, bool) \
                    and math.isfinite(rmse) and rmse > 0:
                return 0.1 * float(rmse)
    return DEFAULT_TOLERANCE


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
        # Class alignment by name: columns of a union of both models' classes.
        names = [str(c) for c in served.classes]
        for c in companion.classes:
            if str(c) not in names:
                names.append(str(c))
        self.width = len(names)
        self.served_at = np.array([names.index(str(c)) for c in served.classes], dtype=np.intp)
        self.companion_at = np.array([names.index(str(c)) for c in companion.classes],
                                     dtype=np.intp)

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
        self._start = clock()
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
            start, end = self._start, self.clock()
            self._start = end
        return [("shadow", c.body(self.model, start, end), self.model, c.served)
                for _, c in sorted(window.items()) if c.calls or c.sampled or c.rows]

    def snapshot(self) -> list[dict[str, Any]]:
        """The current window's counts (record bodies; the window goes on)."""
        with self._lock:
            out = []
            for key, c in sorted(self._window.items()):
                body = c.body(self.model, self._start, self.clock())
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
            s_labels, s_probs = served.labels[ok], served.probabilities[ok]
            c_labels = np.concatenate([o.labels for o in outs])
            c_probs = np.concatenate([o.probabilities for o in outs])
            a = np.where(s_labels >= 0, plan.served_at[np.clip(s_labels, 0, None)], -1)
            agree = int(np.count_nonzero(a == plan.companion_at[c_labels]))
            m = len(c_labels)
            ps = np.zeros((m, plan.width), dtype=np.float64)
            pc = np.zeros((m, plan.width), dtype=np.float64)
            ps[:, plan.served_at] = s_probs
            pc[:, plan.companion_at] = c_probs
            diff = np.abs(ps - pc).max(axis=1)
            bins = np.bincount(np.searchsorted(PROB_EDGES, diff, "right"),
                               minlength=len(PROB_EDGES) + 1)
            total = top = 0.0
        else:
            values = np.concatenate([o.values for o in outs]).astype(np.float64)
            diff = np.abs(np.asarray(served.values, dtype=np.float64)[ok] - values)
            m = len(diff)
            diff = diff[np.isfinite(diff)]  # a NaN answer (the cloud's None) never agrees
            agree = int(np.count_nonzero(diff <= plan.tolerance))
            bins = np.bincount(np.searchsorted(ABS_EDGES, diff, "right"),
                               minlength=len(ABS_EDGES) + 1)
            total = float(diff.sum()) if diff.size else 0.0
            top = float(diff.max()) if diff.size else 0.0
        with self._lock:
            c = self._counts_locked(plan)
            c.rows += m
            c.errors += failed
            c.agree += agree
            c.latency += latency
            if c.prob_diff is not None:
                c.prob_diff += bins
            else:
                assert c.abs_diff is not None
                c.abs_diff += bins
                c.abs_sum += total
                c.abs_max = max(c.abs_max, top)

    def _counts_locked(self, plan: ShadowPlan) -> ShadowCounts:
        return self._window.get(plan.key) or self._new(plan, self._window)


# ------------------------------------------------------------------------------- flushing
__all__ = [
    "ABS_EDGES",
    "COMPANION_ROLES",
    "DEFAULT_TOLERANCE",
    "PROB_EDGES",
    "QUEUE_BATCHES",
    "CallCounter",
    "Companion",
    "Rollout",
    "Shadow",
    "ShadowCounts",
    "ShadowPlan",
    "companion_changed",
    "drain",
    "load_rollout",
    "same_columns",
    "tolerance",
]
