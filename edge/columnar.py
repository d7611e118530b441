"""Columnar batch prediction: arrays in, arrays out, no per-row Python objects.

:meth:`EdgeRuntime.predict <hybridml.edge.runtime.EdgeRuntime.predict>` returns one
:class:`Prediction` per row, which costs about a microsecond a row in Python — more than a
small model takes. :func:`predict_arrays` keeps the whole batch in numpy: the same schema
checks, table, model and fallback, answered as a :class:`BatchPrediction`. The arrays are
encoded by :meth:`InputSchema.encode_arrays <hybridml.shared.schema.InputSchema.encode_arrays>`
(the cell rules of every other route), inferred by :meth:`LoadedVersion.infer
<hybridml.edge.loaded.LoadedVersion.infer>` and sent to the cloud by the one
:class:`~hybridml.edge.fallback.Fallback`.

The table is consulted only while it pays: a lookup costs ~0.2 µs a row, a linear model about
as much in a batch. The per-row costs of both and the hit rate are measured as batches go by,
and a batch skips the table when the model time its hits would save is less than the lookups
cost (the table holds the same model's answers, so only ``source`` differs). Every 32nd skipped
batch looks up a sample of 64 of its rows, so a hit rate that comes back is noticed at ~1/16
of a full lookup's cost.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridml.shared.errors import InferenceError
from hybridml.shared.schema import EncodedBatch

from .fallback import REASONS, Fallback
from .loaded import CLOUD, SOURCES, LoadedVersion
from .observe import Outcome

_SOURCES = np.array(SOURCES, dtype=object)
_REASONS = np.array(REASONS, dtype=object)


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
        self._reason_code: np.ndarray | None = None  # uint8: index into _REASONS
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

    def outcome(self) -> Outcome:
        """These answers as the observers' arrays (:class:`~hybridml.edge.observe.Outcome`):
        class indices (the cloud's answers included) and probabilities, or values."""
        n = len(self)
        reason = self._reason_code if self._reason_code is not None else \
            np.zeros(n, dtype=np.uint8)
        if self.labels is None:
            values = self.values
            if self._cloud:
                assert values is not None
                values = values.astype(np.float64)
                for i, v in self._cloud.items():
                    values[i] = np.nan if v is None else v
            return Outcome(self._source_code, reason, self._degraded, None, values, None)
        labels = self.labels
        if self._cloud:
            index = {str(c): j for j, c in enumerate(self.classes)}
            labels = labels.copy()
            for i, v in self._cloud.items():
                labels[i] = index.get(str(v), -1)
        return Outcome(self._source_code, reason, self._degraded, labels, None,
                       self.probabilities)


def predict_arrays(v: LoadedVersion, fallback: Fallback, num: Any = None, cat: Any = None
                   ) -> tuple[BatchPrediction, EncodedBatch]:
    """Predict rows given as ``num`` float [N, n_numeric] and ``cat`` str [N, n_categorical]
    with the loaded version ``v``; rows the policy flags go to the cloud through ``fallback``.
    Returns the answers and the encoded rows (for the observers).
    """
    batch = v.schema.encode_arrays(num, cat)
    n = len(batch)
    plan = v.cost.plan(n) if v.table is not None and n else None
    inf = v.infer(batch, plan)
    result = BatchPrediction(inf.labels, inf.probabilities, inf.values, list(v.classes),
                             inf.source, None, None, v.version)
    reasons = fallback.reasons(batch, inf.probabilities, inf.local_failed)
    ask = np.flatnonzero(reasons)
    if not ask.size:
        return result, batch
    result._reason = _REASONS[reasons]
    result._reason_code = reasons
    answers = fallback.ask(v.manifest, batch.take(ask))
    degraded = np.zeros(n, dtype=bool)
    probs = result.probabilities
    for i, a in zip(ask.tolist(), answers):
        if a is None:
            degraded[i] = True
            continue
        result._cloud[i] = a.prediction
        result._source_code[i] = CLOUD
        if probs is not None and a.probabilities is not None:
            probs[i] = [a.probabilities.get(str(c), 0.0) for c in result.classes]
    if degraded.any():
        result._degraded = degraded
        if inf.local_failed:
            raise InferenceError(f"local inference failed and the cloud did not answer "
                                 f"{int(degraded.sum())} of {n} row(s): {fallback.last_error}")
    return result, batch
