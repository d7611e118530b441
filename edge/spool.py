"""The spool: telemetry and feedback records kept on the device until the cloud has them.

``<store>/telemetry.db`` is SQLite in WAL mode (docs/monitoring.md §4). A record is
``{"id", "kind", "priority", "created", "body"}``; its id is ``<store id>:<sequence>`` and the
sequence only grows (AUTOINCREMENT, whatever the wall clock does). A spool deleted and made
again must not reuse ids the cloud already holds (it would drop them as duplicates): a new
spool starts at the larger of the wall clock in milliseconds and the floor in
``telemetry.floor``, which :meth:`Spool.remove` keeps above every id the cloud has accepted
(it writes the highest accepted sequence plus a million, so about once per million records,
not once per push). A spool made while the clock says 1970 therefore still starts past the
ids the cloud holds.

Clocks (docs/device.md §6, :mod:`hybridml.edge.timebase`): ``created`` is data only. Order is
the sequence; age is the spool's :class:`~hybridml.edge.timebase.RunningClock` (seconds the
device has run, carried across reboots), stored with each record as ``age``. A wall clock that
jumps years ahead expires nothing at once, and one that jumps back keeps nothing forever. A
record made while the clock was implausible (before this release's date) is re-dated from its
age when read for upload (its ``created``, and the body's ``created`` and ``window``); until
the clock is plausible it is not offered for upload (:meth:`Spool.queue`), so the cloud never
quarantines it for a 1970 date.

Kinds and priorities: ``alert`` and ``health`` 0 (never dropped), ``summary``, ``shadow`` and
``interleave`` 1 (the last two: a rollout's comparisons, docs/rollouts.md §4), ``feedback`` 2,
``sample`` 3. Two limits keep the device's disk:

* a byte cap (default 64 MB, ``HYBRIDML_SPOOL_MAX_BYTES``): past it, quarantined records go
  first, then the oldest records of the lowest priority (samples, then feedback, then
  summaries) — the record being added too, when it is the one to go;
* a time to live (7 days of running time, ``HYBRIDML_SPOOL_TTL_S``): older records are
  dropped (time switched off does not count).

What was dropped is counted by kind and reported with the next upload (``"dropped"``), then
forgotten once the cloud has it. A record the cloud refuses is **quarantined**: kept (for
``status`` and for a person to look at), never sent again.

Durability: WAL with ``synchronous=NORMAL``. A commit survives a crash of the process (the
WAL is in the OS's hands at commit); only a power cut may lose the last commits before the
next checkpoint. That is the right trade here: these are statistics re-made every window,
and a full fsync per commit would cost milliseconds and flash wear on SD-card devices.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError, HybridMLError, InputError
from hybridml.shared.files import atomic_write
from hybridml.shared.settings import load_env

from .identity import store_id
from .timebase import PLAUSIBLE_FROM, RunningClock, plausible, redate, shift_times

log = logging.getLogger("hybridml.edge.spool")

SPOOL_FILE = "telemetry.db"
FLOOR_SUFFIX = ".floor"  # telemetry.floor: new spools start their sequence above it
FLOOR_RESERVE = 1_000_000  # the floor is written this far above the highest accepted id
KINDS: dict[str, int] = {"alert": 0, "health": 0, "summary": 1, "shadow": 1, "interleave": 1,
                         "feedback": 2, "sample": 3}
PENDING, QUARANTINED = "pending", "quarantined"
_CHUNK = 500  # ids per DELETE/UPDATE statement (SQLite's variable limit is 999 on old builds)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS records (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        priority INTEGER NOT NULL,
        created REAL NOT NULL,
        model TEXT,
        version INTEGER,
        bytes INTEGER NOT NULL,
        body TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'quarantined')),
        error TEXT,
        age REAL NOT NULL DEFAULT 0)""",
    "CREATE INDEX IF NOT EXISTS records_order ON records (state, priority, seq)",
    "DROP INDEX IF EXISTS records_age",  # was on created (the wall clock): one write less
    "CREATE TABLE IF NOT EXISTS dropped (kind TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    # The bytes of every body, kept by triggers: the cap check reads one row, not the table.
    "CREATE TABLE IF NOT EXISTS total (one INTEGER PRIMARY KEY CHECK (one = 1), "
    "bytes INTEGER NOT NULL)",
    "INSERT OR IGNORE INTO total (one, bytes) VALUES (1, 0)",
    RunningClock.SCHEMA,
    "CREATE TRIGGER IF NOT EXISTS records_in AFTER INSERT ON records "
    "BEGIN UPDATE total SET bytes = bytes + NEW.bytes; END",
    "CREATE TRIGGER IF NOT EXISTS records_out AFTER DELETE ON records "
    "BEGIN UPDATE total SET bytes = bytes - OLD.bytes; END",
)


