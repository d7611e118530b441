"""The one hook on the edge's predict path: observers see every prediction call.

Every door of :class:`~hybridml.edge.runtime.EdgeRuntime` — one row (fast path or not), many
rows, text columns, arrays — ends in the same place, which hands each observer an
:class:`Observation` of what was answered. Telemetry, drift counters and a shadow model hook in
here, once, and see every route.

An observation may carry the call's answers as arrays (:class:`Outcome`) and the time the call
took (``elapsed``), so that an observer counting them (:mod:`hybridml.edge.telemetry`) needs no
loop over rows. The single-row fast path does not build observations for the runtime's own
telemetry: it reports each answer to the version's :class:`~hybridml.edge.telemetry.RowTap`
instead, which costs a list append (see that module).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from hybridml.shared.schema import EncodedBatch

if TYPE_CHECKING:
    from .loaded import LoadedVersion


class Outcome(NamedTuple):
    """The answers of one call as arrays, one entry per answered row.

    ``source`` holds :data:`~hybridml.edge.loaded.SOURCES` codes and ``reason`` the fallback's
    :data:`~hybridml.edge.fallback.REASONS` codes (0: none); ``degraded`` marks rows the cloud
    was asked for and did not answer (None: no such row). Classifiers give ``labels`` (class
    indices; -1 for a class the model does not know) and ``probabilities`` ``[N, classes]``
    (the cloud's, for rows the cloud answered); regression gives ``values``.
    """

    source: np.ndarray
    reason: np.ndarray
    degraded: np.ndarray | None
    labels: np.ndarray | None
    values: np.ndarray | None
    probabilities: np.ndarray | None


class Observation:
    """One predict call: its ``route`` (``row``, ``rows``, ``text`` or ``arrays``), the
    loaded ``version`` that answered, and the ``predictions`` it returned (a list of
    :class:`~hybridml.edge.runtime.Prediction`, or a
    :class:`~hybridml.edge.columnar.BatchPrediction` for arrays).

    :attr:`inputs` is the encoded batch the model saw, built on first access for the
    single-row fast path (which never builds one) so that observers that do not need it cost
    nothing. ``elapsed`` is the call's time in seconds and ``outcome`` its answers as arrays,
    when the door measured them (else None).
    """

    __slots__ = ("_batch", "_rows", "elapsed", "outcome", "predictions", "route", "version")

    def __init__(self, route: str, version: LoadedVersion, predictions: Any, *,
                 batch: EncodedBatch | None = None, rows: Sequence[Any] | None = None,
                 elapsed: float | None = None, outcome: Outcome | None = None) -> None:
        self.route = route
        self.version = version
        self.predictions = predictions
        self._batch = batch
        self._rows = rows
        self.elapsed = elapsed
        self.outcome = outcome

    @property
    def model_version(self) -> int:
        """The version number that answered (rows the cloud answered say their own)."""
        return self.version.version

    @property
    def inputs(self) -> EncodedBatch | None:
        """The encoded rows (numbers after float32 rounding, categories normalised)."""
        if self._batch is None and self._rows is not None:
            self._batch = self.version.schema.encode(self._rows)
        return self._batch

    def __len__(self) -> int:
        return len(self.predictions)


Observer = Callable[[Observation], None]
