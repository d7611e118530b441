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

import time

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_iso(when: float | None = None) -> str:
    """``when`` (POSIX seconds, e.g. a file's mtime; default: now) as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return time.strftime(FORMAT, time.gmtime(when))


__all__ = ["FORMAT", "utc_iso"]
