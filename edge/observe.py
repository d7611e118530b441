"""The one hook on the edge's predict path: observers see every prediction call.

Every door of :class:`~hybridml.edge.runtime.EdgeRuntime` — one row (fast path or not), many
rows, text columns, arrays — ends in the same place, which hands each observer an
:class:`Observation` of what was answered. Telemetry, drift counters and a shadow model hook in
here, once, and see every route.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hybridml.shared.schema import EncodedBatch

if TYPE_CHECKING:
    from .loaded import LoadedVersion


class Observation:
    """One predict call: its ``route`` (``row``, ``rows``, ``text`` or ``arrays``), the
    loaded ``version`` that answered, and the ``predictions`` it returned (a list of
    :class:`~hybridml.edge.runtime.Prediction`, or a
    :class:`~hybridml.edge.columnar.BatchPrediction` for arrays).

    :attr:`inputs` is the encoded batch the model saw, built on first access for the
    single-row fast path (which never builds one) so that observers that do not need it cost
    nothing.
    """

    __slots__ = ("_batch", "_rows", "predictions", "route", "version")

    def __init__(self, route: str, version: LoadedVersion, predictions: Any, *,
                 batch: EncodedBatch | None = None, rows: Sequence[Any] | None = None) -> None:
        self.route = route
        self.version = version
        self.predictions = predictions
        self._batch = batch
        self._rows = rows

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
