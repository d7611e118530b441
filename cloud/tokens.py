"""API tokens: who may call the cloud, stored hashed in ``<registry>/tokens.db``.

A token looks like ``hml_<id>_<secret>``: ``id`` (12 hex digits) is public and names the token
in logs and listings; ``secret`` is 32 random bytes (``secrets.token_urlsafe``). Only the sha256
of the whole token is stored. A slow password hash (bcrypt, argon2) protects low-entropy
passwords against guessing; a 256-bit random secret cannot be guessed, so a plain sha256 is as
strong here and costs microseconds per request instead of tens of milliseconds. Lookup is by
the public id, and the hashes are compared with :func:`hmac.compare_digest` (constant time).
The check reads through one connection per thread, kept open while the file stays the same
one (a replaced or deleted file is noticed at the next request), so it costs an indexed read,
not a connection per request.

Roles: ``device`` may read manifests and artifacts, predict and post telemetry; ``admin`` may
also promote, roll back and upload. Revocation is immediate: every request reads the table.

On a fleet (``--db postgresql://...``, docs/storage.md) the same table lives in PostgreSQL and
every replica reads it per request, so a token revoked through one replica is refused by all
at their next request.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError, NotFoundError, RegistryError

from .database import Database, Store, open_database
from .private import private_dir, private_file
from .storage import Storage

log = logging.getLogger("hybridml.cloud.tokens")

DB_NAME = "tokens.db"
STORE = "tokens"
SCHEMA_VERSION = 1
ROLES = ("device", "admin")
PREFIX = "hml"
_TOKEN_RE = re.compile(r"^hml_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.@:-]{0,63}$")
# Read connections inherited across fork are kept referenced and never used or closed again
# (closing one in the child could disturb the parent's locks).
_ABANDONED: list[sqlite3.Connection] = []
_SCHEMA = """CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, sha256 TEXT NOT NULL,
    created TEXT NOT NULL, revoked TEXT)"""


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, without its secret."""

    id: str
    name: str
    role: str
    created: str
    revoked: str | None

    @property
    def active(self) -> bool:
        """True until the token is revoked."""
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``tokens list --json``."""
        return {"id": self.id, "name": self.name, "role": self.role, "created": self.created,
                "revoked": self.revoked}


def hash_token(token: str) -> str:
    """Hex sha256 of a token (what is stored)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Create, list, revoke and check tokens kept in one small SQLite file beside the
    registry, or in the ``tokens`` table of the registry's PostgreSQL database.

    ``registry`` is a :class:`~hybridml.cloud.registry.Registry` (its storage decides) or a
    registry root directory (SQLite)."""

    def __init__(self, registry: str | os.PathLike[str], storage: Storage | None = None
                 ) -> None:
        self.path = Path(registry).expanduser().resolve() / DB_NAME
        storage = storage or getattr(registry, "storage", None) or Storage()
        self._local = threading.local()  # this thread's reader: (file identity, connection)
        self._pg: Store | None = None
        if storage.on_postgres:
            self._pg = open_database(storage, self.path.parent, STORE, create=True,
                                     schema=[_SCHEMA], version=SCHEMA_VERSION,
                                     error=RegistryError, rowid_tables=(STORE,))

    @property
    def database(self) -> Store:
        """The token table's database (``migrate`` copies it; creates the file if absent)."""
        if self._pg is not None:
            return self._pg
        private_dir(self.path.parent)
        return Database(self.path, create=True, schema=[_SCHEMA], version=SCHEMA_VERSION,
                        error=RegistryError)

    def schema_version(self) -> int:
        """The schema version of the token table."""
        return self.database.schema_version()

    @contextlib.contextmanager
    def _db(self, *, write: bool = False) -> Iterator[Any]:
        if self._pg is not None:
            with self._pg.tx(write=write) as c:
                yield c
            return
        # One short-lived connection per call: fork-safe under gunicorn, and a request costs
        # one indexed read on a tiny file.
        if not self.path.exists() and not write:
            conn = sqlite3.connect(":memory:")  # no tokens yet: read an empty table
        else:
            if not self.path.exists():
                private_dir(self.path.parent)
                # Hashes only, but nobody else needs to read who may call the cloud.
                private_file(self.path)
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            conn.execute(_SCHEMA)
            if write:
                conn.execute("BEGIN IMMEDIATE")
            yield conn
            if write:
                conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.close()

    def create(self, role: str, name: str) -> tuple[TokenInfo, str]:
        """Create a token; returns its info and the token itself (shown only this once)."""
        if role not in ROLES:
            raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}", field="role")
        if not isinstance(name, str) or not _LABEL_RE.fullmatch(name):
            raise ConfigError(f"token name {name!r}: use 1-64 letters, digits, spaces or "
                              "'_.@:-', e.g. the device's host name", field="name")
        ident = secrets.token_hex(6)
        token = f"{PREFIX}_{ident}_{secrets.token_urlsafe(32)}"
        info = TokenInfo(ident, name, role, utc_iso(), None)
        with self._db(write=True) as c:
            c.execute("INSERT INTO tokens (id, name, role, sha256, created) VALUES (?,?,?,?,?)",
                      (ident, name, role, hash_token(token), info.created))
        log.info("created %s token %s (%s)", role, ident, name)
        return info, token

    def list(self) -> list[TokenInfo]:
        """Every token, revoked ones included, oldest first."""
        with self._db() as c:
            # rowid (insertion order) breaks ties: timestamps have whole seconds.
            rows = c.execute("SELECT id, name, role, created, revoked FROM tokens "
                             "ORDER BY created, rowid").fetchall()
        return [TokenInfo(*r) for r in rows]

    def count_active(self) -> int:
        """How many tokens are not revoked."""
        return sum(1 for t in self.list() if t.active)

    def revoke(self, ref: str) -> TokenInfo:
        """Revoke a token by id, or by name when exactly one active token has it."""
        with self._db(write=True) as c:
            rows = c.execute("SELECT id, name, role, created, revoked FROM tokens WHERE id = ?",
                             (ref,)).fetchall()
            if not rows:
                rows = c.execute("SELECT id, name, role, created, revoked FROM tokens "
                                 "WHERE name = ? AND revoked IS NULL", (ref,)).fetchall()
            if not rows:
                raise NotFoundError(f"no token with id or active name {ref!r}; see "
                                    "'hybridml-cloud tokens list'", field="token")
            if len(rows) > 1:
                ids = ", ".join(r[0] for r in rows)
                raise ConfigError(f"{len(rows)} active tokens are named {ref!r} ({ids}); "
                                  "revoke by id", field="token")
            info = TokenInfo(*rows[0])
            if info.active:
                info = TokenInfo(info.id, info.name, info.role, info.created, utc_iso())
                c.execute("UPDATE tokens SET revoked = ? WHERE id = ?", (info.revoked, info.id))
        log.info("revoked token %s (%s)", info.id, info.name)
        return info

    def authenticate(self, token: str) -> TokenInfo | None:
        """The active token matching ``token``, or None (malformed, unknown or revoked)."""
        m = _TOKEN_RE.fullmatch(token)
        if m is None:
            return None
        query = "SELECT id, name, role, created, revoked, sha256 FROM tokens WHERE id = ?"
        if self._pg is not None:
            rows = self._pg.query(query, (m.group(1),))
        else:
            rows = self._read_file(query, m.group(1))
        if not rows:
            return None
        row = rows[0]
        if not hmac.compare_digest(row[5], hash_token(token)) or row[4] is not None:
            return None
        return TokenInfo(*row[:5])

    def _read_file(self, query: str, ident: str) -> builtins.list[Any]:
        try:
            reader = self._reader()
            return [] if reader is None else reader.execute(query, (ident,)).fetchall()
        except sqlite3.Error:  # e.g. a file without the table yet: the creating path
            with self._db() as c:
                return c.execute(query, (ident,)).fetchall()  # type: ignore[no-any-return]

    def _reader(self) -> sqlite3.Connection | None:
        """This thread's read connection to the token file; None while there is no file.

        Reopened when the file is another one than last time (deleted and recreated, say:
        a connection to the old inode would keep honouring its tokens) or after a fork.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        ident = (st.st_dev, st.st_ino, os.getpid())
        local = self._local
        held: tuple[tuple[int, int, int], sqlite3.Connection] | None = getattr(
            local, "held", None)
        if held is not None:
            if held[0] == ident:
                return held[1]
            if held[0][2] == ident[2]:
                held[1].close()
            else:
                _ABANDONED.append(held[1])
            local.held = None
        conn = sqlite3.connect(f"{self.path.as_uri()}?mode=rw", uri=True, timeout=30.0,
                               isolation_level=None)
        local.held = (ident, conn)
        return conn
