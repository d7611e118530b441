"""One model version's counts in one telemetry window, and the summary body they make.

:class:`Counters` holds what docs/monitoring.md §4 calls a summary: rows, rows by source,
degraded rows by reason, the latency histogram, and the bin counts of every feature, of the
predictions and of the confidence. Rows to bin gather in :attr:`Counters.pending` and are
binned together (:class:`~hybridml.edge.binning.Binner`). With sampling on, a
:class:`Reservoir` keeps a uniform sample of the rows themselves.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.schema import CATEGORICAL

from .binning import Binner, Rows, concat
from .fallback import REASONS
from .loaded import SOURCES

FORMAT = 1
LATENCY_EDGES_MS: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500,
                                       1000, 2000)


class Counters:
    """One version's counts in one window; rows to bin gather in :attr:`pending` and are
    binned together (numpy's per-call cost paid once per ``ring`` rows (settings),
    not once per call)."""

    def __init__(self, binner: Binner, sample: int, rng: np.random.Generator) -> None:
        self.binner = binner
        self.rows = 0
        self.sources = np.zeros(len(SOURCES), dtype=np.int64)
        self.degraded = np.zeros(len(REASONS), dtype=np.int64)
        self.latency = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
        self.features = [np.zeros(n, dtype=np.int64) for n in binner.bins]
        self.missing = [0] * len(binner.bins)
        self.unseen = [0] * len(binner.bins)
        pred = binner.predictions
        self.predictions = None if pred is None else np.zeros(pred.n_bins, dtype=np.int64)
        conf = binner.confidence
        self.confidence = None if conf is None else np.zeros(conf.n_bins, dtype=np.int64)
        self.sample = Reservoir(sample, rng) if sample else None
        self.pending: list[Rows] = []
        self.pending_rows = 0

    def defer(self, rows: Rows, ring: int) -> None:
        """Keep ``rows`` to bin later; bin everything pending once ``ring`` rows wait."""
        if self.binner.profile is None or not len(rows):
            return
        self.pending.append(rows)
        self.pending_rows += len(rows)
        if self.pending_rows >= ring:
            self.bin()

    def bin(self) -> None:
        """Bin the pending rows now."""
        if not self.pending:
            return
        rows = concat(self.pending)
        self.pending, self.pending_rows = [], 0
        t = self.binner.tally(rows)
        for f, counts in enumerate(t.features):
            self.features[f] += counts
            self.missing[f] += t.missing[f]
            self.unseen[f] += t.unseen[f]
        if t.predictions is not None and self.predictions is not None:
            self.predictions += t.predictions
        if t.confidence is not None and self.confidence is not None:
            self.confidence += t.confidence

    def body(self, model: str, version: int, start: float, end: float, stale: bool
             ) -> dict[str, Any]:
        """The summary body (docs/monitoring.md §4, format 1); bins what is pending first."""
        self.bin()
        b = self.binner
        features: dict[str, Any] = {}
        for f, name in enumerate(b.names):
            entry: dict[str, Any] = {"counts": self.features[f].tolist(),
                                     "missing": self.missing[f]}
            if b.kinds[f] == CATEGORICAL:
                entry["unseen"] = self.unseen[f]
            features[name] = entry
        out: dict[str, Any] = {
            "format": FORMAT, "model": model, "version": version,
            "window": {"start": utc_iso(start), "end": utc_iso(end)},
            "rows": self.rows,
            "by_source": {SOURCES[i]: int(n) for i, n in enumerate(self.sources) if n},
            "degraded": {str(REASONS[i]): int(n) for i, n in enumerate(self.degraded) if n},
            "latency_ms": {"edges": list(LATENCY_EDGES_MS), "counts": self.latency.tolist()},
            "features": features}
        if self.predictions is not None:
            out["predictions"] = {"counts": self.predictions.tolist()}
        if self.confidence is not None:
            out["confidence"] = {"counts": self.confidence.tolist()}
        out["stale"] = stale
        return out


class Reservoir:
    """A uniform sample of at most ``size`` rows of a stream (Algorithm R, a block at a
    time): each kept row is ``(values in schema order, prediction)``."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.rows: list[tuple[list[Any], Any]] = []
        self.seen = 0
        self._rng = rng

    def offer(self, binner: Binner, rows: Rows) -> None:
        """The next rows of the stream (each counted ``weights[i]`` times is offered once:
        a sample of calls' rows, not of their repeats)."""
        n = len(rows)
        t = self.seen + np.arange(n)
        slot = np.where(t < self.size, t, self._rng.integers(0, t + 1))
        for i in np.flatnonzero(slot < self.size).tolist():  # few: the kept rows
            row = _sample_row(binner, rows, i)
            j = int(slot[i])
            if j < len(self.rows):
                self.rows[j] = row
            else:
                self.rows.append(row)
        self.seen += n


def _sample_row(b: Binner, rows: Rows, i: int) -> tuple[list[Any], Any]:
    """Row ``i`` as the model saw it (schema order; NaN and unseen categories as null) and
    its prediction (a class, or a value; null if unknown)."""
    nums = iter(None if v != v else v for v in rows.num[i].tolist())
    cats = iter(rows.codes[i].tolist())
    row: list[Any] = []
    for f in b.schema.features:
        if f.kind == CATEGORICAL:
            code = next(cats)
            row.append(f.categories[code] if code >= 0 else None)
        else:
            row.append(next(nums))
    pred: Any = None
    if rows.labels is not None:
        label = int(rows.labels[i])
        pred = b.classes[label] if label >= 0 else None
    elif rows.values is not None:
        value = float(rows.values[i])
        pred = None if value != value else value
    return row, pred



__all__ = ["FORMAT", "LATENCY_EDGES_MS", "Counters", "Reservoir"]
