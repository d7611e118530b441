"""SD-card wear: how often the edge writes, by path (docs/device.md §5).

Flash wears with every block written, and a Pi's SD card is its only disk. What the edge
writes, and the bound on each (``benchmarks/sdcard.py`` measures a simulated day):

* **predictions**: nothing. Telemetry counts in memory (:mod:`hybridml.edge.telemetry`);
  prediction ids live in memory (:mod:`hybridml.edge.feedback`).
* **sync, unchanged** (a ``304``): ``sync.json`` only when something in it other than the
  ``last_attempt``/``last_sync`` times changed, or when this process last wrote it
  :data:`STATE_EVERY_S` ago (:func:`should_save`). Those two times are for ``status`` and
  may lag by up to that much.
* **sync, changed**: the cloud re-signs each manifest hourly (``REFRESH_S``), so a device
  rewrites its active pointer (``active.json``) and ``sync.json`` about once an hour; a new
  version also writes its artifacts once and the ``previous`` pointer.
* **telemetry spool**: one SQLite (WAL) transaction per window flush (hourly by default,
  ``HYBRIDML_TELEMETRY_WINDOW_S``), per push, and per feedback call; the WAL is
  checkpointed by SQLite every 1000 pages.
* **spool id floor** (``telemetry.floor``): once per million records accepted.
* **logs**: the agent logs a warning per failed cycle and one INFO line per push that moved
  records; an unchanged sync logs nothing (journald rate-limits a service's output besides).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STATE_EVERY_S = 3600.0  # an unchanged sync.json is rewritten at most this often
VOLATILE = frozenset({"last_attempt", "last_sync"})  # times that alone do not call for a write

_saved: dict[tuple[str, str], float] = {}  # (store, model) -> monotonic time of the last write
_lock = threading.Lock()


def should_save(root: Path, name: str, before: Mapping[str, Any], after: Mapping[str, Any],
                *, monotonic: Callable[[], float] = time.monotonic) -> bool:
    """Whether ``sync.json`` of ``name`` in the store at ``root`` must be written: it
    changed beyond :data:`VOLATILE`, or this process has not written it for
    :data:`STATE_EVERY_S` (then it is, and the time is noted)."""
    key = (str(root), name)
    now = monotonic()
    with _lock:
        last = _saved.get(key)
        changed = {k: v for k, v in before.items() if k not in VOLATILE} != \
            {k: v for k, v in after.items() if k not in VOLATILE}
        if changed or last is None or now - last >= STATE_EVERY_S:
            _saved[key] = now
            return True
        return False


__all__ = ["STATE_EVERY_S", "VOLATILE", "should_save"]
