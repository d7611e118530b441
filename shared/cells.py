"""The cell rules: what one value of one column may be, and what the model sees for it.

This module is the only definition of those rules. Every route that turns user input into
model inputs — ``EdgeRuntime.predict`` (one row and many), ``predict_arrays``, the edge CLI
(JSON and CSV), the cloud's ``/predict``, ``precompute`` and the training data — calls these
functions or a vectorised form defined here beside them, so one change here changes them all.

Numeric cell, sent as a typed value (JSON, Python, numpy):

* ``None`` or a NaN means missing (the model's imputer fills it in);
* ``int``, ``float`` and numpy numbers are numbers; ``bool`` (and ``numpy.bool_``) is not;
* text is not a number in a typed route: ``"3"`` is refused (send ``3``). CSV has no types,
  so the text routes (:func:`number_text`) parse it;
* infinities and values that round past float32's range are refused.

Numeric cell, sent as CSV text: Python's ``float()`` reads it (surrounding whitespace is
ignored); the spellings in :data:`MISSING_TOKENS` (any case, padded or not) mean missing;
anything else, infinities and values past float32 are refused.

Categorical cell, typed or text: ``None`` means missing; a string has its surrounding
whitespace stripped, and a :data:`MISSING_TOKENS` spelling means missing — exactly what
training did to its CSV, so ``" lewiston "`` finds the category ``"lewiston"``; a string that
is not valid Unicode (a lone surrogate) is refused; anything else (numbers, bools, bytes) is
refused.

A refused cell raises :class:`CellRefused` carrying only the reason; the caller names the row
and the column (:func:`hybridml.shared.schema.refusal`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError

# Spellings of "missing" in text, for training CSVs, request logs and edge CSV input alike.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})
MISSING_CATEGORY = ""
F32_MAX = float(np.finfo(np.float32).max)
_NAN = math.nan
_PLAIN = (int, float)


class CellRefused(ValueError):
    """A cell the rules refuse; ``reason`` completes "row R column C ..."."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message must not echo megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


TOO_LARGE = "is infinite or too large for float32; send a finite number or null"
TOO_LARGE_TEXT = "is infinite or too large for float32; send a finite number or leave it empty"


def finite_f32(value: float, reason: str = TOO_LARGE) -> float:
    """``value`` if it is NaN (missing) or a finite number that float32 can hold."""
    if value != value or -F32_MAX <= value <= F32_MAX:
        return value
    # Past F32_MAX but below the rounding midpoint, float32 rounds down to F32_MAX: accept
    # exactly what the C cast (numpy's astype, struct's 'f') keeps finite.
    with np.errstate(over="ignore"):
        if math.isinf(value) or math.isinf(float(np.float32(value))):
            raise CellRefused(reason)
    return value


def number(value: Any) -> float:
    """A typed numeric cell as a float (NaN for missing); :class:`CellRefused` otherwise."""
    if type(value) is float:
        return finite_f32(value)
    if value is None:
        return _NAN
    if isinstance(value, (bool, np.bool_)):
        raise CellRefused(f"is numeric and needs a number or null, got {value!r}")
    if isinstance(value, (*_PLAIN, np.integer, np.floating)):
        try:
            return finite_f32(float(value))
        except OverflowError:  # an int like 10**400
            raise CellRefused(TOO_LARGE) from None
    if isinstance(value, str):
        raise CellRefused(f"is numeric and needs a number or null, got the text "
                          f"{short_repr(value)}; send the number itself")
    raise CellRefused(f"is numeric and needs a number or null, got {short_repr(value)}")


def number_text(text: str) -> float:
    """A numeric cell of CSV text as a float (NaN for missing); :class:`CellRefused` if not."""
    try:
        value = float(text)
    except ValueError:
        if text.strip().lower() in MISSING_TOKENS:
            return _NAN
        raise CellRefused(f"is numeric but holds {short_repr(text)}; fix the value or leave "
                          "it empty for missing") from None
    return finite_f32(value, TOO_LARGE_TEXT)


def category(value: Any) -> str:
    """A categorical cell (typed or text) as the string the model sees ("" for missing)."""
    if value is None:
        return MISSING_CATEGORY
    if not isinstance(value, str):
        raise CellRefused(f"is categorical and needs a string or null, got "
                          f"{short_repr(value)}")
    text = str(value.strip())  # str(): a str subclass (numpy.str_) becomes a plain str
    if text.lower() in MISSING_TOKENS:
        return MISSING_CATEGORY
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CellRefused(f"holds {short_repr(text)}, which is not valid Unicode text (a "
                          "lone surrogate); send UTF-8 text") from None
    return text


def numbers_text(values: Sequence[str]) -> tuple[np.ndarray, int | None, str]:
    """:func:`number_text` over a column: ``(float32 values, first refused row, reason)``.

    The row is None when every cell is accepted. A column without missing spellings is
    parsed by ``float`` at C speed; otherwise cell by cell with the same function.
    """
    n = len(values)
    out = np.empty(n, dtype=np.float64)
    first: tuple[int, str] | None = None
    try:
        out[:] = list(map(float, values))
    except ValueError:
        for i, text in enumerate(values):
            try:
                out[i] = number_text(text)
            except CellRefused as exc:
                first = (i, exc.reason)
                out[i:] = _NAN
                break
    with np.errstate(over="ignore"):
        out32 = out.astype(np.float32)
    if first is not None:  # a float() that failed before any value too large for float32
        bad = np.isinf(out32[:first[0]])
        return (out32, int(np.argmax(bad)), TOO_LARGE_TEXT) if bad.any() else \
            (out32, first[0], first[1])
    bad = np.isinf(out32)
    if bad.any():
        return out32, int(np.argmax(bad)), TOO_LARGE_TEXT
    return out32, None, ""


class FirstBad:
    """The first refused cell seen so far, by (row, schema position)."""

    __slots__ = ("pos", "reason", "row")

    def __init__(self) -> None:
        self.row: int | None = None
        self.pos = 0
        self.reason = ""

    def note(self, row: int | None, pos: int, reason: str) -> None:
        """Keep (row, pos, reason) if it comes before the cell kept so far."""
        if row is not None and (self.row is None or (row, pos) < (self.row, self.pos)):
            self.row, self.pos, self.reason = row, pos, reason


def refusal(row: int, name: str, reason: str) -> InputError:
    """The :class:`InputError` for a refused cell, naming its row and column."""
    return InputError(f"row {row} column {name!r} {reason}", row=row, field=name)


def reason_of(err: InputError) -> str:
    """The cell reason of an error made by :func:`refusal`."""
    prefix = f"row {err.row} column {err.field!r} "
    return err.message[len(prefix):] if err.message.startswith(prefix) else err.message


def renumbered(err: InputError, row: int) -> InputError:
    """``err`` (about row 0 of a one-row call) restated for row ``row``."""
    if err.row is None:
        return err
    field = err.field
    if field is not None:
        return refusal(row, field, reason_of(err))
    return InputError(err.message.replace("row 0", f"row {row}", 1), row=row)
