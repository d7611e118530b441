"""The single-row fast path of :meth:`EdgeRuntime.predict`: one row in a few microseconds.

The general path (encode a batch with numpy, look keys up, run, build results, apply the
fallback policy) costs ~30 µs of Python and numpy bookkeeping per call, several times the
model itself. One row needs none of it. :class:`RowPath` is compiled once per loaded version:

* values come out of the row with ``operator.itemgetter`` and are checked by type in C
  (``set(map(type, ...))``); the float32 bytes of the numeric part are packed with ``struct``
  and *are* the canonical key prefix (NaN and -0.0 are normalised as in
  :meth:`InputSchema.keys`), so the key is built without numpy;
* a precomputed hit is answered from a per-version cache of ready results (key -> prediction,
  shared probabilities, whether the policy wants the cloud), filled from the table on first use;
* a miss copies the packed bytes into a preallocated input buffer that onnxruntime reads
  through IO binding (numeric-only models), or feeds small arrays (models with strings).

With a telemetry tap attached (:meth:`RowPath.attach`), each answer is also reported to it:
a hit's table row (one list append), or a miss's key with its class and confidence (or
value) and how long the model took; the tap bins them later, in bulk
(:mod:`hybridml.edge.telemetry`).

Anything unusual — a row the schema would reject, a non-canonical NaN, an out-of-range value,
an unseen category, low confidence, a failed run, another thread holding the buffer — returns
``None`` and the caller takes the general path, which gives the same answers and errors.

Nothing here is a second copy of a rule. The cells it takes itself are the plain ones the rules
of :mod:`hybridml.shared.cells` accept unchanged (Python ints and floats within float32,
strings that are training categories as sent, None); any other cell goes through
:func:`~hybridml.shared.cells.category` or to the general path. The key bytes are
:func:`~hybridml.shared.schema.canonical_bytes`, the range bounds the schema's own float32
bounds, and the flags the policy's; ``tests/edge/test_paths_agree.py`` and
``tests/test_routes_agree.py`` send the same rows through every route to hold it to that.
"""

from __future__ import annotations

import logging
import math
import operator
import random
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hybridml.shared import cells
from hybridml.shared.errors import InferenceError
from hybridml.shared.schema import (
    CATEGORICAL,
    MISSING_CATEGORY,
    NUMERIC,
    UNSEEN_CODE,
    InputSchema,
    canonical_bytes,
)
from hybridml.shared.table import Table

from .fallback import FallbackPolicy
from .session import ModelSession

log = logging.getLogger("hybridml.edge.fastpath")

HIT_CACHE_ROWS = 4096  # ready results kept per version; a hit costs a dict lookup after that
RAW_KEY_MAX = 16  # features up to which a hit is also cached by the row's values as sent
_PLAIN = frozenset({int, float})
_PLAIN_OR_NONE = frozenset({int, float, type(None)})
_STR = frozenset({str})
_STR_OR_NONE = frozenset({str, type(None)})
_NAN = math.nan
_SPECIAL_HIGH = b"\x80\x7f\xff"  # float32 high bytes worth a closer look
_SMALL = 8  # up to this many numeric features, range checks run in plain Python
_clock = time.perf_counter_ns
_random = random.random


