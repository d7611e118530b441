"""A store's database: one SQLite file (the default) or PostgreSQL (docs/storage.md §2).

:func:`open_database` picks the engine from the :class:`~hybridml.cloud.storage.Storage`;
PostgreSQL's implementation is :mod:`hybridml.cloud.database_pg` (imported only then). Both
give per-thread transactions (``tx``) whose connection takes ``?`` placeholders, a ``stamp``
that changes when anything commits, and :func:`insert_id`.

The SQLite file is shared safely by threads and processes (gunicorn workers, cron jobs):

* Every thread of every process uses its own connection; a connection inherited across
  ``fork`` is abandoned, never used or closed, as SQLite requires.
* ``journal_mode=WAL``: readers never wait for the writer and the writer never waits for readers.
  Every write is one ``BEGIN IMMEDIATE`` transaction, so writers queue on the lock
  (``busy_timeout``) instead of failing half-way with "database is locked".
* ``synchronous=FULL``: each commit fsyncs the WAL, so a power cut never undoes a commit that a
  caller (or a device) has already seen.
* The file is created ``0600`` before SQLite opens it; SQLite gives its ``-wal`` and ``-shm``
  files the database file's mode, so they are owner-only too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from hybridml.shared.errors import HybridMLError

from .private import private_file
from .storage import Storage

BUSY_TIMEOUT_S = 30.0
# Connections inherited across fork: closing one in the child could disturb the parent's
# locks, so they are kept referenced here and never touched again.
_ABANDONED: list[sqlite3.Connection] = []


class SqlConn(Protocol):
    """What a store's SQL runs on inside a transaction (sqlite3's connection, or PgConn)."""

    def execute(self, sql: str, params: Any = ..., /) -> Any:
        """Run one statement with ``?`` placeholders; returns a cursor."""

    def executemany(self, sql: str, rows: Any, /) -> Any:
        """Run one statement per row."""


class Store(Protocol):
    """A store's database, whichever the engine."""

    dialect: str

    def tx(self, *, write: bool, notify: bool = False, lock: bool = True
           ) -> contextlib.AbstractContextManager[Any]:
        """One transaction (writes serialised per store unless ``lock`` is False)."""

    def stamp(self) -> int | None:
        """Changes when anything commits; None when it cannot be known."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read statement, in a transaction of its own."""

    def schema_version(self) -> int:
        """The schema version of the store's tables."""

    def close(self) -> None:
        """Close this thread's connection."""


def open_database(storage: Storage, root: Path, store: str, *, create: bool,
                  schema: Sequence[str], version: int, error: type[HybridMLError],
                  rowid_tables: Iterable[str] = ()) -> Store:
    """The database of ``store`` (``registry``, ``tokens``, ``telemetry``): the file
    ``<root>/<store>.db``, or the store's tables in ``storage.db`` on PostgreSQL."""
    if storage.on_postgres:
        from .database_pg import PgDatabase  # psycopg only when PostgreSQL is chosen

        assert storage.db is not None
        return PgDatabase(storage.db, store=store, create=create, schema=schema,
                          version=version, error=error, rowid_tables=rowid_tables)
    return Database(root / f"{store}.db", create=create, schema=schema, version=version,
                    error=error)


def insert_id(c: Any, sql: str, params: Sequence[Any] = ()) -> int:
    """Run an INSERT into a table keyed by an ``id`` it assigns; returns the new id."""
    if isinstance(c, sqlite3.Connection):
        return int(c.execute(sql, params).lastrowid or 0)
    return int(c.insert_id(sql, params))


class Database:
    """A SQLite file with per-thread, per-process connections and schema versioning.

    ``error`` is the :class:`HybridMLError` subclass raised for database failures.
    """

    dialect = "sqlite"

    def __init__(self, path: Path, *, create: bool, schema: Sequence[str], version: int,
                 error: type[HybridMLError]) -> None:
        self.path = path
        self.error = error
        self._local = threading.local()
        self._mode = "rwc" if create else "rw"
        if create:
            private_file(path)  # SQLite reads an empty file as an empty database
        with self.tx(write=False) as c:
            current = c.execute("PRAGMA user_version").fetchone()[0] == version
        if not current:  # only a new database takes the write lock just to be opened
            with self.tx(write=True) as c:
                have = c.execute("PRAGMA user_version").fetchone()[0]
                if have > version:
                    raise error(f"{path} has schema version {have}; this hybridml reads up to "
                                f"{version}: upgrade hybridml")
                if have < version:
                    for statement in schema:
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version = {int(version)}")
        # Later connections (other threads) must never create an empty database by accident.
        self._mode = "rw"

    def close(self) -> None:
        """Close this thread's connection (others close when their threads' objects die)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid == os.getpid():
            conn.close()
        self._local.conn = None

    def _conn(self) -> sqlite3.Connection:
        local, pid = self._local, os.getpid()
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is not None and local.pid == pid:
            return conn
        if conn is not None:
            _ABANDONED.append(conn)
        uri = f"{self.path.resolve().as_uri()}?mode={self._mode}"
        failure = (f"cannot open the database {self.path}: {{}}; check the path and its "
                   "permissions")
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise self.error(failure.format(exc)) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            mode = _enable_wal(conn)
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            conn.close()
            raise self.error(failure.format(exc)) from exc
        if mode.lower() != "wal":
            conn.close()
            raise self.error(f"{self.path} cannot use WAL mode (got {mode!r}); keep it on a "
                             "local filesystem, not a network share")
        local.conn, local.pid = conn, pid
        return conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """The rows of one read statement, in a read transaction of its own."""
        with self.tx(write=False) as c:
            return c.execute(sql, params).fetchall()

    def schema_version(self) -> int:
        """``PRAGMA user_version``: the schema version of this file."""
        with self.tx(write=False) as c:
            return int(c.execute("PRAGMA user_version").fetchone()[0])

    def stamp(self) -> int | None:
        """:meth:`data_version`, or None when the file cannot be read."""
        try:
            return self.data_version()
        except sqlite3.Error:
            return None

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version`` on this thread's connection: it changes whenever
        another connection commits (not for this connection's own commits). One cheap read,
        outside any transaction; raises ``sqlite3.Error`` like any query."""
        return int(self._conn().execute("PRAGMA data_version").fetchone()[0])

    @contextlib.contextmanager
    def tx(self, *, write: bool, notify: bool = False, lock: bool = True
           ) -> Iterator[sqlite3.Connection]:
        """One transaction; writes take the lock up front so they never fail half-way.
        (``notify`` and ``lock`` are PostgreSQL's: another SQLite connection sees
        ``data_version`` move, and SQLite has one writer at a time whatever is asked.)"""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self.error(
                    f"database {self.path} failed: {exc} (another process may have held the "
                    f"write lock for over {BUSY_TIMEOUT_S:.0f} s; retry)") from exc
            raise


def _enable_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL; return the journal mode SQLite reports.

    Switching a fresh database needs an exclusive lock, and SQLite answers "database is
    locked" at once (without the busy handler) when several processes open a new file
    together; so retry until the busy timeout. Once the file is in WAL mode this is a no-op.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.01)
