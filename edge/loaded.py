"""One loaded model version: manifest, schema, session, table and fast path, never mixed.

:class:`LoadedVersion` is immutable: sync, rollback, a new policy or a new table build a new
one, and the runtime swaps it in with one assignment. A prediction reads the runtime's version
once and uses only that object, so it never combines one version's model with another's table
or manifest, however many threads predict while the store changes. A replaced version's table
is unmapped when the last prediction holding it lets go (no explicit close under a reader).

:meth:`LoadedVersion.infer` is the one inference stage every predict path shares: exact-match
table lookup, then one onnxruntime run for the rows the table does not hold. The columnar path
may skip the table when lookups cost more than the model time they save (:class:`TableCost`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridml.shared.errors import InferenceError
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import EncodedBatch, InputSchema
from hybridml.shared.table import Table

from .fallback import FallbackPolicy
from .fastpath import RowPath
from .session import ORT_ERRORS, ModelSession

log = logging.getLogger("hybridml.edge.loaded")

PROBE_EVERY = 32
SAMPLE_ROWS = 64  # rows a probe looks up: enough to see a hit rate worth the lookups
PRECOMPUTED, EDGE, CLOUD = 0, 1, 2  # source codes
SOURCES = ("precomputed", "edge", "cloud")


@dataclass
class TableCost:
    """Running per-row costs (seconds) of a table lookup and of the model, per version."""

    lookup: float | None = None
    model: float | None = None
    hit_rate: float = 1.0
    batches: int = 0

    def plan(self, rows: int) -> str | None:
        """How this batch uses the table: ``"all"`` rows are looked up when a lookup costs
        less than the model time the hits save; otherwise every ``PROBE_EVERY``-th batch
        looks up a ``"sample"`` to notice when the hit rate comes back; else None."""
        self.batches += 1
        if self.lookup is None or self.model is None or \
                self.lookup < self.hit_rate * self.model:
            return "all"
        if self.batches % PROBE_EVERY == 0:
            return "sample" if rows > 2 * SAMPLE_ROWS else "all"
        return None

    @staticmethod
    def mix(old: float | None, new: float) -> float:
        """An exponential moving average step."""
        return new if old is None else 0.8 * old + 0.2 * new


@dataclass
class Inference:
    """Local answers for a batch: class indices and probabilities, or values; per row where
    each came from (:data:`SOURCES` codes) and whether the model failed to run."""

    labels: np.ndarray | None  # int64 [N]
    probabilities: np.ndarray | None  # float32 [N, C]
    values: np.ndarray | None  # float32 [N]
    source: np.ndarray  # uint8 [N]
    local_failed: bool


class LoadedVersion:
    """An immutable snapshot of one active version, ready to predict."""

    __slots__ = ("classes", "cost", "fast", "is_clf", "manifest", "policy", "schema",
                 "session", "table", "version")

    def __init__(self, manifest: Manifest, session: ModelSession, table: Table | None,
                 policy: FallbackPolicy, make: Callable[..., Any]) -> None:
        self.manifest = manifest
        self.session = session
        self.table = table
        self.policy = policy
        self.schema: InputSchema = manifest.schema
        self.version: int = manifest.version
        self.is_clf = manifest.task != "regression"
        self.classes: tuple[Any, ...] = tuple(manifest.classes or ())
        self.cost = TableCost()  # statistics, not state: safe to share between threads
        self.fast = _row_path(self, make)

    @classmethod
    def load(cls, manifest: Manifest, model_path: Any, table_path: Any | None,
             policy: FallbackPolicy, make: Callable[..., Any], threads: int = 1
             ) -> LoadedVersion:
        """Load the model (warmed up) and open its table."""
        model = manifest.artifact("model")
        assert model is not None  # Manifest.from_json guarantees a model artifact
        session = ModelSession(model_path, manifest.schema, manifest.task, threads=threads)
        session.warm()
        table = None if table_path is None else \
            Table.open(table_path, model_sha256=model.sha256)
        return cls(manifest, session, table, policy, make)

    def replace(self, *, policy: FallbackPolicy | None = None, table: Table | bool | None = False,
                make: Callable[..., Any]) -> LoadedVersion:
        """A new snapshot of this version with another policy or table (``table=False``:
        keep it); the session is shared, the fast path rebuilt."""
        return LoadedVersion(self.manifest, self.session,
                             self.table if table is False else table,  # type: ignore[arg-type]
                             policy or self.policy, make)

    # --------------------------------------------------------------------------- infer
    def infer(self, batch: EncodedBatch, plan: str | None = "all") -> Inference:
        """Table lookup (per ``plan``: ``"all"``, ``"sample"`` or None), then the model on
        the rows the table does not hold."""
        n = len(batch)
        is_clf = self.is_clf
        n_cls = len(self.classes)
        table, cost = self.table, self.cost
        labels = probs = values = None
        source = np.full(n, 1, dtype=np.uint8)
        miss: np.ndarray | slice = slice(None)
        n_miss = n
        if table is None or not n:
            plan = None
        if plan == "sample":
            self._probe(batch)
        elif plan == "all":
            assert table is not None
            t0 = time.perf_counter()
            keys = self.schema.keys(batch)
            hit = np.array([table.lookup(keys[0].tobytes())]) if n == 1 \
                else table.lookup_many(keys)
            cost.lookup = cost.mix(cost.lookup, (time.perf_counter() - t0) / n)
            found = np.flatnonzero(hit >= 0)
            cost.hit_rate = cost.mix(cost.hit_rate, found.size / n)
            if found.size:
                source[found] = PRECOMPUTED
                labels, probs, values = _zeros(n, n_cls, is_clf)
                t_labels, t_probs, t_values = table.take(hit[found])
                if is_clf:
                    labels[found], probs[found] = t_labels, t_probs  # type: ignore[index]
                else:
                    values[found] = t_values  # type: ignore[index]
                miss = np.flatnonzero(hit < 0)
                n_miss = miss.size
        local_failed = False
        if n_miss:
            t0 = time.perf_counter()
            try:
                out = self.session.run(batch if n_miss == n else batch.take(miss))
            except InferenceError as exc:
                log.warning("local inference failed: %s", exc.message)
                local_failed = True
                if labels is None:
                    labels, probs, values = _zeros(n, n_cls, is_clf)
            else:
                if n_miss == n:  # every row ran: take the outputs as they are, no copies
                    labels, probs, values = out.labels, out.probabilities, out.values
                elif is_clf:
                    labels[miss] = out.labels  # type: ignore[index]
                    probs[miss] = out.probabilities  # type: ignore[index]
                else:
                    values[miss] = out.values  # type: ignore[index]
            cost.model = cost.mix(cost.model, (time.perf_counter() - t0) / n_miss)
        if labels is None and values is None:  # no row ran: an empty batch
            labels, probs, values = _zeros(n, n_cls, is_clf)
        if is_clf:
            values = None
        else:
            labels = probs = None
        return Inference(labels, probs, values, source, local_failed)

    def _probe(self, batch: EncodedBatch) -> None:
        """Refresh the hit rate from a spread sample of the batch (the model answers every
        row). Only the hit rate is updated: a small lookup's per-row cost would overstate a
        full one."""
        assert self.table is not None
        pick = np.linspace(0, len(batch) - 1, SAMPLE_ROWS).astype(np.intp)
        hit = self.table.lookup_many(self.schema.keys(batch.take(pick)))
        self.cost.hit_rate = self.cost.mix(self.cost.hit_rate, float((hit >= 0).mean()))


def _zeros(n: int, n_cls: int, is_clf: bool
           ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    return (np.zeros(n, dtype=np.int64),
            np.zeros((n, n_cls), dtype=np.float32) if is_clf else None,
            np.zeros(n, dtype=np.float32))


def _row_path(v: LoadedVersion, make: Callable[..., Any]) -> RowPath | None:
    """The single-row fast path of ``v``, or None where this onnxruntime cannot build it (the
    general path then answers every row, correctly, a little slower)."""
    try:
        return RowPath(v.schema, v.session, v.table, v.policy, make, v.version, v.classes)
    except (AttributeError, InferenceError, *ORT_ERRORS) as exc:
        log.warning("single-row fast path unavailable for v%s: %s", v.version, exc)
        return None