def _getter(keys: Sequence[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """``itemgetter`` that always returns a tuple (it returns a bare item for one key)."""
    if len(keys) == 1:
        k = keys[0]
        return lambda obj: (obj[k],)
    return operator.itemgetter(*keys)


class RowPath:
    """Single-row inference compiled for one loaded version, table and policy."""

    def __init__(self, schema: InputSchema, session: ModelSession, table: Table | None,
                 policy: FallbackPolicy, make: Callable[..., Any], version: int,
                 classes: Sequence[Any]) -> None:
        """``make(prediction, source, version, raw_probabilities, classes)`` builds an answer."""
        self.session, self.table, self.policy = session, table, policy
        self._make = make
        feats = schema.features
        self.version = version
        self.classes: tuple[Any, ...] = tuple(classes)
        self.is_clf = session.task != "regression"
        self._n = len(feats)
        self._names = schema.names
        self._num_by_name = _getter([f.name for f in feats if f.kind == NUMERIC] or ["-"])
        self._cat_by_name = _getter([f.name for f in feats if f.kind == CATEGORICAL] or ["-"])
        num_pos = [i for i, f in enumerate(feats) if f.kind == NUMERIC]
        cat_pos = [i for i, f in enumerate(feats) if f.kind == CATEGORICAL]
        self._n_num, self._n_cat = len(num_pos), len(cat_pos)
        self._nums = None if not num_pos else (
            None if len(num_pos) == self._n else _getter(num_pos))
        self._cats = _getter(cat_pos) if cat_pos else None
        self._pack = struct.Struct(f"<{self._n_num}f").pack
        self._unpack = struct.Struct(f"<{self._n_num}f").unpack
        self._pack_codes = struct.Struct(f"<{self._n_cat}i").pack
        self._cat_index = tuple({c: j for j, c in enumerate(feats[i].categories)}
                                for i in cat_pos)
        # The schema's float32 training bounds (the general path compares with these).
        self._lo, self._hi = schema.bounds
        # Python floats holding the float32 bounds: comparing unpacked float32 values with
        # them is exactly numpy's float32 comparison.
        self._lo_py = [float(v) for v in self._lo[0]]
        self._hi_py = [float(v) for v in self._hi[0]]
        self._in_range = _range_test(self._lo_py, self._hi_py)
        self._check_oor = policy.enabled and policy.on_out_of_range
        self._check_unseen = policy.enabled and policy.on_unseen
        self._min_conf = policy.min_confidence if policy.enabled else 0.0
        # key -> (prediction, probabilities dict, needs the general path, table row)
        self._hits: dict[bytes, tuple[Any, Any, bool, int]] = {}
        # Ready results by the row's values as sent, for narrow rows (hashing a wide row's
        # values costs more than packing it); None: off.
        self._raw_hits: dict[Any, tuple[Any, Any, bool, int]] | None = \
            {} if table is not None and self._n <= RAW_KEY_MAX else None
        # A small table's key dict, looked up without a method call; None: Table.lookup.
        index = table.key_index() if table is not None else None
        self._index_get = index.get if index is not None else None
        # Input buffers the session reads; only the thread holding the lock touches them.
        self._lock = threading.Lock()
        self._buf = np.zeros((1, self._n_num), dtype=np.float32)
        self._buf_bytes = memoryview(self._buf).cast("B")  # type: ignore[arg-type]
        self._tmp = np.empty_like(self._buf)
        self._tmp_bytes = memoryview(self._tmp).cast("B")  # type: ignore[arg-type]
        self._cat_buf = np.empty((1, self._n_cat), dtype=object)
        self._set_cats = _cell_setter(self._cat_buf.reshape(-1), self._n_cat)
        runner = session.row_runner(self._buf, self._cat_buf)
        self._reused_outputs = runner.reuses_outputs
        self._run = runner
        # Telemetry (attach): the tap, and where each model answer's record goes.
        self.tap: Any = None
        self._keep = 1.0
        self._keep_all = True
        self._on_miss: Callable[[tuple[bytes | None, Any, Any, int]], object] | None = None

    def attach(self, tap: Any) -> None:
        """Report every answer to ``tap`` (a :class:`~hybridml.edge.telemetry.RowTap`): its
        ``hits`` list gets each hit's table row, its ``misses`` list ``(key, class index,
        confidence, ns)`` or ``(key, value, None, ns)`` for each model answer, ``ns`` the
        nanoseconds from the key to the answer (the row's unpacking before, ~0.5 µs, is not
        timed); past ``tap.size`` hits or ``tap.miss_size`` answers, ``tap.drain()``. A wide
        model's answers keep their key with probability ``tap.keep`` only (None otherwise:
        counted, not binned). None detaches."""
        self.tap = tap
        self._keep = 1.0 if tap is None else tap.keep
        self._keep_all = self._keep >= 1.0
        self._on_miss = None if tap is None else tap.misses.append

    # ---------------------------------------------------------------------------- predict
    def predict(self, row: Any) -> Any:
        """The answer for ``row``, or None to take the general path."""
        t = type(row)
        nums: Any = ()
        cats: Any = None
        if t is dict:
            if len(row) != self._n:
                return None
            try:  # n keys, all of them the schema's: exactly the schema's columns
                if self._n_num:
                    nums = self._num_by_name(row)
                if self._n_cat:
                    cats = self._cat_by_name(row)
            except KeyError:
                return None
        elif t is list or t is tuple:
            if len(row) != self._n:
                return None
            if self._n_num:
                nums = row if self._nums is None else self._nums(row)
            if self._n_cat:
                cats = self._cats(row)  # type: ignore[misc]
        else:
            return None
        plain_nums = not self._n_num or _PLAIN.issuperset(map(type, nums))
        plain_cats = not self._n_cat or _STR.issuperset(map(type, cats))
        raw = None
        if plain_nums and plain_cats and self._raw_hits is not None:
            # Plain values equal as sent are the same model input (3 == 3.0, -0.0 == 0.0;
            # a bool, which equals 1 or 0, is not plain): a hit seen before costs one lookup.
            raw = (nums, cats) if t is dict else tuple(row)
            entry = self._raw_hits.get(raw)
            if entry is not None:
                if entry[2]:
                    return None
                tap = self.tap
                if tap is not None:  # telemetry: the hit's table row, inline (no call)
                    hits = tap.hits
                    hits.append(entry[3])
                    if len(hits) >= tap.size:
                        tap.drain()
                return self._make(entry[0], "precomputed", self.version, entry[1], self.classes)
        packed = b""
        unchecked = False  # packed as sent: not yet known to be canonical
        if self._n_num:
            if plain_nums:  # the common case, inline
                try:
                    packed = self._pack(*nums)
                except (OverflowError, struct.error):
                    return None  # beyond float32: the general path raises the InputError
                unchecked = True
            else:
                packed = self._pack_missing(nums)  # type: ignore[assignment]
                if packed is None:
                    return None
        unseen = False
        key = packed
        if self._n_cat:
            if not plain_cats:
                if not _STR_OR_NONE.issuperset(map(type, cats)):
                    return None
                cats = tuple(MISSING_CATEGORY if v is None else v for v in cats)
            codes = list(map(dict.get, self._cat_index, cats))
            if None in codes:  # not a category as sent: the rule normalises it, or refuses
                try:
                    cats = tuple(map(cells.category, cats))
                except cells.CellRefused:
                    return None  # the general path names the cell
                codes = list(map(dict.get, self._cat_index, cats))
                if None in codes:
                    unseen = True
                    codes = [UNSEEN_CODE if c is None else c for c in codes]
            key = packed + self._pack_codes(*codes)
        entry = self._hits.get(key)  # cached keys are canonical: a hit needs no check
        # The high byte of each float32 holds the sign and top exponent bits: 0x80 there is
        # -0.0 (or a tiny negative), 0x7f/0xff a huge value, inf or NaN. Rare: check exactly.
        # bytes.translate runs in C, ~4x a set test over the byte values.
        if entry is None and unchecked and \
                len(packed[3::4].translate(None, _SPECIAL_HIGH)) != self._n_num:
            canonical = canonical_bytes(packed)
            if canonical is None:
                return None
            key = canonical + key[len(packed):]
            packed = canonical
            entry = self._hits.get(key)
        if entry is None and self.table is not None:
            index_get = self._index_get
            j = index_get(key, -1) if index_get is not None else self.table.lookup(key)
            if j >= 0:
                entry = self._hit_entry(self.table, j, packed, unseen)
                if len(self._hits) < HIT_CACHE_ROWS:
                    self._hits[key] = entry
        if entry is not None:
            if raw is not None and len(self._raw_hits) < HIT_CACHE_ROWS:  # type: ignore[arg-type]
                self._raw_hits[raw] = entry  # type: ignore[index]
            if entry[2]:
                return None
            tap = self.tap
            if tap is not None:
                hits = tap.hits
                hits.append(entry[3])
                if len(hits) >= tap.size:
                    tap.drain()
            return self._make(entry[0], "precomputed", self.version, entry[1], self.classes)
        if unseen and self._check_unseen:
            return None
        on_miss = self._on_miss
        t0 = _clock() if on_miss is not None else 0  # telemetry times the model's answers
        if self._check_oor and 0 < self._n_num <= _SMALL:
            try:  # the raw values inside [lo, hi] are inside after float32 rounding too
                clear = self._in_range(nums)
            except TypeError:  # None for missing: compare the packed values instead
                clear = False
            if not clear and self._out_of_range_py(packed):
                return None
        lock = self._lock
        if not lock.acquire(False):
            return None  # another thread is in the fast path: the general path is safe
        try:
            if self._n_num:
                self._buf_bytes[:] = packed
                if self._check_oor and self._n_num > _SMALL and self._out_of_range_buf():
                    return None
            if self._n_cat:
                self._set_cats(cats)
            out = self._run()
            first = out[0].item(0)
            # Reused output buffers: keep a copy, taken before another thread can run.
            probs = (out[1][0].copy() if self._reused_outputs else out[1][0]) \
                if self.is_clf else None
        except InferenceError:  # the general path runs it again and reports it
            return None
        finally:
            lock.release()
        if probs is None:
            if on_miss is not None:
                on_miss((key if self._keep_all or _random() < self._keep else None, first,
                         None, _clock() - t0))
                tap = self.tap
                if len(tap.misses) >= tap.miss_size:
                    tap.drain()
            return self._make(first, "edge", self.version, None, None)
        if self._min_conf and float(probs.max()) < self._min_conf:
            return None
        label = int(first)
        if on_miss is not None:
            on_miss((key if self._keep_all or _random() < self._keep else None, label,
                     probs.item(label), _clock() - t0))
            tap = self.tap
            if len(tap.misses) >= tap.miss_size:
                tap.drain()
        return self._make(self.classes[label], "edge", self.version, probs, self.classes)

    def _pack_missing(self, nums: Sequence[Any]) -> bytes | None:
        """Canonical float32 bytes of values that are not all plain numbers: None (missing)
        becomes NaN; anything else (bool, str, numpy scalars...) is left to the general path.
        """
        if not _PLAIN_OR_NONE.issuperset(map(type, nums)):
            return None
        try:
            return canonical_bytes(self._pack(*[_NAN if v is None else v for v in nums]))
        except (OverflowError, TypeError, struct.error):
            return None

    def _out_of_range_py(self, packed: bytes) -> bool:
        """Range check in Python: cheapest for a few features."""
        vals = self._unpack(packed)
        return any(map(operator.lt, vals, self._lo_py)) or \
            any(map(operator.gt, vals, self._hi_py))

    def _out_of_range_buf(self) -> bool:
        """Range check of the input buffer (caller holds the lock): two ufuncs, one compare."""
        # Clamp into [lo, hi] and compare bytes: equal means in range. NaN stays NaN (not out
        # of range); if a NaN's bits changed, the exact comparison below decides.
        tmp = self._tmp
        np.maximum(self._buf, self._lo, out=tmp)
        np.minimum(tmp, self._hi, out=tmp)
        if self._tmp_bytes == self._buf_bytes:
            return False
        with np.errstate(invalid="ignore"):
            return bool(((self._buf < self._lo) | (self._buf > self._hi)).any())

    def _out_of_range(self, packed: bytes) -> bool:
        if not self._n_num:
            return False
        if self._n_num <= _SMALL:
            return self._out_of_range_py(packed)
        with self._lock:
            self._buf_bytes[:] = packed
            return self._out_of_range_buf()

    def _hit_entry(self, table: Table, j: int, packed: bytes, unseen: bool
                   ) -> tuple[Any, Any, bool, int]:
        """(prediction, probabilities dict, needs the general path, ``j``) of table row
        ``j``."""
        flagged = (unseen and self._check_unseen) or \
            (self._check_oor and self._out_of_range(packed))
        if not self.is_clf:
            return table.value(j), None, flagged, j
        probs = table.probabilities(j)
        if self._min_conf and float(probs.max()) < self._min_conf:
            flagged = True
        shared = {str(c): round(float(p), 6) for c, p in zip(self.classes, probs)}
        return self.classes[table.label(j)], shared, flagged, j


def _range_test(lo: Sequence[float], hi: Sequence[float]) -> Callable[[Sequence[Any]], bool]:
    """``lambda v: lo[0] <= v[0] <= hi[0] and ...`` compiled with the bounds as literals.

    Chained comparisons against constants run ~2.5x faster than ``all(map(operator.ge, ...))``
    for the few features this is used for. The bounds are Python floats, whose ``repr`` is an
    exact literal; an infinite bound is left out. None in ``v`` raises TypeError as before.
    """
    terms = []
    for i, (a, b) in enumerate(zip(lo, hi)):
        left = f"{float(a)!r} <= " if math.isfinite(a) else ""
        right = f" <= {float(b)!r}" if math.isfinite(b) else ""
        if left or right:
            terms.append(f"{left}v[{i}]{right}")
    return eval(f"lambda v: {' and '.join(terms) or 'True'}")  # type: ignore[no-any-return]


def _cell_setter(flat: np.ndarray, n: int) -> Callable[[Sequence[Any]], None]:
    """``flat[0], ..., flat[n-1] = values``: one unpacking store, ~3x numpy's row assignment."""
    if n == 0:
        return lambda values: None
    scope: dict[str, Any] = {"flat": flat}
    targets = ", ".join(f"flat[{j}]" for j in range(n))
    exec(f"def set_cells(values):\n    {targets}, = values", scope)
    return scope["set_cells"]  # type: ignore[no-any-return]
