"""The input schema: the one place raw rows become model inputs, on both sides.

A model's ONNX graph takes up to two inputs, built here from raw rows:

* ``num``: float32 ``[N, n_numeric]`` — numeric features in schema order; missing values are NaN.
* ``cat``: string ``[N, n_categorical]`` — categorical features in schema order; missing is ``""``.

The cloud trains on exactly these arrays and the edge feeds exactly these arrays, so
training/serving skew is impossible by construction. What a cell may be is defined once, in
:mod:`hybridml.shared.cells`; the encoders here apply it to the three shapes input arrives in —
typed rows (:meth:`InputSchema.encode`: Python, JSON), text columns (:meth:`~InputSchema.
encode_text`: CSV request logs and edge CSV input) and arrays (:meth:`~InputSchema.encode_arrays`)
— and :meth:`InputSchema.check_row` is the row-by-row reference they all agree with: the same
rows refused, with the same error (code, row, column). :meth:`InputSchema.keys` turns an encoded
batch into canonical fixed-width key bytes (float32 numerics with NaN and -0.0 normalised, then
int32 category codes) — the precomputed table's exact-match key. Two rows share a key only if
the model sees identical inputs, so a table hit can never be wrong.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal

import numpy as np

from . import cells
from .batch import (
    CAT_INPUT,
    EMPTY_BATCH,
    NUM_INPUT,
    UNSEEN_CODE,
    EncodedBatch,
    canonical_bytes,
    canonical_f32,
    category_codes,
    column_bounds,
)
from .cells import (
    MISSING_CATEGORY,
    MISSING_TOKENS,
    FirstBad,
    reason_of,
    refusal,
    renumbered,
    short_repr,
)
from .errors import InputError, SchemaError
from .text import printable

NUMERIC = "numeric"
CATEGORICAL = "categorical"
_PLAIN_NUMBERS = frozenset({int, float})
_PLAIN_OR_NONE = frozenset({int, float, type(None)})
_STR_ONLY = frozenset({str})
_NONE = type(None)

Kind = Literal["numeric", "categorical"]


@dataclass(frozen=True)
class Feature:
    """One input column: its name, kind, and what training saw (range or categories)."""

    name: str
    kind: Kind
    min: float | None = None
    max: float | None = None
    categories: tuple[str, ...] = ()

    @property
    def dtype(self) -> str:
        """The ONNX element type this feature is fed as."""
        return "float32" if self.kind == NUMERIC else "string"

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form stored in manifests."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "dtype": self.dtype}
        if self.kind == NUMERIC:
            out["min"] = self.min
            out["max"] = self.max
        else:
            out["categories"] = list(self.categories)
        return out

    @classmethod
    def from_json(cls, data: Any) -> Feature:
        """Parse one feature; raises :class:`SchemaError` naming what is wrong."""
        if not isinstance(data, Mapping):
            raise SchemaError(f"a schema feature must be an object, got {type(data).__name__}")
        name = data.get("name")
        kind = data.get("kind")
        if not isinstance(name, str) or not name:
            raise SchemaError("a schema feature has no 'name'", field="name")
        if kind not in (NUMERIC, CATEGORICAL):
            raise SchemaError(
                f"feature {name!r} has kind {kind!r}; use 'numeric' or 'categorical'", field=name
            )
        if kind == NUMERIC:
            lo, hi = data.get("min"), data.get("max")
            for label, v in (("min", lo), ("max", hi)):
                if v is not None and not isinstance(v, (int, float)):
                    raise SchemaError(f"feature {name!r} has a non-numeric {label}", field=name)
            return cls(name, "numeric", None if lo is None else float(lo),
                       None if hi is None else float(hi))
        cats = data.get("categories", [])
        if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
            raise SchemaError(f"feature {name!r} needs 'categories' as strings", field=name)
        return cls(name, "categorical", categories=tuple(cats))


@dataclass(frozen=True)
class InputSchema:
    """Ordered features of a model, with the encoder both sides share."""

    features: tuple[Feature, ...]
    _numeric: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _categorical: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _cat_index: tuple[dict[str, int], ...] = field(init=False, repr=False, compare=False)
    _cat_known: tuple[frozenset[str], ...] = field(init=False, repr=False, compare=False)
    _names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _names_set: frozenset[str] = field(init=False, repr=False, compare=False)
    _kinds: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _lo: np.ndarray = field(init=False, repr=False, compare=False)
    _hi: np.ndarray = field(init=False, repr=False, compare=False)
    _finite: bool = field(init=False, repr=False, compare=False)
    # C-speed extractors (operator.itemgetter) for encode: dict -> values, values -> blocks.
    _get_all: Callable[[Any], tuple[Any, ...]] = field(init=False, repr=False, compare=False)
    _get_num: Callable[[Any], tuple[Any, ...]] = field(init=False, repr=False, compare=False)
    _get_cat: Callable[[Any], tuple[Any, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.features:
            raise SchemaError("an input schema needs at least one feature")
        names = [f.name for f in self.features]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"duplicate feature names in schema: {dupes}", field=dupes[0])
        numeric = tuple(i for i, f in enumerate(self.features) if f.kind == NUMERIC)
        categorical = tuple(i for i, f in enumerate(self.features) if f.kind == CATEGORICAL)
        set_ = object.__setattr__
        set_(self, "_names", tuple(names))
        set_(self, "_names_set", frozenset(names))
        set_(self, "_kinds", tuple(f.kind for f in self.features))
        set_(self, "_numeric", numeric)
        set_(self, "_categorical", categorical)
        set_(self, "_get_all", _tuple_getter(names))
        set_(self, "_get_num", _tuple_getter(numeric))
        set_(self, "_get_cat", _tuple_getter(categorical))
        set_(self, "_cat_index", tuple(
            {c: j for j, c in enumerate(self.features[i].categories)} for i in categorical))
        set_(self, "_cat_known", tuple(frozenset(self.features[i].categories)
                                       for i in categorical))
        lo = [self.features[i].min for i in numeric]
        hi = [self.features[i].max for i in numeric]
        set_(self, "_lo", np.array([-np.inf if v is None else v for v in lo], dtype=np.float32))
        set_(self, "_hi", np.array([np.inf if v is None else v for v in hi], dtype=np.float32))
        set_(self, "_finite", bool(np.isfinite(self._lo).all() and np.isfinite(self._hi).all()))

    # ----------------------------------------------------------------------------- properties
    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in schema order."""
        return self._names

    @property
    def numeric_names(self) -> tuple[str, ...]:
        """Names of the numeric features, in the order of the ``num`` input."""
        return tuple(self._names[i] for i in self._numeric)

    @property
    def categorical_names(self) -> tuple[str, ...]:
        """Names of the categorical features, in the order of the ``cat`` input."""
        return tuple(self._names[i] for i in self._categorical)

    @property
    def n_numeric(self) -> int:
        """Number of numeric features."""
        return len(self._numeric)

    @property
    def n_categorical(self) -> int:
        """Number of categorical features."""
        return len(self._categorical)

    @property
    def finite_bounds(self) -> bool:
        """True when every numeric feature has a finite training min and max."""
        return self._finite

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``[1, n_numeric]`` training minima and maxima (-inf/inf where unknown): the
        range test of every route compares with these."""
        return self._lo[None, :], self._hi[None, :]

    @property
    def key_width(self) -> int:
        """Bytes in one canonical key (4 per feature)."""
        return 4 * len(self.features)

    def to_json(self) -> list[dict[str, Any]]:
        """Return the JSON form stored in manifests."""
        return [f.to_json() for f in self.features]

    @classmethod
    def from_json(cls, data: Any) -> InputSchema:
        """Parse a schema from its JSON form; raises :class:`SchemaError`."""
        if not isinstance(data, list):
            raise SchemaError("the input schema must be a list of features")
        return cls(tuple(Feature.from_json(f) for f in data))

    # ------------------------------------------------------------------------------- encoding
    def encode(self, rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> EncodedBatch:
        """Validate and encode typed rows (dicts by name, or lists in schema order).

        The cell rules are :mod:`hybridml.shared.cells`. A refused row raises the
        :class:`InputError` of the first bad row, naming the row and the column — the same one
        :meth:`check_row` raises for it, whichever check found the batch bad.
        """
        if type(rows) is not list:
            rows = list(rows)
        num_rows: list[Sequence[Any]] = []
        cat_rows: list[Sequence[Any]] = []
        n = len(self._names)
        get_all, get_num, get_cat = self._get_all, self._get_num, self._get_cat
        for row in rows:
            values: Sequence[Any]
            if type(row) is dict and len(row) == n:  # the common case, at C speed
                try:
                    values = get_all(row)
                except KeyError:
                    raise self.first_error(rows) from None
            elif isinstance(row, (list, tuple)) and len(row) == n:
                values = row
            elif isinstance(row, Mapping) and len(row) == n and all(k in row for k in
                                                                      self._names):
                values = [row[k] for k in self._names]
            else:
                raise self.first_error(rows)
            num_rows.append(get_num(values))
            cat_rows.append(get_cat(values))
        num = self._numbers(num_rows)
        cat = self._strings(cat_rows)
        if num is None or cat is None:
            raise self.first_error(rows)
        batch, bad = self._batch(num, cat, owned=True)
        if bad is not None:  # the rows and other cells passed: this is the first bad cell
            raise bad
        return batch

    def check_row(self, row: Any, r: int = 0) -> tuple[list[float], list[str]]:
        """Apply every rule to one typed row: its numeric and categorical values in schema
        order, or the :class:`InputError` naming row ``r`` and the first bad column.

        This is the reference the batch encoders agree with; it is also how
        ``errors="report"`` finds the bad rows of a batch.
        """
        names = self._names
        if isinstance(row, Mapping):
            absent = [k for k in names if k not in row]
            if absent:
                raise InputError(f"row {r} has no column {absent[0]!r}; send null for a missing "
                                 "value", row=r, field=absent[0])
            extra = [k for k in row if k not in self._names_set]
            if extra:
                # The field echoes the key escaped: a lone surrogate or a control character
                # in it must not break whoever encodes or prints the error.
                raise InputError(f"row {r} has unknown column {short_repr(extra[0])}; the model "
                                 f"takes {', '.join(names)}", row=r,
                                 field=printable(str(extra[0]), 80))
            values: Sequence[Any] = [row[k] for k in names]
        elif isinstance(row, (list, tuple)):
            if len(row) != len(names):
                raise InputError(f"row {r} has {len(row)} values; the model takes {len(names)} "
                                 f"in this order: {', '.join(names)}", row=r)
            values = row
        else:
            raise InputError(f"row {r} is a {type(row).__name__}; send an object by column "
                             "name or a list in schema order", row=r)
        nums: list[float] = []
        cats: list[str] = []
        for name, kind, value in zip(names, self._kinds, values):
            try:
                if kind == NUMERIC:
                    nums.append(cells.number(value))
                else:
                    cats.append(cells.category(value))
            except cells.CellRefused as exc:
                raise refusal(r, name, exc.reason) from None
        return nums, cats

    def first_error(self, rows: Sequence[Any]) -> InputError:
        """The :class:`InputError` of the first row :meth:`check_row` refuses."""
        for r, row in enumerate(rows):
            try:
                self.check_row(row, r)
            except InputError as exc:
                return exc
        # Unreachable while the batch checks are at most as strict as check_row.
        return InputError("a row was refused, but no single row is: report this as a bug")

    def split_bad(self, rows: Sequence[Any]) -> tuple[list[int], dict[int, InputError]]:
        """Indices of the rows :meth:`check_row` accepts, and the error of each other row."""
        good: list[int] = []
        bad: dict[int, InputError] = {}
        for r, row in enumerate(rows):
            try:
                self.check_row(row, r)
                good.append(r)
            except InputError as exc:
                bad[r] = exc
        return good, bad

    def encode_text(self, columns: Mapping[str, Sequence[str]]) -> EncodedBatch:
        """Encode text columns by name (a CSV: request logs, edge CSV input); extra columns
        are ignored, as a CSV carries ids and timestamps beside the features.

        Numeric text is read by :func:`hybridml.shared.cells.number_text`; categories follow
        the same rule as typed ones. Raises the :class:`InputError` of the first bad row.
        """
        missing = [n for n in self._names if n not in columns]
        if missing:
            raise InputError(f"the input has no column {missing[0]!r}; the model needs "
                             f"{', '.join(self._names)}", field=missing[0])
        lengths = {len(columns[n]) for n in self._names}
        if len(lengths) > 1:
            raise InputError("input columns have different lengths; send one value per row "
                             "in every column", field="columns")
        n_rows = lengths.pop()
        first = FirstBad()
        num = np.empty((n_rows, self.n_numeric), dtype=np.float32)
        for j, i in enumerate(self._numeric):
            num[:, j], r, reason = cells.numbers_text(columns[self._names[i]])
            first.note(r, i, reason)
        cat = np.empty((n_rows, self.n_categorical), dtype=object)
        for j, i in enumerate(self._categorical):
            cat[:, j] = columns[self._names[i]]
        if first.row is not None:  # only rows before it matter for the categories
            cat = cat[:first.row + 1]
            num = num[:first.row + 1]
        batch, bad = self._batch(num, cat, owned=True)
        if bad is not None:
            first.note(bad.row, self._names.index(str(bad.field)), reason_of(bad))
        if first.row is not None:
            raise refusal(first.row, self._names[first.pos], first.reason)
        return batch

    def split_bad_text(self, columns: Mapping[str, Sequence[str]]
                       ) -> tuple[list[int], dict[int, InputError]]:
        """Like :meth:`split_bad`, for text columns (:meth:`encode_text`'s rules)."""
        n_rows = len(columns[self._names[0]]) if self._names[0] in columns else 0
        good: list[int] = []
        bad: dict[int, InputError] = {}
        for r in range(n_rows):
            try:
                self.encode_text({n: [columns[n][r]] for n in self._names})
                good.append(r)
            except InputError as exc:
                bad[r] = renumbered(exc, r)
        return good, bad

    def encode_arrays(self, num: Any = None, cat: Any = None) -> EncodedBatch:
        """Encode the model's two blocks given as arrays: ``num`` ``[N, n_numeric]`` numbers
        and ``cat`` ``[N, n_categorical]`` strings, each in schema order.

        Each cell follows the same rules as a typed row's (a bool or a numeric string in
        ``num`` is refused, not converted); a block of the wrong shape names ``num`` or
        ``cat``. Raises the :class:`InputError` of the first bad row.
        """
        num32 = self._num_block(num)
        rows = None if num32 is None else num32.shape[0]
        cat_o = self._cat_block(cat, rows)
        if num32 is None:
            num32 = np.empty((0 if cat_o is None else cat_o.shape[0], 0), dtype=np.float32)
        if cat_o is None:
            cat_o = np.empty((num32.shape[0], 0), dtype=object)
        first = FirstBad()
        if num32.dtype == object:  # cells that are not plain numbers: the rule, cell by cell
            num32 = self._object_numbers(num32, first)
            if first.row is not None:  # only the rows before it matter now
                num32, cat_o = num32[:first.row + 1], cat_o[:first.row + 1]
        batch, bad = self._batch(num32, cat_o, owned=False)
        if bad is not None:
            first.note(bad.row, self._names.index(str(bad.field)), reason_of(bad))
        # With finite training bounds an infinite value is also out of range: a clean batch
        # holds none, and otherwise only the rows flagged out of range can.
        if num32.size and not (self._finite and batch.clean):
            rows_ = np.flatnonzero(batch.out_of_range) if self._finite and bad is None \
                else np.arange(num32.shape[0])
            inf = np.isinf(num32[rows_])
            if inf.any():
                k, j = np.argwhere(inf)[0]
                first.note(int(rows_[k]), self._numeric[int(j)], cells.TOO_LARGE)
        if first.row is not None:
            raise refusal(first.row, self._names[first.pos], first.reason)
        return batch

    def encode_blocks(self, num: np.ndarray, cat: np.ndarray) -> EncodedBatch:
        """Wrap the typed blocks training data was parsed into (by these same rules).

        Only shapes are checked: the blocks come from validated data, not from users.
        """
        num32 = np.ascontiguousarray(num, dtype=np.float32)
        cat_o = np.asarray(cat, dtype=object)
        for label, arr, width in ((NUM_INPUT, num32, self.n_numeric),
                                  (CAT_INPUT, cat_o, self.n_categorical)):
            if arr.ndim != 2 or arr.shape[1] != width:
                raise SchemaError(f"{label} has shape {arr.shape} but the schema needs "
                                  f"[N, {width}]; pass the blocks in schema order", field=label)
        if num32.shape[0] != cat_o.shape[0]:
            raise SchemaError(f"num has {num32.shape[0]} rows but cat has {cat_o.shape[0]}",
                              field=CAT_INPUT)
        batch, bad = self._batch(num32, cat_o, owned=False)
        if bad is not None:
            raise bad
        return batch

    def keys(self, batch: EncodedBatch) -> np.ndarray:
        """Return canonical key bytes, ``uint8 [N, key_width]``, for each encoded row."""
        num = canonical_f32(batch.num.copy())
        parts = [num.view(np.uint8).reshape(len(batch), -1),
                 np.ascontiguousarray(batch.codes, dtype="<i4").view(np.uint8)
                 .reshape(len(batch), -1)]
        return np.ascontiguousarray(np.concatenate(parts, axis=1))

    # ------------------------------------------------------------------------------ internals
    def _numbers(self, num_rows: Sequence[Sequence[Any]]) -> np.ndarray | None:
        """float32 ``[N, n_num]`` of typed numeric cells; None if a cell is refused."""
        n_rows = len(num_rows)
        num = np.empty((n_rows, self.n_numeric), dtype=np.float32)
        if not (self.n_numeric and n_rows):
            return num
        # map(type) runs at C speed; plain ints, floats and None (numpy reads it as NaN, the
        # rule's missing) are copied in C; anything else (bool, str, numpy scalars) takes the
        # rule cell by cell.
        with np.errstate(over="ignore"):
            if set(map(type, chain.from_iterable(num_rows))) <= _PLAIN_OR_NONE:
                try:
                    num[:] = num_rows
                except OverflowError:  # an int past float range
                    return None
            else:
                try:
                    num[:] = [list(map(cells.number, r)) for r in num_rows]
                except cells.CellRefused:
                    return None
        if np.isinf(num).any():
            return None
        return num

    def _strings(self, cat_rows: Sequence[Sequence[Any]]) -> np.ndarray | None:
        """object ``[N, n_cat]`` of categorical cells as sent (None as missing); None if a
        cell cannot be a category at all. Strings are normalised later, by :meth:`_batch`."""
        n_rows = len(cat_rows)
        cat = np.empty((n_rows, self.n_categorical), dtype=object)
        if not (self.n_categorical and n_rows):
            return cat
        kinds = set(map(type, chain.from_iterable(cat_rows)))
        if kinds <= _STR_ONLY:
            cat[:] = cat_rows  # all plain strings: one C-level copy
            return cat
        if not all(k is _NONE or issubclass(k, str) for k in kinds):
            return None
        cat[:] = [[MISSING_CATEGORY if v is None else v for v in vals] for vals in cat_rows]
        return cat

    def _num_block(self, num: Any) -> np.ndarray | None:
        """``num`` as a 2-D float32 array (object dtype when its cells need the rule)."""
        if not self.n_numeric:
            return None
        names = self.numeric_names
        if num is None:
            raise InputError(f"num= is required: the model takes {self.n_numeric} numeric "
                             f"columns ({', '.join(names)})", field=NUM_INPUT)
        if type(num) is np.ndarray and num.dtype == np.float32:
            arr = np.ascontiguousarray(num)
        elif isinstance(num, np.ndarray) and num.dtype.kind in "fiu":
            with np.errstate(over="ignore"):  # past float32 becomes inf, refused by the caller
                arr = np.ascontiguousarray(num, dtype=np.float32)
        else:
            # Lists, object arrays, bool and text arrays: numpy would turn True into 1.0 and
            # "3" into 3.0, so every cell goes through the rule unless all are plain numbers.
            arr = np.asarray(num, dtype=object) if not isinstance(num, np.ndarray) \
                else num.astype(object)
            if arr.ndim == 2 and set(map(type, arr.ravel().tolist())) <= _PLAIN_NUMBERS:
                # An int past float range stays an object: the rule names it.
                with np.errstate(over="ignore"), contextlib.suppress(OverflowError):
                    arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.n_numeric:
            raise InputError(f"num has shape {arr.shape}; send [N, {self.n_numeric}] in the "
                             f"order {', '.join(names)}", field=NUM_INPUT)
        return arr

    def _cat_block(self, cat: Any, rows: int | None) -> np.ndarray | None:
        """``cat`` as a 2-D object array with ``rows`` rows."""
        if not self.n_categorical:
            return None
        names = self.categorical_names
        if cat is None:
            raise InputError(f"cat= is required: the model takes {self.n_categorical} "
                             f"categorical columns ({', '.join(names)})", field=CAT_INPUT)
        arr = np.asarray(cat, dtype=object)
        if arr.ndim != 2 or arr.shape[1] != self.n_categorical or \
                (rows is not None and arr.shape[0] != rows):
            raise InputError(f"cat has shape {arr.shape}; send [N, {self.n_categorical}] "
                             f"strings in the order {', '.join(names)}"
                             + (f" with {rows} rows like num" if rows is not None else ""),
                             field=CAT_INPUT)
        return arr

    def _object_numbers(self, arr: np.ndarray, first: FirstBad) -> np.ndarray:
        """float32 of an object block, each cell by :func:`cells.number`; the first refused
        cell is noted in ``first``."""
        out = np.empty(arr.shape, dtype=np.float32)
        for r, vals in enumerate(arr.tolist()):
            for j, v in enumerate(vals):
                try:
                    out[r, j] = cells.number(v)
                except cells.CellRefused as exc:
                    first.note(r, self._numeric[j], exc.reason)
                    return out
        return out

    def _columns_in_range(self, num: np.ndarray) -> bool:
        """True when every column's NaN-ignoring min and max lie within the training range."""
        lo, hi = column_bounds(num)  # comparisons with NaN are False, and numpy is silent
        return not bool((lo < self._lo).any() or (hi > self._hi).any())

    def _batch(self, num: np.ndarray, cat: np.ndarray, owned: bool
               ) -> tuple[EncodedBatch, InputError | None]:
        """The batch of checked numbers and raw categorical cells, with the categories
        normalised (:func:`cells.category`) where they are not known as sent; or the error
        of the first cell (row-major) that no category rule accepts. ``owned``: ``cat`` may
        be changed in place."""
        n_rows = num.shape[0]
        oor: np.ndarray
        in_range = not num.shape[1] or (n_rows > 16 and self._columns_in_range(num))
        if in_range:
            oor = np.zeros(n_rows, dtype=bool)  # the common case, in two passes instead of four
        else:
            with np.errstate(invalid="ignore"):
                oor = np.asarray(((num < self._lo) | (num > self._hi)).any(axis=1))
        unseen: np.ndarray = np.zeros(n_rows, dtype=bool)
        if not self.n_categorical or self._all_known(cat):
            # Every category is known as sent (the common case): known categories are
            # normalised already, no row is unseen, and the codes are built only if a table
            # lookup asks for them.
            return EncodedBatch(num, cat, None, oor, unseen, self._cat_index, in_range), None
        codes = category_codes(cat, self._cat_index)
        todo = np.argwhere(codes == UNSEEN_CODE)  # row-major: the first bad cell comes first
        if todo.size and not owned:
            cat = cat.copy()
        for r, j in todo.tolist():
            try:
                value = cells.category(cat[r, j])
            except cells.CellRefused as exc:
                return EMPTY_BATCH, refusal(r, self._names[self._categorical[j]], exc.reason)
            cat[r, j] = value
            codes[r, j] = self._cat_index[j].get(value, UNSEEN_CODE)
        unseen = (codes == UNSEEN_CODE).any(axis=1)
        return EncodedBatch(num, cat, codes, oor, unseen, self._cat_index), None

    def _all_known(self, cat: np.ndarray) -> bool:
        """True when every cell is one of its column's training categories.

        A set's ``issuperset`` over a column list runs in C at ~10 ns a cell, 4x the
        per-cell code lookup; an unhashable cell (not a string anyway) answers False.
        """
        try:
            return all(known.issuperset(col)
                       for known, col in zip(self._cat_known, cat.T.tolist()))
        except TypeError:
            return False


def _tuple_getter(keys: Sequence[Any]) -> Callable[[Any], tuple[Any, ...]]:
    """``operator.itemgetter`` that always returns a tuple (also for zero or one key)."""
    if not keys:
        return lambda _obj: ()
    if len(keys) == 1:
        key = keys[0]
        return lambda obj: (obj[key],)
    return operator.itemgetter(*keys)


__all__ = ["CATEGORICAL", "CAT_INPUT", "MISSING_CATEGORY", "MISSING_TOKENS", "NUMERIC",
           "NUM_INPUT", "UNSEEN_CODE", "EncodedBatch", "Feature", "InputSchema",
           "canonical_bytes", "canonical_f32", "category_codes", "column_bounds", "refusal"]
