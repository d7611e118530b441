"""Columnar batch prediction: arrays in, arrays out, no per-row Python objects.

:meth:`EdgeRuntime.predict <hybridml.edge.runtime.EdgeRuntime.predict>` returns one
:class:`Prediction` per row, which costs about a microsecond a row in Python — more than a
small model takes. :func:`predict_arrays` keeps the whole batch in numpy: the same schema
checks, table, model and fallback policy, answered as a :class:`BatchPrediction`.

The table is consulted only while it pays: a lookup costs ~0.2 µs a row, a linear model about
as much in a batch. The per-row costs of both and the hit rate are measured as batches go by,
and a batch skips the table when the model time its hits would save is less than the lookups
cost (the table holds the same model's answers, so only ``source`` differs). Every 32nd skipped
batch looks up a sample of 64 of its rows, so a hit rate that comes back is noticed at ~1/16
of a full lookup's cost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import InputError, NoModelError
from hybridml.shared.schema import MISSING_CATEGORY, UNSEEN_CODE

if TYPE_CHECKING:
    from .runtime import EdgeRuntime

log = logging.getLogger("hybridml.edge.columnar")

PROBE_EVERY = 32
SAMPLE_ROWS = 64  # rows a probe looks up: enough to see a hit rate worth the lookups
_SOURCES = np.array(["precomputed", "edge", "cloud"], dtype=object)


class BatchPrediction:
    """Answers for a batch, one entry per row; the object arrays are built on first access.

    ``labels`` (class indices) and ``probabilities`` float32 ``[N, C]`` for classifiers, or
    ``values`` float32 ``[N]`` for regression; ``predictions`` maps labels to class values.
    ``source`` is ``precomputed``, ``edge`` or ``cloud`` per row; ``reason`` names why a row
    went to the cloud (or would have: then ``degraded`` is True), None elsewhere.
    """

    def __init__(self, labels: np.ndarray | None, probabilities: np.ndarray | None,
                 values: np.ndarray | None, classes: list[Any], source_code: np.ndarray,
                 reason: np.ndarray | None, degraded: np.ndarray | None,
                 model_version: int | None) -> None:
        self.labels, self.probabilities, self.values = labels, probabilities, values
        self.classes = classes
        self.model_version = model_version
        self._source_code = source_code  # uint8: index into _SOURCES
        self._reason, self._degraded = reason, degraded
        self._cloud: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self._source_code.shape[0])

    @property
    def predictions(self) -> np.ndarray:
        """Class values (classifiers) or float values (regression), one per row."""
        if self.labels is None:
            assert self.values is not None
            out = self.values
        else:
            out = np.asarray(self.classes, dtype=object)[self.labels]
        if self._cloud:
            out = out.copy() if out is self.values else out
            for i, v in self._cloud.items():
                out[i] = v
        return out

    @property
    def source(self) -> np.ndarray:
        """``precomputed``, ``edge`` or ``cloud`` per row."""
        return _SOURCES[self._source_code]

    @property
    def reason(self) -> np.ndarray:
        """Fallback reason per row, or None."""
        return self._reason if self._reason is not None else \
            np.full(len(self), None, dtype=object)

    @property
    def degraded(self) -> np.ndarray:
        """True where the cloud was wanted but did not answer."""
        return self._degraded if self._degraded is not None else \
            np.zeros(len(self), dtype=bool)


@dataclass
class TableCost:
    """Running per-row costs (seconds) of a table lookup and of the model, per runtime."""

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
    def _mix(old: float | None, new: float) -> float:
        return new if old is None else 0.8 * old + 0.2 * new


def _check_arrays(rt: EdgeRuntime, num: Any, cat: Any) -> tuple[np.ndarray, np.ndarray]:
    assert rt.manifest is not None
    schema = rt.manifest.schema
    n_num, n_cat = schema.n_numeric, schema.n_categorical
    rows = None
    if n_num:
        if num is None:
            raise InputError(f"num= is required: the model takes {n_num} numeric columns "
                             f"({', '.join(schema.numeric_names)})", field="num")
        if type(num) is np.ndarray and num.dtype == np.float32:
            num = np.ascontiguousarray(num)  # nothing to convert: no overflow to silence
        else:
            try:
                with np.errstate(over="ignore"):  # past float32 becomes inf, refused below
                    num = np.ascontiguousarray(num, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise InputError(f"num holds a value that is not a number ({exc}); send "
                                 "numbers, with NaN or None for missing", field="num") from None
        if num.ndim != 2 or num.shape[1] != n_num:
            raise InputError(f"num has shape {num.shape}; send [N, {n_num}] in the order "
                             f"{', '.join(schema.numeric_names)}", field="num")
        rows = num.shape[0]
    if n_cat:
        if cat is None:
            raise InputError(f"cat= is required: the model takes {n_cat} categorical columns "
                             f"({', '.join(schema.categorical_names)})", field="cat")
        cat = np.asarray(cat, dtype=object)
        if cat.ndim != 2 or cat.shape[1] != n_cat or (rows is not None and len(cat) != rows):
            raise InputError(f"cat has shape {cat.shape}; send [N, {n_cat}] strings in the "
                             f"order {', '.join(schema.categorical_names)}", field="cat")
        rows = len(cat)
    assert rows is not None
    if not n_num:
        num = np.empty((rows, 0), dtype=np.float32)
    if not n_cat:
        cat = np.empty((rows, 0), dtype=object)
    return num, cat


def predict_arrays(rt: EdgeRuntime, num: Any = None, cat: Any = None,
                   cost: TableCost | None = None) -> BatchPrediction:
    """Predict rows given as ``num`` float [N, n_numeric] and ``cat`` str [N, n_categorical]."""
    manifest, session, table = rt.manifest, rt.session, rt.table
    if manifest is None or session is None:
        raise NoModelError(f"no model {rt.name!r} loaded; run sync first", name=rt.name)
    num, cat = _check_arrays(rt, num, cat)
    batch = manifest.schema._from_arrays(num, cat)
    if cat.size and batch.unseen.any():
        cat, batch = _clean_categories(manifest.schema, num, cat, batch)
    # With finite training bounds an infinite value is also out of range: only rows the range
    # check flagged can hold one, so the whole-array isinf pass is skipped on clean batches.
    finite = manifest.schema.finite_bounds
    suspect = batch.out_of_range if finite else slice(None)
    if num.size and not (finite and batch.clean) and np.isinf(num[suspect]).any():
        r, j = np.argwhere(np.isinf(num))[0]
        names = manifest.schema.numeric_names
        raise InputError(f"row {r} column {names[j]!r} is infinite or too large for float32; "
                         "send a finite number or NaN", row=int(r), field=names[j])
    n = len(batch)
    is_clf = manifest.task != "regression"
    classes = list(manifest.classes or ())
    cost = cost or TableCost()
    labels = probs = values = None
    miss: np.ndarray | slice = slice(None)
    code = np.ones(n, dtype=np.uint8)  # 1 = edge
    n_miss = n
    plan = cost.plan(n) if table is not None and n else None
    if plan == "sample":
        _probe(table, manifest.schema, batch, cost)
    elif plan == "all":
        assert table is not None
        t0 = time.perf_counter()
        hit = table.lookup_many(manifest.schema.keys(batch))
        cost.lookup = cost._mix(cost.lookup, (time.perf_counter() - t0) / n)
        found = np.flatnonzero(hit >= 0)
        cost.hit_rate = cost._mix(cost.hit_rate, found.size / n)
        if found.size:
            code[found] = 0
            labels = np.zeros(n, dtype=np.int64)
            values = np.zeros(n, dtype=np.float32)
            probs = np.zeros((n, len(classes)), dtype=np.float32) if is_clf else None
            t_labels, t_probs, t_values = table.take(hit[found])
            if is_clf:
                labels[found], probs[found] = t_labels, t_probs  # type: ignore[index]
            else:
                values[found] = t_values
            miss = np.flatnonzero(hit < 0)
            n_miss = miss.size
    local_failed = False
    if n_miss:
        t0 = time.perf_counter()
        try:
            out = session.run(batch if n_miss == n else batch.take(miss))
            if n_miss == n:  # every row ran: take the outputs as they are, no copies
                labels, probs, values = out.labels, out.probabilities, out.values
            elif is_clf:
                labels[miss] = out.labels  # type: ignore[index,assignment]
                probs[miss] = out.probabilities  # type: ignore[index]
            else:
                values[miss] = out.values  # type: ignore[index]
        except Exception as exc:  # onnxruntime's own error types
            log.warning("local inference failed: %s", exc)
            local_failed = True
            if labels is None:
                labels = np.zeros(n, dtype=np.int64)
                values = np.zeros(n, dtype=np.float32)
                probs = np.zeros((n, len(classes)), dtype=np.float32) if is_clf else None
        cost.model = cost._mix(cost.model, (time.perf_counter() - t0) / n_miss)
    if labels is None and values is None:  # no row ran: an empty batch
        labels = np.zeros(n, dtype=np.int64)
        values = np.zeros(n, dtype=np.float32)
        probs = np.zeros((n, len(classes)), dtype=np.float32) if is_clf else None
    if not is_clf:
        labels = None
    result = BatchPrediction(labels, probs, values if not is_clf else None, classes, code,
                             None, None, manifest.version)
    ask = _flagged(rt, batch, probs, local_failed)
    if ask.size:
        _fallback(rt, result, batch, num, cat, ask, local_failed)
    return result


def _probe(table: Any, schema: Any, batch: Any, cost: TableCost) -> None:
    """Refresh the hit rate from a spread sample of the batch (the model answers every row).

    Only the hit rate is updated: a small lookup's per-row cost would overstate a full one.
    """
    pick = np.linspace(0, len(batch) - 1, SAMPLE_ROWS).astype(np.intp)
    hit = table.lookup_many(schema.keys(batch.take(pick)))
    cost.hit_rate = cost._mix(cost.hit_rate, float((hit >= 0).mean()))


def _fallback(rt: EdgeRuntime, result: BatchPrediction, batch: Any, num: np.ndarray,
              cat: np.ndarray, ask: np.ndarray, local_failed: bool) -> None:
    """Ask the cloud for the flagged rows; mark them degraded when it does not answer."""
    assert rt.manifest is not None
    schema = rt.manifest.schema
    n = len(result)
    probs = result.probabilities
    reasons = np.full(n, None, dtype=object)
    reasons[ask] = rt._reasons(batch.take(ask), None if probs is None else probs[ask],
                               local_failed)
    result._reason = reasons
    rows = [[None if v != v else v for v in nr] + list(cr)
            for nr, cr in zip(num[ask].tolist(), cat[ask].tolist())]
    order = [*schema.numeric_names, *schema.categorical_names]
    answer = rt._ask_cloud([dict(zip(order, r)) for r in rows])
    if answer is None:
        degraded = np.zeros(n, dtype=bool)
        degraded[ask] = True
        result._degraded = degraded
        if local_failed:
            raise NoModelError("local inference failed and the cloud did not answer: "
                               f"{rt.last_cloud_error}")
        return
    cloud_probs = answer.get("probabilities")
    for k, i in enumerate(ask.tolist()):
        result._cloud[i] = answer["predictions"][k]
        result._source_code[i] = 2
        if probs is not None and isinstance(cloud_probs, list):
            probs[i] = [cloud_probs[k].get(str(c), 0.0) for c in result.classes]


def _clean_categories(schema: Any, num: np.ndarray, cat: np.ndarray, batch: Any
                      ) -> tuple[np.ndarray, Any]:
    """Check the cells that matched no category: None becomes missing, a non-string is an
    InputError. A cell that matched a category is a string already (the keys are strings), so
    only these few cells are looked at in Python.
    """
    cells = cat[batch.codes == UNSEEN_CODE]
    kinds = set(map(type, cells.tolist()))
    bad = [k for k in kinds if not issubclass(k, str) and k is not type(None)]
    if bad:
        raise InputError(f"cat holds a {bad[0].__name__}; categorical values are strings "
                         "(None for missing)", field="cat")
    if type(None) in kinds:
        cat = cat.copy()
        cat[np.equal(cat, None)] = MISSING_CATEGORY  # type: ignore[call-overload]
        batch = schema._from_arrays(num, cat)
    return cat, batch


def _flagged(rt: EdgeRuntime, batch: Any, probs: np.ndarray | None,
             local_failed: bool) -> np.ndarray:
    """Rows the fallback policy sends to the cloud (vectorised; reasons are named later)."""
    p = rt.policy
    n = len(batch)
    if local_failed:
        return np.arange(n)
    if not p.enabled or (batch.clean and not (p.min_confidence and probs is not None)):
        return np.empty(0, dtype=np.intp)
    flag = np.zeros(n, dtype=bool)
    if p.on_out_of_range:
        flag |= batch.out_of_range
    if p.on_unseen:
        flag |= batch.unseen
    if p.min_confidence and probs is not None and probs.size:
        flag |= probs.max(axis=1) < p.min_confidence
    return np.flatnonzero(flag)
