"""The field rules every incoming record is checked with: one definition of each.

:mod:`hybridml.cloud.ingest` (summaries, feedback) and :mod:`hybridml.cloud.ingest_rollout`
(shadow, interleave and ``load_failed`` health records) call these; each raises an
:class:`InputError` whose ``field`` is the path inside the record (``body.window.start``).
"""

from __future__ import annotations

import contextlib
import math
import re
from itertools import pairwise
from typing import Any

from hybridml.shared.clock import from_iso, utc_iso
from hybridml.shared.errors import HybridMLError, InputError
from hybridml.shared.text import printable

from .facts import Facts, ModelFacts

FORMAT = 1
MAX_COUNT = 10**12  # no window holds more rows; bounds what a buggy device can add
MAX_BINS = 1024
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
EARLIEST, LATEST = 946684800.0, 4102444800.0  # 2000-01-01 .. 2100-01-01


def parse_time(value: Any, field: str) -> float:
    """POSIX seconds of an ISO 8601 time (``2026-12-01T16:00:00Z``; no zone means UTC) or of
    a number of seconds; InputError naming ``field`` for anything else."""
    when: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        when = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        with contextlib.suppress(ValueError):
            when = from_iso(value)
    if when is None or not EARLIEST <= when < LATEST:  # also refuses NaN
        raise InputError(f"{field} {short(value)} is not a time: send ISO 8601 UTC such as "
                         "2026-12-01T16:00:00Z (years 2000-2099)", field=field)
    return when


def window(body: dict[str, Any], prefix: str) -> tuple[float, float, dict[str, str]]:
    """``body["window"]`` as (start, end, normalised ``{"start", "end"}``); the end may not
    come before the start."""
    win = body.get("window")
    if not isinstance(win, dict):
        raise InputError("'window' must be {\"start\": ISO, \"end\": ISO}",
                         field=prefix + "window")
    start = parse_time(win.get("start"), prefix + "window.start")
    end = parse_time(win.get("end"), prefix + "window.end")
    if end < start:
        raise InputError("the window ends before it starts", field=prefix + "window.end")
    return start, end, {"start": utc_iso(start), "end": utc_iso(end)}


def check_format(body: dict[str, Any], prefix: str) -> None:
    """``body["format"]`` must be :data:`FORMAT`."""
    if body.get("format") != FORMAT:
        raise InputError(f"format {short(body.get('format'))} is unknown; this cloud reads "
                         f"format {FORMAT}", field=prefix + "format")


def model_facts(body: dict[str, Any], facts: Facts, prefix: str, *, version_required: bool,
                key: str = "version") -> ModelFacts:
    """The facts of the model (and version ``body[key]``) a body names; InputError naming
    ``model`` or ``key`` when the registry has no such model or version."""
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 64:
        raise InputError("'model' must be the model's name", field=prefix + "model")
    version = body.get(key)
    if version is None and version_required:
        raise InputError(f"'{key}' is missing: send the model version counted",
                         field=prefix + key)
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 < version < 10**9):
        raise InputError(f"'{key}' {short(version)} is not a version number",
                         field=prefix + key)
    try:
        return facts(model, version)
    except HybridMLError as exc:  # NotFoundError naming "model" or "version"
        where = str(exc.details.get("field", "model"))
        raise InputError(exc.message, field=prefix + (key if where == "version" else where)
                         ) from None


def count(value: Any, field: str) -> int:
    """A whole number from 0 to :data:`MAX_COUNT`."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise InputError(f"{field.rsplit('.', 1)[-1]} must be a whole number from 0 to "
                         f"{MAX_COUNT}, not {short(value)}", field=field)
    return value


def counts(value: Any, field: str, n: int | None) -> list[int]:
    """A list of :func:`count` s, of length ``n`` when given."""
    if not isinstance(value, list) or len(value) > MAX_BINS:
        raise InputError("'counts' must be a list of whole numbers", field=field)
    if n is not None and len(value) != n:
        raise InputError(f"{len(value)} counts do not fit the {n} bins (edges + 1, or "
                         "categories + 1)", field=field)
    return [count(v, field) for v in value]


def histogram(value: Any, field: str) -> dict[str, Any]:
    """``{"edges": [increasing numbers], "counts": [len(edges) + 1 counts]}`` (bin 0 below
    the first edge, the last above the last edge)."""
    if not isinstance(value, dict):
        raise InputError("a histogram must be {\"edges\": [...], \"counts\": [...]}",
                         field=field)
    edges = value.get("edges")
    if not isinstance(edges, list) or not 0 < len(edges) < MAX_BINS or not all(
            number(e) for e in edges) or any(b <= a for a, b in pairwise(edges)):
        raise InputError("'edges' must be a non-empty list of increasing numbers",
                         field=field + ".edges")
    return {"edges": edges, "counts": counts(value.get("counts"), field + ".counts",
                                             len(edges) + 1)}


def number(value: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def tally(value: Any, field: str) -> dict[str, int]:
    """An object of counts by name (at most 64 names)."""
    if not isinstance(value, dict) or len(value) > 64:
        raise InputError(f"'{field.rsplit('.', 1)[-1]}' must be an object of counts by name",
                         field=field)
    out = {}
    for key, n in value.items():
        if not KEY_RE.fullmatch(key):
            raise InputError(f"key {short(key)} is not a name (letters, digits, '_.-')",
                             field=f"{field}.{printable(key, 64)}")
        out[key] = count(n, f"{field}.{key}")
    return out


def flag(value: Any, field: str) -> bool:
    """A JSON boolean."""
    if not isinstance(value, bool):
        raise InputError(f"{field.rsplit('.', 1)[-1]} must be true or false", field=field)
    return value


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, printable and cut to ``limit`` characters."""
    return printable(repr(value), limit)
