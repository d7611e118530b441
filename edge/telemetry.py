"""Telemetry on the device: what each loaded version answered, counted in memory.

docs/monitoring.md §3 is the contract. Per (model, version) and window, :class:`Telemetry`
counts rows by source, degraded rows by reason, a latency histogram (of calls), the bin counts
of every feature on the profile's edges or categories (plus missing, plus unseen), and the
prediction and confidence histograms (:class:`~hybridml.edge.window.Counters`).
:meth:`Telemetry.flush` ends the window: one summary body per version (and, with sampling on,
one sample body) for the spool.

Cost is the design: the single-row fast path answers a table hit in ~1 µs and a model answer
in ~10 µs, and telemetry may add about a tenth of a microsecond to the first and 5 % to the
second. Nothing is binned on the predict path, and nothing does I/O:

* **the fast path** appends a hit's table row, or a model answer's ``(key, class,
  confidence, ns)``, to its version's :class:`RowTap` (one ``list.append``). A drain every
  few thousand reports counts hits per table row — a few rows, however many calls — and
  reads their inputs and answers back from the table, and decodes answers from their keys in
  one ``frombuffer``. Hits are not timed (first latency bin): two clock reads would cost a
  tenth of one. A wide model keeps the key of a random share of its answers only (about
  :data:`~hybridml.edge.binning.MISS_VALUES` values binned per answer).
* **batch calls** (``rows``, ``text``, ``arrays``, and rows the fast path passes on) come as
  an :class:`~hybridml.edge.observe.Observation` with their answers as arrays: rows, sources,
  degraded rows and latency count every row; features, predictions and confidence are kept
  for every row of a batch of up to ``bin_cells`` values, and for a systematic sample of that
  size of a larger one.
* kept rows are binned together every ``ring`` rows (:mod:`hybridml.edge.binning`): numpy's
  per-call overhead is paid once per few thousand rows, not per call.

Nothing raises into a prediction: a failure is logged (sparingly) and that observation is
skipped. Raw inputs are kept only with sampling on (``HYBRIDML_TELEMETRY_SAMPLE=N``): a
reservoir of ``N`` of the kept rows per version and window, as the model saw them.
"""

from __future__ import annotations

import bisect
import logging
import random
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.drift import Profile
from hybridml.shared.errors import ConfigError, HybridMLError
from hybridml.shared.schema import InputSchema
from hybridml.shared.settings import env_flag, load_env

from .binning import Binner, Rows
from .fallback import REASONS
from .loaded import CLOUD, EDGE, PRECOMPUTED, SOURCES
from .observe import Observation, Outcome
from .timebase import WindowClock
from .window import FORMAT, LATENCY_EDGES_MS, Counters

if TYPE_CHECKING:
    from hybridml.shared.table import Table

    from .loaded import LoadedVersion

log = logging.getLogger("hybridml.edge.telemetry")

_LATENCY_CUTS_S = [e / 1000.0 for e in LATENCY_EDGES_MS]
_LATENCY_CUTS_NS = np.array([round(e * 1e6) for e in LATENCY_EDGES_MS], dtype=np.int64)
MIN_BIN_ROWS = 1  # a batch call bins at least this many rows (all, below twice as many)
MISS_BYTES = 1 << 18  # kept fast-path model answers' keys, at most, before they are binned


@dataclass(frozen=True)
class TelemetrySettings:
    """``enabled`` (``HYBRIDML_TELEMETRY``, default on); ``sample`` rows kept per version and
    window (``HYBRIDML_TELEMETRY_SAMPLE``, default 0: none); ``window_s`` between a runtime's
    own flushes (``HYBRIDML_TELEMETRY_WINDOW_S``, 0: only at exit); ``ring`` rows gathered
    before they are binned (``HYBRIDML_TELEMETRY_RING``); ``bin_cells``: a batch call bins
    every row up to about this many values (rows x features; at least a row), and a
    systematic sample of that size of a larger batch (``HYBRIDML_TELEMETRY_BIN_CELLS``)."""

    enabled: bool = True
    sample: int = 0
    window_s: float = 3600.0
    ring: int = 4096
    bin_cells: int = 8192  # a 1,000-row batch of up to 8 features is binned whole

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise ConfigError(f"HYBRIDML_TELEMETRY_SAMPLE must be 0 (off) or a number of rows, "
                              f"got {self.sample}", field="sample")
        if self.window_s < 0:
            raise ConfigError(f"HYBRIDML_TELEMETRY_WINDOW_S must be 0 (flush at exit only) or "
                              f"positive, got {self.window_s}", field="window_s")
        if self.ring < 1:
            raise ConfigError(f"HYBRIDML_TELEMETRY_RING must be at least 1, got {self.ring}",
                              field="ring")
        if self.bin_cells < 1:
            raise ConfigError(f"HYBRIDML_TELEMETRY_BIN_CELLS must be at least 1, got "
                              f"{self.bin_cells}", field="bin_cells")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TelemetrySettings:
        """``HYBRIDML_TELEMETRY=off`` turns telemetry off; ``HYBRIDML_TELEMETRY_<FIELD>``
        sets the rest."""
        return load_env(cls, "HYBRIDML_TELEMETRY_", env,
                        enabled=env_flag("HYBRIDML_TELEMETRY", True, env))


