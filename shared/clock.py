"""UTC timestamps: one format for every time the kit writes down.

``2026-11-27T19:01:07Z`` — RFC 3339 / ISO 8601 in UTC, whole seconds, ``Z`` suffix. The same
format is in manifests (``created``), the registry's versions and aliases, API tokens, the
audit log, signing keys and the edge's ``sync.json``. It is fixed-width, so timestamps sort
correctly as strings, and every consumer only compares or displays them.

Earlier releases wrote tokens and audit entries with microseconds
(``2026-11-27T19:01:07.123456Z``); those stay readable and compare correctly with new ones
(the first 19 characters decide, and nothing was written in both formats within one second).
"""

from __future__ import annotations

import re
import time

from .errors import ConfigError

FORMAT = "%Y-%m-%dT%H:%M:%SZ"
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)")


def utc_iso(when: float | None = None) -> str:
    """``when`` (POSIX seconds, e.g. a file's mtime; default: now) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime(FORMAT, time.gmtime(when))


def from_iso(text: str) -> float:
    """POSIX seconds of an ISO 8601 time: ``2026-12-01T16:00:00Z``, with a fraction or an
    offset, or without a zone (taken as UTC). ``ValueError`` for anything else; callers turn
    it into their typed error naming the field."""
    import datetime as dt  # only where a time is read, never on a hot path

    raw = text.strip()
    raw = raw[:-1] + "+00:00" if raw[-1:] in ("Z", "z") else raw
    when = dt.datetime.fromisoformat(raw)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def format_duration(seconds: float) -> str:
    """``seconds`` the way :func:`parse_duration` reads them back, in the largest unit that
    fits, up to days: ``45s``, ``10m``, ``6h``, ``7d``, ``1.5d`` (3 significant digits)."""
    for unit in ("d", "h", "m"):
        if abs(seconds) >= UNITS[unit]:
            return f"{seconds / UNITS[unit]:.3g}{unit}"
    return f"{seconds:.3g}s"


def parse_duration(text: str, field: str = "duration") -> float:
    """Seconds in ``text``: a number with an optional unit, ``s``, ``m``, ``h``, ``d`` or ``w``
    (``90m``, ``6h``, ``7d``; a bare number is seconds). :class:`ConfigError` naming ``field``
    for anything else, or for zero."""
    m = _DURATION_RE.fullmatch(str(text).strip().lower())
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{field} {str(text)[:40]!r} is not a duration: write a positive "
                          "number with a unit, such as 90m, 6h, 7d or 2w", field=field)
    return float(m.group(1)) * UNITS[m.group(2) or "s"]


__all__ = ["FORMAT", "UNITS", "format_duration", "from_iso", "parse_duration", "utc_iso"]
