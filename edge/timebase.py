"""Time on a device whose wall clock lies (docs/device.md §6).

A Raspberry Pi has no real-time clock: it boots at 1970 (or at the time ``fake-hwclock`` saved
at the last shutdown) and its wall clock jumps, by years, once NTP answers. So on the edge the
wall clock is **data, never control**:

* waits, backoff, intervals, breakers and cooldowns run on ``time.monotonic`` (the agent's
  ``threading.Event.wait``, :class:`~hybridml.edge.fallback.CircuitBreaker`, the telemetry
  flusher);
* the spool orders records by an SQLite sequence and judges their age by :class:`RunningClock`
  — seconds the device has run since the spool was made, carried across reboots in the spool
  itself — never by ``created``;
* a window (telemetry, shadow, ranking) is dated by the wall clock at its end and its length
  on the monotonic clock (:func:`span`), so a jump inside a window neither stretches it over
  years nor makes it end before it starts;
* a time written while the clock was *implausible* (before :data:`PLAUSIBLE_FROM`, this
  release's date) is re-dated when it is uploaded, from the running clock (:func:`redate`);
  until the clock is plausible such records wait in the spool (the cloud refuses times
  before 2000, and a refusal would quarantine them for good).

Trust does not read the clock at all (signatures cover bytes; ``created`` is never compared);
freshness (:mod:`hybridml.edge.freshness`) compares it with the cloud's signed ``issued`` and
stops judging expiry while the clock is behind it.
"""

from __future__ import annotations

import calendar
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hybridml.shared.clock import from_iso, utc_iso

PLAUSIBLE_FROM = float(calendar.timegm((2026, 11, 1, 0, 0, 0)))  # before it, a clock is wrong
PLAUSIBLE_UNTIL = float(calendar.timegm((2100, 1, 1, 0, 0, 0)))  # the cloud's latest time
JUMP_TOLERANCE_S = 2.0  # wall and monotonic lengths of a window may differ this much (NTP slew)
SAVE_EVERY_S = 3600.0  # the running clock's last reading is written at most this often
# (a reboot loses at most this much running time: records live up to an hour longer)
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROCESS_BOOT = uuid.uuid4().hex  # where there is no boot id, each process counts as a boot


def plausible(when: float) -> bool:
    """Whether ``when`` (POSIX seconds) can be the true time on a device running this kit."""
    return PLAUSIBLE_FROM <= when < PLAUSIBLE_UNTIL


def boot_id() -> str:
    """This boot's id (Linux's ``boot_id``; elsewhere an id of this process)."""
    try:
        return _BOOT_ID.read_text().strip() or _PROCESS_BOOT
    except OSError:
        return _PROCESS_BOOT


def span(start_wall: float, start_mono: float, end_wall: float, end_mono: float
         ) -> tuple[float, float]:
    """``(start, end)`` of a window: ``end`` by the wall clock, and, when the wall clock
    jumped during the window (its length disagrees with the monotonic one), ``start`` its
    monotonic length before ``end``."""
    length = max(0.0, end_mono - start_mono)
    if abs((end_wall - start_wall) - length) <= JUMP_TOLERANCE_S:
        return start_wall, end_wall
    return end_wall - length, end_wall


def redate(when: float, age_then: float, age_now: float, wall_now: float) -> float:
    """``when``, written at running age ``age_then``, as best known now: unchanged when it
    was plausible (or the clock still is not), else ``wall_now`` less the running time since.
    Time the device spent switched off is not counted, so a re-dated record from before a
    reboot looks younger than it is, never older."""
    if plausible(when) or not plausible(wall_now):
        return when
    return wall_now - max(0.0, age_now - age_then)


