"""JSON text as both sides read it: strict JSON, where ``NaN`` and ``Infinity`` are not numbers.

Python's parser accepts the ``NaN``/``Infinity`` literals; JSON does not. They are read here as
a :class:`NotJSON` marker, which the cell rules refuse like any other non-number, naming the
row and the column — so the cloud's ``/predict`` and the edge CLI's JSON input refuse the same
rows with the same error. ``null`` is the way to send a missing value.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import InputError


class NotJSON:
    """Stands for a ``NaN``/``Infinity`` literal in a body that should be JSON."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __repr__(self) -> str:
        return f"{self.literal}, which is not JSON (send null for a missing value)"


_DECODER = json.JSONDecoder(parse_constant=NotJSON)


def loads(text: str, what: str = "the input", field: str = "body") -> Any:
    """Parse strict JSON; :class:`InputError` naming ``field`` when ``text`` is not JSON."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column "
                         f"{exc.colno}", field=field) from None
    except RecursionError:
        raise InputError(f"{what} nests arrays or objects too deeply; send shallow JSON (a "
                         "row is a flat object or list)", field=field) from None
    except ValueError:  # an integer literal over Python's 4300-digit limit
        raise InputError(f"{what} holds a number with thousands of digits; send numbers that "
                         "fit a float", field=field) from None


def loads_body(raw: bytes, what: str = "the request body", field: str = "body") -> Any:
    """Parse a UTF-8 body as strict JSON (:func:`loads`); bytes that are not UTF-8 are an
    :class:`InputError` naming the offset."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not UTF-8 (bad byte at offset {exc.start}); send JSON "
                         "encoded as UTF-8", field=field) from None
    return loads(text, what, field)