class SpoolError(HybridMLError):
    """The spool's database failed: a full disk, a read-only store, a damaged file."""

    code = "spool"
    status = 500


@dataclass(frozen=True)
class SpoolSettings:
    """Limits of the spool: ``max_bytes`` of record bodies and ``ttl_s`` seconds of age."""

    max_bytes: int = 64 * 1024 * 1024
    ttl_s: float = 7 * 86400.0

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ConfigError(f"HYBRIDML_SPOOL_MAX_BYTES must be positive, got {self.max_bytes}",
                              field="max_bytes")
        if self.ttl_s <= 0:
            raise ConfigError(f"HYBRIDML_SPOOL_TTL_S must be positive, got {self.ttl_s}",
                              field="ttl_s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SpoolSettings:
        """``HYBRIDML_SPOOL_MAX_BYTES`` and ``HYBRIDML_SPOOL_TTL_S`` over the defaults."""
        return load_env(cls, "HYBRIDML_SPOOL_", env)


@dataclass(frozen=True)
class Entry:
    """A record without its body: enough to plan an upload."""

    seq: int
    id: str
    kind: str
    model: str | None
    bytes: int


@dataclass(frozen=True)
class Record:
    """A stored record; ``body`` is its JSON text."""

    seq: int
    id: str
    kind: str
    priority: int
    created: float
    model: str | None
    version: int | None
    body: str
    state: str
    error: str | None

    def to_json(self) -> dict[str, Any]:
        """The record as uploaded: ``{"id", "kind", "priority", "created", "body"}``."""
        return {"id": self.id, "kind": self.kind, "priority": self.priority,
                "created": utc_iso(self.created), "body": json.loads(self.body)}


class Spool:
    """The records of one store, in ``path`` (see the module docstring).

    Safe to share between threads (one connection, one lock) and between processes (SQLite's
    locking; a writer waits up to 10 s for another). ``clock`` (POSIX seconds) dates records
    (data only); ``running`` judges their age (:class:`~hybridml.edge.timebase.RunningClock`;
    tests pass one with their own monotonic clock and boot id).
    """

    def __init__(self, path: str | os.PathLike[str], store_id: str,
                 settings: SpoolSettings | None = None, *,
                 clock: Callable[[], float] = time.time,
                 running: RunningClock | None = None) -> None:
        self.path = Path(path)
        self.store_id = store_id
        self.settings = settings or SpoolSettings.from_env()
        self.clock = clock
        self.running = running or RunningClock()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._write() as db:
                fresh = db.execute("SELECT name FROM sqlite_master WHERE name = 'records'"
                                   ).fetchone() is None
                for statement in _SCHEMA:
                    db.execute(statement)
                _migrate(db)
                if fresh:  # ids of a spool made again never repeat the old one's
                    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)",
                               (max(int(self.clock() * 1000), self._floor()),))
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc

    @classmethod
    def open(cls, root: str | os.PathLike[str], settings: SpoolSettings | None = None, *,
             clock: Callable[[], float] = time.time,
             running: RunningClock | None = None) -> Spool:
        """The spool of the store at ``root`` (made, with the store id, if missing)."""
        root = Path(root).expanduser()
        return cls(root / SPOOL_FILE, store_id(root), settings, clock=clock, running=running)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()

    # ----------------------------------------------------------------------------- writing
    def add(self, kind: str, body: Mapping[str, Any], *, model: str | None = None,
            version: int | None = None) -> str:
        """Store one record; returns its id. Over the cap it may be dropped at once (and
        counted) when it is the oldest of the lowest priority."""
        return self.add_many([(kind, body, model, version)])[0]

    def add_many(self, items: Iterable[tuple[str, Mapping[str, Any], str | None, int | None]]
                 ) -> list[str]:
        """Store ``(kind, body, model, version)`` records in one transaction; their ids."""
        rows = []
        for kind, body, model, version in items:
            if kind not in KINDS:
                raise InputError(f"record kind {kind!r} is not one of {', '.join(KINDS)}",
                                 field="kind")
            try:
                text = json.dumps(body, separators=(",", ":"), allow_nan=False,
                                  ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                raise InputError(f"a {kind} record holds a value JSON cannot carry ({exc}); "
                                 "send numbers, strings, lists, objects or null",
                                 field="body") from None
            rows.append((kind, KINDS[kind], model, version, text))
        ids: list[str] = []
        now = self.clock()
        with self._write() as db:
            age = self.running.tick(db)
            self._expire(db, age)
            for kind, priority, model, version, text in rows:
                cur = db.execute(
                    "INSERT INTO records (id, kind, priority, created, model, version, bytes, "
                    "body, age) VALUES ('', ?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, priority, now, model, version, len(text.encode("utf-8")), text, age))
                seq = int(cur.lastrowid or 0)
                rid = f"{self.store_id}:{seq}"
                db.execute("UPDATE records SET id = ? WHERE seq = ?", (rid, seq))
                ids.append(rid)
            self._enforce_cap(db)
        return ids

    def remove(self, seqs: Sequence[int]) -> int:
        """Delete records (the cloud has them); returns how many were deleted."""
        done = 0
        with self._write() as db:
            for part in _chunks(seqs):
                marks = ",".join("?" * len(part))
                done += db.execute(f"DELETE FROM records WHERE seq IN ({marks})", part).rowcount
        if seqs:
            self._raise_floor(max(seqs))
        return done

    def quarantine(self, errors: Mapping[int, str]) -> None:
        """Mark records the cloud refused: kept, with the cloud's reason, never sent again."""
        with self._write() as db:
            db.executemany("UPDATE records SET state = 'quarantined', error = ? WHERE seq = ?",
                           [(err[:500], seq) for seq, err in errors.items()])

    def expire(self) -> dict[str, int]:
        """Drop records older than the TTL now; what was dropped, by kind."""
        with self._write() as db:
            return self._expire(db, self.running.read(db))  # no write when nothing expires

    def forget_dropped(self, reported: Mapping[str, int]) -> None:
        """The cloud has these drop counts: subtract them (drops since then stay)."""
        with self._write() as db:
            for kind, n in reported.items():
                db.execute("UPDATE dropped SET count = MAX(0, count - ?) WHERE kind = ?",
                           (int(n), kind))
            db.execute("DELETE FROM dropped WHERE count = 0")

    # ----------------------------------------------------------------------------- reading
    def queue(self, *, model: str | None = None) -> list[Entry]:
        """Pending records in upload order (priority, then age), without their bodies;
        only those of ``model`` (and records of no model) when it is given. While the wall
        clock is implausible, records made under an implausible clock wait (they cannot be
        dated yet)."""
        sql = "SELECT seq, id, kind, model, bytes FROM records WHERE state = 'pending'"
        args: tuple[Any, ...] = ()
        if not plausible(self.clock()):
            sql += " AND created >= ?"
            args = (PLAUSIBLE_FROM,)
        if model is not None:
            sql += " AND (model = ? OR model IS NULL)"
            args += (model,)
        return [Entry(*r) for r in self._query(sql + " ORDER BY priority, seq", args)]

    def records(self, seqs: Sequence[int]) -> list[Record]:
        """The records with these sequence numbers, in that order (missing ones left out);
        a record made under an implausible clock is re-dated (module docstring)."""
        found: dict[int, Record] = {}
        wall = self.clock()
        age_now = None
        for part in _chunks(seqs):
            marks = ",".join("?" * len(part))
            for row in self._query(
                    "SELECT seq, id, kind, priority, created, model, version, body, state, "
                    f"error, age FROM records WHERE seq IN ({marks})", tuple(part)):
                record = Record(*row[:-1])
                if not plausible(record.created) and plausible(wall):
                    if age_now is None:
                        age_now = self._age()
                    record = _redated(record, redate(record.created, row[-1], age_now, wall))
                found[row[0]] = record
        return [found[s] for s in seqs if s in found]

    def summaries(self, model: str, version: int) -> list[dict[str, Any]]:
        """The bodies of the pending summaries of ``model`` ``version``, oldest first."""
        rows = self._query(
            "SELECT body FROM records WHERE state = 'pending' AND kind = 'summary' AND "
            "model = ? AND version = ? ORDER BY seq", (model, version))
        return [json.loads(r[0]) for r in rows]

    def dropped(self) -> dict[str, int]:
        """Records dropped (cap, TTL) and not yet reported, by kind."""
        return dict(self._query("SELECT kind, count FROM dropped WHERE count > 0"))

    def stats(self) -> dict[str, Any]:
        """``{"pending", "quarantined", "bytes", "oldest", "dropped"}`` (``oldest``: when the
        oldest pending record was made, or None)."""
        counts = dict(self._query("SELECT state, COUNT(*) FROM records GROUP BY state"))
        total = self._query("SELECT bytes FROM total")[0][0]
        oldest = self._query("SELECT MIN(created) FROM records WHERE state = 'pending'")[0][0]
        return {"pending": counts.get(PENDING, 0), "quarantined": counts.get(QUARANTINED, 0),
                "bytes": int(total), "oldest": None if oldest is None else utc_iso(oldest),
                "dropped": self.dropped()}

    # --------------------------------------------------------------------------- internals
    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE), under the lock; SQLite's
        errors become :class:`SpoolError`."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite may have rolled back already
                        db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("write", exc) from exc

    def _age(self) -> float:
        with self._lock:
            try:
                return self.running.read(self._db)
            except sqlite3.Error as exc:
                raise self._error("read", exc) from exc

    def _floor(self) -> int:
        """The sequence a new spool must start above (0 when there is no floor file)."""
        try:
            return max(0, int(self.path.with_suffix(FLOOR_SUFFIX).read_text().strip()))
        except (OSError, ValueError):
            return 0

    def _raise_floor(self, accepted: int) -> None:
        """Keep the floor above ``accepted`` (a sequence the cloud holds), with a reserve so
        that it is written about once per :data:`FLOOR_RESERVE` records."""
        if accepted < self._floor():
            return
        try:
            atomic_write(self.path.with_suffix(FLOOR_SUFFIX),
                         str(accepted + FLOOR_RESERVE).encode())
        except OSError as exc:  # only a spool made again later depends on it
            log.warning("could not write the spool's id floor: %s", exc)

    def _error(self, what: str, exc: sqlite3.Error) -> SpoolError:
        return SpoolError(f"cannot {what} the telemetry spool {self.path}: {exc}; check the "
                          "store's free space and permissions (delete the file to start an "
                          "empty spool)", path=str(self.path))

    def _expire(self, db: sqlite3.Connection, age: float) -> dict[str, int]:
        cutoff = age - self.settings.ttl_s  # running time, not the wall clock
        # The age index answers the common case (nothing too old) without a scan.
        if db.execute("SELECT 1 FROM records WHERE age < ? AND priority > 0 LIMIT 1",
                      (cutoff,)).fetchone() is None:
            return {}
        gone = dict(db.execute(
            "SELECT kind, COUNT(*) FROM records WHERE age < ? AND priority > 0 AND "
            "state = 'pending' GROUP BY kind", (cutoff,)).fetchall())
        db.execute("DELETE FROM records WHERE age < ? AND priority > 0", (cutoff,))
        self._count_dropped(db, gone)
        if gone:
            log.warning("spool: dropped %s record(s) older than %g s", gone,
                        self.settings.ttl_s)
        return gone

    def _enforce_cap(self, db: sqlite3.Connection) -> None:
        """Delete the least wanted records until the bodies fit the byte cap."""
        total = db.execute("SELECT bytes FROM total").fetchone()[0]
        excess = total - self.settings.max_bytes
        if excess <= 0:
            return
        victims: list[int] = []
        gone: dict[str, int] = {}
        freed = 0
        # Quarantined first (never sent again), then the lowest priority, oldest first;
        # priority 0 (alerts, health) never goes.
        cur = db.execute(
            "SELECT seq, kind, bytes, state FROM records WHERE state = 'quarantined' OR "
            "priority > 0 ORDER BY state = 'pending', priority DESC, seq")
        for seq, kind, size, state in cur:
            victims.append(seq)
            freed += size
            if state == PENDING:
                gone[kind] = gone.get(kind, 0) + 1
            if freed >= excess:
                break
        cur.close()
        for part in _chunks(victims):
            db.execute(f"DELETE FROM records WHERE seq IN ({','.join('?' * len(part))})", part)
        self._count_dropped(db, gone)
        log.warning("spool over its cap of %s bytes: dropped %s", f"{self.settings.max_bytes:,}",
                    gone or f"{len(victims)} quarantined record(s)")

    @staticmethod
    def _count_dropped(db: sqlite3.Connection, gone: Mapping[str, int]) -> None:
        for kind, n in gone.items():
            db.execute("INSERT INTO dropped (kind, count) VALUES (?, ?) ON CONFLICT (kind) DO "
                       "UPDATE SET count = count + excluded.count", (kind, n))


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a spool made by an earlier release up to this schema: the ``age`` column (its
    records count as made when the running clock started) and its index."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(records)")}
    if "age" not in columns:
        db.execute("ALTER TABLE records ADD COLUMN age REAL NOT NULL DEFAULT 0")
    db.execute("CREATE INDEX IF NOT EXISTS records_running ON records (age)")


def _redated(record: Record, created: float) -> Record:
    """``record`` made at ``created`` (its body's wrong times moved by as much)."""
    body = shift_times(json.loads(record.body), created - record.created)
    return dataclasses.replace(record, created=created, body=json.dumps(
        body, separators=(",", ":"), allow_nan=False, ensure_ascii=False))


def _chunks(seqs: Sequence[int]) -> Iterator[list[int]]:
    items = list(seqs)
    for i in range(0, len(items), _CHUNK):
        yield items[i:i + _CHUNK]


__all__ = ["KINDS", "PENDING", "QUARANTINED", "SPOOL_FILE", "Entry", "Record", "Spool",
           "SpoolError", "SpoolSettings"]