def shift_times(body: Any, shift: float) -> Any:
    """``body`` (a decoded record body) with its implausible ``created`` and ``window``
    ``start``/``end`` times (ISO strings written by the same wrong clock) moved by ``shift``
    seconds; other fields are left as they are."""
    if not isinstance(body, dict):
        return body
    window = body.get("window")
    places = [(body, "created")] + ([(window, "start"), (window, "end")]
                                    if isinstance(window, dict) else [])
    for holder, key in places:
        value = holder.get(key)
        try:
            when = from_iso(value) if isinstance(value, str) else None
        except ValueError:
            when = None
        if when is not None and not plausible(when):
            holder[key] = utc_iso(when + shift)
    return body


class WindowClock:
    """When the current window started, by the wall ``clock`` and the ``monotonic`` one
    (default ``time.monotonic``, or ``clock`` itself when a test passes a clock and no
    monotonic one); :meth:`cut` ends the window and starts the next."""

    def __init__(self, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.clock = clock
        self.monotonic = monotonic or (time.monotonic if clock is time.time else clock)
        self.start, self.mono = clock(), self.monotonic()

    def peek(self) -> tuple[float, float]:
        """``(start, end)`` of the window so far (:func:`span`)."""
        return span(self.start, self.mono, self.clock(), self.monotonic())

    def cut(self) -> tuple[float, float]:
        """``(start, end)`` of the window now ended; the next starts at ``end``."""
        start, end = self.peek()
        self.start, self.mono = end, self.monotonic()
        return start, end


class RunningClock:
    """Seconds the device has been running since a database was made, in that database.

    One row ``(boot, anchor, base, last)``: within a boot the age is ``base`` plus the
    monotonic time since ``anchor`` (``CLOCK_MONOTONIC`` is system-wide, so every process
    of the boot agrees); after a reboot it goes on from ``last``, the age last written (at
    most :data:`SAVE_EVERY_S` old, with each write transaction), plus the new boot's
    monotonic time (which starts at boot; ``since_boot``, true where Linux gives a boot id:
    elsewhere each process counts as a boot and only its own running time is added). It
    never goes down and never jumps with the wall clock; time switched off does not count.
    ``monotonic`` and ``boot`` are injectable.
    """

    SCHEMA = ("CREATE TABLE IF NOT EXISTS running (one INTEGER PRIMARY KEY CHECK (one = 1), "
              "boot TEXT NOT NULL, anchor REAL NOT NULL, base REAL NOT NULL, "
              "last REAL NOT NULL)")

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 boot: Callable[[], str] = boot_id, since_boot: bool | None = None) -> None:
        self.monotonic = monotonic
        self.boot = boot
        self.since_boot = _BOOT_ID.exists() if since_boot is None else since_boot

    def read(self, db: sqlite3.Connection) -> float:
        """The age now (no write)."""
        return self._age(db)[0]

    def tick(self, db: sqlite3.Connection) -> float:
        """The age now, recorded (inside the caller's write transaction): a new boot is
        anchored, and ``last`` is raised when it is :data:`SAVE_EVERY_S` behind."""
        age, row = self._age(db)
        boot, mono = self.boot(), self.monotonic()
        if row is None or row[0] != boot:  # a new boot: its monotonic time counts from 0
            db.execute("INSERT OR REPLACE INTO running (one, boot, anchor, base, last) "
                       "VALUES (1, ?, ?, ?, ?)", (boot, mono, age, age))
        elif age - row[3] >= SAVE_EVERY_S:
            db.execute("UPDATE running SET last = ? WHERE one = 1", (age,))
        return age

    def _age(self, db: sqlite3.Connection) -> tuple[float, tuple[str, float, float, float] | None]:
        row = db.execute("SELECT boot, anchor, base, last FROM running WHERE one = 1").fetchone()
        if row is None:
            return 0.0, None
        boot, anchor, base, last = row
        if boot != self.boot():
            return float(last) + (max(0.0, self.monotonic()) if self.since_boot else 0.0), row
        return max(float(last), float(base) + max(0.0, self.monotonic() - float(anchor))), row


__all__ = ["JUMP_TOLERANCE_S", "PLAUSIBLE_FROM", "PLAUSIBLE_UNTIL", "SAVE_EVERY_S",
           "RunningClock", "WindowClock", "boot_id", "plausible", "redate", "shift_times", "span"]