# ------------------------------------------------------------------------------- fast path
class RowTap:
    """The single-row fast path's reports for one loaded version, counted in bulk.

    :class:`~hybridml.edge.fastpath.RowPath` appends each hit's table row to ``hits`` and each
    model answer, with the nanoseconds it took, to ``misses`` (one ``list.append`` each), and
    calls :meth:`drain` past ``size`` hits or ``miss_size`` answers (kept keys stay under
    256 KiB, so wide rows do not crowd the cache). A table hit (~1 µs, a dict lookup) is not
    timed — two clock reads would cost a tenth of it — and counts in the first latency bin.
    Appending is safe from any thread (``list.append`` is atomic); draining takes what is
    there and leaves what arrives meanwhile.

    A wide model's answers keep their key (to be binned) with probability ``keep``, about
    :data:`~hybridml.edge.binning.MISS_VALUES` values per answer; the others count rows,
    sources and latency only: holding every wide key until the drain costs more than binning
    it (cache misses).
    """

    __slots__ = ("__weakref__", "binner", "hits", "keep", "miss_size", "misses", "owner",
                 "size", "table", "version", "width")

    def __init__(self, owner: Telemetry, v: LoadedVersion, binner: Binner, size: int) -> None:
        self.owner = owner
        self.version = v.version
        self.table = v.table
        self.binner = binner
        self.width = v.schema.key_width
        self.size = size
        self.miss_size = max(64, min(size, MISS_BYTES // max(1, self.width)))
        self.keep = 1.0 / binner.miss_stride
        self.hits: list[int] = []
        self.misses: list[tuple[bytes | None, Any, Any, int]] = []

    def drain(self) -> None:
        """Count what has gathered in the owner's current window."""
        self.owner.drain(self)


def _take(items: list[Any]) -> list[Any]:
    """Everything in ``items`` now, removed; appends made meanwhile stay (each step is one
    C call under the GIL)."""
    n = len(items)
    got = items[:n]
    del items[:n]
    return got


# -------------------------------------------------------------------------------- telemetry
class Telemetry:
    """The counters of one runtime's model: an observer for batches, taps for the fast path.

    ``clock`` (POSIX seconds) dates the windows; tests pass their own. ``monotonic`` measures
    their length, so a wall clock that jumps mid-window does not stretch or invert it
    (:class:`~hybridml.edge.timebase.WindowClock`); by default ``time.monotonic``, or
    ``clock`` itself when a test passes a clock and no monotonic one.
    """

    def __init__(self, model: str, settings: TelemetrySettings | None = None, *,
                 clock: Callable[[], float] = time.time, seed: int | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.model = model
        self.settings = settings or TelemetrySettings.from_env()
        self.clock = clock
        self._lock = threading.RLock()
        self._rng = np.random.default_rng(seed)
        self._offsets = random.Random(seed)  # where systematic samples start
        self._binners: dict[int, Binner] = {}
        self._window: dict[int, Counters] = {}
        self._windows = WindowClock(clock, monotonic)
        self._taps: weakref.WeakSet[RowTap] = weakref.WeakSet()
        self._errors = 0

    # ---------------------------------------------------------------------------- wiring
    def binner(self, v: LoadedVersion) -> Binner:
        """The binner of ``v``'s version (built once; a malformed profile is logged and
        counted without bins)."""
        b = self._binners.get(v.version)
        if b is None:
            try:
                profile = Profile.of(v.manifest.raw)
            except HybridMLError as exc:
                log.warning("%s v%s: the manifest's profile is unusable (%s); counting rows "
                            "without bins", self.model, v.version, exc.message)
                profile = None
            b = Binner(v.schema, profile, v.classes, v.is_clf)
            self._binners[v.version] = b
        return b

    def tap(self, v: LoadedVersion) -> RowTap:
        """A new tap for ``v``'s fast path (:meth:`RowPath.attach
        <hybridml.edge.fastpath.RowPath.attach>`)."""
        tap = RowTap(self, v, self.binner(v), self.settings.ring)
        with self._lock:
            self._taps.add(tap)
        return tap

    # ------------------------------------------------------------------------- observing
    def __call__(self, obs: Observation) -> None:
        """Count one call (an :data:`~hybridml.edge.observe.Observer`)."""
        try:
            self._observe(obs)
        except Exception as exc:  # never into a prediction; say so, but not for every call
            self._failed("an observation", exc)

    def _observe(self, obs: Observation) -> None:
        out = obs.outcome if obs.outcome is not None else outcome_of(obs)
        n = int(out.source.shape[0])
        if not n:
            return
        b = self.binner(obs.version)
        batch = obs.inputs
        rows = None
        if batch is not None and (b.profile is not None or self.settings.sample):
            # Bin every row of a small batch; of a large one a systematic sample of about
            # bin_cells values (rows, sources, degraded rows and latency count every row).
            keep = max(MIN_BIN_ROWS, self.settings.bin_cells // max(1, len(b.schema.names)))
            pick = slice(None)
            if n >= 2 * keep:  # keep..2*keep rows, every stride-th from a random start
                stride = n // keep
                pick = slice(self._offsets.randrange(stride), None, stride)
            rows = _rows(batch.num[pick], batch.codes_at(pick), out, pick)
        # Sources are codes 0, 1, 2: two reductions count them (cheaper than a bincount).
        answered = int(np.count_nonzero(out.source))
        cloud = int(out.source.sum(dtype=np.int64)) - answered
        degraded = None if out.degraded is None else \
            np.bincount(out.reason[out.degraded], minlength=len(REASONS))
        with self._lock:
            c = self._counters(obs.version.version, b)
            c.rows += n
            c.sources[PRECOMPUTED] += n - answered
            c.sources[EDGE] += answered - cloud
            c.sources[CLOUD] += cloud
            if degraded is not None:
                c.degraded += degraded
            if obs.elapsed is not None:
                c.latency[bisect.bisect_right(_LATENCY_CUTS_S, obs.elapsed)] += 1
            if rows is not None:
                if c.sample is not None:
                    c.sample.offer(b, rows)
                c.defer(rows, self.settings.ring)

    def drain(self, tap: RowTap) -> None:
        """Count a tap's gathered fast-path answers in the current window."""
        try:
            with self._lock:
                self._drain(tap)
        except Exception as exc:
            self._failed("the fast path's answers", exc)

    def _drain(self, tap: RowTap) -> None:
        hits, misses = _take(tap.hits), _take(tap.misses)
        if not (hits or misses):
            return
        b = tap.binner
        c = self._counters(tap.version, b)
        c.latency[0] += len(hits)
        if hits:
            c.rows += len(hits)
            c.sources[PRECOMPUTED] += len(hits)
            if (b.profile is not None or c.sample is not None) and tap.table is not None:
                at = np.array(hits, dtype=np.intp)
                rows, inverse, counts = np.unique(at, return_inverse=True, return_counts=True)
                # A few table rows, however many calls: bin each once, weighted.
                num, codes = _decode(tap.table.keys(rows), b.schema)
                labels, values, conf = _table_answers(tap.table, rows, b)
                if c.sample is not None:  # the calls' rows, in order
                    c.sample.offer(b, Rows(num[inverse], codes[inverse], _at(labels, inverse),
                                           _at(values, inverse), _at(conf, inverse)))
                c.defer(Rows(num, codes, labels, values, conf, counts.astype(np.float64)),
                        self.settings.ring)
        if misses:
            c.rows += len(misses)
            c.sources[EDGE] += len(misses)
            keys, firsts, confs, took = zip(*misses)  # one C-level pass over the records
            c.latency += np.bincount(np.searchsorted(_LATENCY_CUTS_NS, took, "right"),
                                     minlength=c.latency.size)
            if b.miss_stride > 1:  # a wide model: only the answers that kept their key
                kept = [m for m in misses if m[0] is not None]
                keys, firsts, confs, _ = zip(*kept) if kept else ((), (), (), ())
            if keys and (b.profile is not None or c.sample is not None):
                num, codes = _decode(np.frombuffer(b"".join(keys), dtype=np.uint8)
                                     .reshape(-1, tap.width), b.schema)
                if b.is_clf:
                    labels = np.array(firsts, dtype=np.int64)
                    values = None
                    conf = np.array(confs, dtype=np.float32)
                else:
                    labels = conf = None
                    values = np.array(firsts, dtype=np.float32)
                answered = Rows(num, codes, labels, values, conf)
                if c.sample is not None:
                    c.sample.offer(b, answered)
                c.defer(answered, self.settings.ring)

    # ---------------------------------------------------------------------------- windows
    def flush(self, *, stale: bool = False) -> list[tuple[str, dict[str, Any], str, int]]:
        """End the window: its records ``(kind, body, model, version)`` for the spool — a
        summary per version that answered, and a sample with sampling on — and start a new
        one. Predictions never wait for this: the counters are swapped under a lock held
        for microseconds, and the bodies built after."""
        with self._lock:
            for tap in list(self._taps):
                self._drain(tap)
            window, self._window = self._window, {}
            start, end = self._windows.cut()
        records: list[tuple[str, dict[str, Any], str, int]] = []
        for version, c in sorted(window.items()):
            if not c.rows:
                continue
            body = c.body(self.model, version, start, end, stale)
            records.append(("summary", body, self.model, version))
            if c.sample is not None and c.sample.rows:
                records.append(("sample", {
                    "format": FORMAT, "model": self.model, "version": version,
                    "window": body["window"], "features": list(c.binner.schema.names),
                    "rows": [r[0] for r in c.sample.rows],
                    "predictions": [r[1] for r in c.sample.rows]}, self.model, version))
        return records

    def summary(self, v: LoadedVersion, *, stale: bool = False) -> dict[str, Any]:
        """The summary body of ``v``'s version in the current window so far (zero counts if
        it answered nothing yet); the window goes on."""
        with self._lock:
            for tap in list(self._taps):
                self._drain(tap)
            c = self._window.get(v.version) or Counters(self.binner(v), 0, self._rng)
            return c.body(self.model, v.version, *self._windows.peek(), stale)

    # ------------------------------------------------------------------------- internals
    def _counters(self, version: int, binner: Binner) -> Counters:
        c = self._window.get(version)
        if c is None:
            c = self._window[version] = Counters(binner, self.settings.sample, self._rng)
        return c

    def _failed(self, what: str, exc: Exception) -> None:
        self._errors += 1
        if self._errors in (1, 10, 100) or self._errors % 1000 == 0:
            log.warning("telemetry could not count %s (%d failure(s) so far): %s: %s", what,
                        self._errors, type(exc).__name__, exc)


# -------------------------------------------------------------------------------- helpers
def _decode(raw: np.ndarray, schema: InputSchema) -> tuple[np.ndarray, np.ndarray]:
    """The float32 numbers and int32 category codes in canonical keys (``uint8 [n, width]``)."""
    k = 4 * schema.n_numeric
    num = np.ascontiguousarray(raw[:, :k]).view("<f4")
    codes = np.ascontiguousarray(raw[:, k:]).view("<i4")
    return num, codes


def _table_answers(table: Table, rows: np.ndarray, b: Binner
                   ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(labels, values, confidence) the table holds in ``rows``."""
    labels, probs, values = table.take(rows)
    if b.is_clf:
        assert labels is not None and probs is not None
        return labels, None, probs[np.arange(labels.size), labels].astype(np.float64)
    return None, values, None


def _rows(num: np.ndarray, codes: np.ndarray, out: Outcome, pick: slice) -> Rows:
    """The :class:`Rows` of the picked answers of a batch (copies: the caller may reuse its
    arrays)."""
    labels = values = conf = None
    if out.labels is not None:
        labels = out.labels[pick].copy()
        if out.probabilities is not None:  # labels are classes of the model (AnswerCheck)
            conf = out.probabilities[pick][np.arange(labels.size), labels]
    elif out.values is not None:
        values = out.values[pick].copy()
    return Rows(num.copy(), codes, labels, values, conf)


def _at(a: np.ndarray | None, at: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[at]


def outcome_of(obs: Observation) -> Outcome:
    """The :class:`Outcome` of an observation that came without one (built row by row)."""
    v = obs.version
    preds = obs.predictions
    source = np.array([SOURCES.index(p.source) for p in preds], dtype=np.uint8)
    reason = np.array([REASONS.index(p.reason) if p.reason in REASONS else 0 for p in preds],
                      dtype=np.uint8)
    degraded = np.array([bool(p.degraded) for p in preds], dtype=bool)
    if not v.is_clf:
        values = np.array([np.nan if p.prediction is None else p.prediction for p in preds],
                          dtype=np.float64)
        return Outcome(source, reason, degraded if degraded.any() else None, None, values,
                       None)
    index = {str(c): i for i, c in enumerate(v.classes)}
    labels = np.array([index.get(str(p.prediction), -1) for p in preds], dtype=np.int64)
    probs = np.zeros((len(preds), len(v.classes)), dtype=np.float32)
    for i, p in enumerate(preds):
        got = p.probabilities or {}
        probs[i] = [got.get(str(c), 0.0) for c in v.classes]
    return Outcome(source, reason, degraded if degraded.any() else None, labels, None, probs)


__all__ = ["MIN_BIN_ROWS", "MISS_BYTES", "RowTap", "Telemetry", "TelemetrySettings",
           "outcome_of"]
