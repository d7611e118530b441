"""The model registry: every version of every model, with its manifest, metadata and aliases.

Layout under the root::

    <root>/blobs/<sha256>   immutable content-addressed artifacts (:mod:`hybridml.cloud.blobs`)
    <root>/registry.db      SQLite: versions (manifest + metadata JSON), aliases, blob references
    <root>/cache/gzip/      gzip copies of large blobs, made once (:meth:`BlobStore.gzipped`)

Everything under the root is its owner's alone: directories 0700, files 0600, blobs 0400
(:mod:`hybridml.cloud.private`); opening a registry an older release made tightens it.

Several processes share one registry (gunicorn workers serve it while a cron job retrains), so:

* The database is a :class:`hybridml.cloud.database.Database`: per-thread and per-process
  connections, WAL, ``BEGIN IMMEDIATE`` writes, ``synchronous=FULL``. FULL matters here: with
  NORMAL a power cut may roll back the last commits, and the next training run would hand out
  the same version number again for a different model, while devices may already hold the lost
  one under that number.
* A crash mid-train never leaves a half-written version visible: blobs are stored (fsynced)
  first; the version row, its blob references and the first ``stable`` alias are then inserted
  in one transaction. Blobs orphaned by a crash are removed by :meth:`Registry.gc`.
* Serving resolves an alias on every request: :meth:`Registry.resolve_cached` answers from a
  per-thread memo that is dropped as soon as anything commits to the database — another
  process (SQLite's ``PRAGMA data_version``) or this object (its own write counter) — so a
  promote or rollback is seen by the next request of every worker.

Version references (``ref``) are an int, a digit string, an alias name (``"stable"``,
``"canary"``) or ``"latest"``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import (
    ConfigError,
    ConflictError,
    ManifestError,
    NotFoundError,
    RegistryError,
)
from hybridml.shared.manifest import (
    FORMAT,
    LINEAGES,
    Artifact,
    Manifest,
    canonical_json,
    check_name,
)

from .blobs import BlobBackend, BlobSource, check_sha, open_blobs
from .database import SqlConn, insert_id, open_database
from .private import private_dir, tighten_tree
from .storage import Storage

log = logging.getLogger("hybridml.cloud.registry")

ENV_VAR = "HYBRIDML_REGISTRY"
DEFAULT_ROOT = "registry"
DB_NAME = "registry.db"
GC_MIN_AGE_S = 3600.0
# 2: release sequences; 3: training policies and decisions; 4: rollouts; 5: the audit trail
# (was audit.jsonl) and signing keys (PostgreSQL) in the database
SCHEMA_VERSION = 5
STORE = "registry"
AUDIT_FILE = "audit.jsonl"  # before schema 5: imported once, then renamed *.imported
MODEL_ROLES = ("model", "model_fp32")
Ref = int | str

_ALIAS_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_MAX_VERSION = 2**62
_MEMO_MAX = 4096  # resolved (name, ref) pairs kept per thread; refs like "007" add variants
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS versions (
        name TEXT NOT NULL, version INTEGER NOT NULL CHECK (version >= 1),
        created TEXT NOT NULL, parent INTEGER, lineage TEXT NOT NULL, task TEXT NOT NULL,
        model_size INTEGER NOT NULL, metrics TEXT NOT NULL,
        manifest TEXT NOT NULL, metadata TEXT NOT NULL,
        PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS aliases (
        name TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, updated TEXT NOT NULL,
        PRIMARY KEY (name, alias),
        FOREIGN KEY (name, version) REFERENCES versions (name, version))""",
    """CREATE TABLE IF NOT EXISTS blob_refs (
        sha256 TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL,
        PRIMARY KEY (sha256, name, version),
        FOREIGN KEY (name, version) REFERENCES versions (name, version))""",
    # Schema 2. Per model, the release sequence signed into every served manifest: raised in
    # the same transaction as each change of what the model's references resolve to, never
    # lowered (see hybridml.shared.release). A model without a row is at 0.
    """CREATE TABLE IF NOT EXISTS sequences (
        name TEXT PRIMARY KEY, sequence INTEGER NOT NULL CHECK (sequence >= 0),
        updated TEXT NOT NULL)""",
    # Schema 3. Per model, the continuous-training policy (hybridml.cloud.policy, JSON), and
    # every evaluation of its triggers with the evidence, plus what the controller then did.
    """CREATE TABLE IF NOT EXISTS policies (
        name TEXT PRIMARY KEY, policy TEXT NOT NULL, updated TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, time TEXT NOT NULL,
        fired INTEGER NOT NULL, decision TEXT NOT NULL, outcome TEXT, candidate INTEGER)""",
    "CREATE INDEX IF NOT EXISTS decisions_by_name ON decisions (name, id)",
    # Schema 4. Rollouts (hybridml.cloud.rollouts, docs/rollouts.md §1): at most one running
    # per model (the partial unique index), every change audited, every unit's arm recorded.
    """CREATE TABLE IF NOT EXISTS rollouts (
        id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, strategy TEXT NOT NULL,
        state TEXT NOT NULL, stable INTEGER NOT NULL, candidate INTEGER, arms TEXT NOT NULL,
        config TEXT NOT NULL, step INTEGER, step_started REAL, started REAL NOT NULL,
        ended REAL, forced INTEGER NOT NULL DEFAULT 0, decision TEXT, memo TEXT)""",
    "CREATE UNIQUE INDEX IF NOT EXISTS one_running ON rollouts (name) WHERE state = 'running'",
    "CREATE INDEX IF NOT EXISTS rollouts_by_name ON rollouts (name, id)",
    """CREATE TABLE IF NOT EXISTS rollout_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, rollout INTEGER NOT NULL, time REAL NOT NULL,
        actor TEXT NOT NULL, action TEXT NOT NULL, from_state TEXT, to_state TEXT,
        step INTEGER, reason TEXT, evidence TEXT)""",
    "CREATE INDEX IF NOT EXISTS rollout_events_by_rollout ON rollout_events (rollout, id)",
    """CREATE TABLE IF NOT EXISTS rollout_units (
        rollout INTEGER NOT NULL, unit TEXT NOT NULL, arm TEXT NOT NULL, bucket INTEGER NOT NULL,
        first_seen REAL NOT NULL, last_seen REAL NOT NULL, candidate_since REAL,
        PRIMARY KEY (rollout, unit))""",
    # Schema 5. Every alias move (who, what, when), committed with the move itself; and, on
    # a fleet, the signing keys (hybridml.cloud.signing; private halves encrypted).
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT, time TEXT NOT NULL, name TEXT,
        alias TEXT, entry TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS audit_by_name ON audit (name, alias, id)",
    """CREATE TABLE IF NOT EXISTS signing_keys (
        key_id TEXT PRIMARY KEY, public_pem TEXT NOT NULL, private_pem TEXT,
        created TEXT NOT NULL, active INTEGER NOT NULL DEFAULT 0)""",
)


@dataclass(frozen=True)
class VersionInfo:
    """One row of :meth:`Registry.versions`: what a version is, without its whole manifest."""

    name: str
    version: int
    created: str
    parent: int | None
    lineage: str
    task: str
    metrics: dict[str, Any]
    model_size: int
    aliases: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out


@dataclass(frozen=True)
class ModelSummary:
    """One row of :meth:`Registry.models`."""

    name: str
    latest: int
    n_versions: int
    aliases: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class Served:
    """What the manifest endpoint needs, read in one transaction: the version a reference
    resolves to, its manifest text and the model's release sequence."""

    name: str
    version: int
    sequence: int
    manifest: str

    @property
    def etag(self) -> str:
        """sha256 hex of the canonical manifest text (the registry's own copy)."""
        return hashlib.sha256(self.manifest.encode("utf-8")).hexdigest()


class Registry:
    """Versions, manifests, metadata, aliases and blobs of every model; safe across processes.

    ``Registry(root)`` creates the layout if needed (``create=False`` raises NotFoundError
    instead). One object may be shared by threads and survives ``fork`` (e.g. gunicorn
    ``--preload``); each thread and process opens its own connection on first use.
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True,
                 storage: Storage | None = None) -> None:
        # Absolute: Flask resolves relative file paths against the package, not the cwd.
        self.root = Path(root).expanduser().resolve()
        self.storage = storage or Storage()
        self.db_path = self.root / DB_NAME
        self.gzip_cache = self.root / "cache" / "gzip"  # derived copies, dropped with the blob
        if not self.storage.on_postgres and not create and not self.db_path.exists():
            raise NotFoundError(
                f"no registry at {self.root} (no {DB_NAME}): pass create=True, or point "
                f"${ENV_VAR} at an existing registry", field="root")
        if not self.root.exists():
            private_dir(self.root)
        tighten_tree(self.root)  # 0700/0600, also for a registry an older release created
        self.blobs: BlobBackend = open_blobs(self.storage, self.root)
        self._db = open_database(self.storage, self.root, STORE, create=create, schema=_SCHEMA,
                                 version=SCHEMA_VERSION, error=RegistryError)
        if not self.storage.on_postgres:
            self._import_audit_file()
        # Bumped after each write through this object: SQLite's data_version does not change
        # for a connection's own commits, and this thread may be the one that promoted.
        self._writes = itertools.count()
        self._write_stamp = 0
        self._memo = threading.local()

    @classmethod
    def from_env(cls, path: str | os.PathLike[str] | None = None, *,
                 create: bool = True, storage: Storage | None = None) -> Registry:
        """Open ``path``, else ``$HYBRIDML_REGISTRY``, else ``./registry``; on ``storage``,
        else the backends ``$HYBRIDML_DB`` and ``$HYBRIDML_ARTIFACTS`` name (docs/storage.md)."""
        return cls(path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_ROOT,
                   create=create, storage=storage or Storage.from_env())

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    def close(self) -> None:
        """Close this thread's database connection."""
        self._db.close()

    # ------------------------------------------------------------------------------ blobs
    def put_blob(self, data: BlobSource) -> tuple[str, int]:
        """Store bytes, or stream a file given as a path; return ``(sha256, size)``.

        Idempotent; a stored blob whose content differs from its name is a ConflictError.
        """
        return self.blobs.put(data)

    def blob_path(self, sha256: str) -> Path:
        """Return the file of blob ``sha256``; NotFoundError if malformed or absent."""
        return self.blobs.path(sha256)

    def model_path(self, manifest: Mapping[str, Any]) -> Path:
        """Return the file of a version's shipped model (its ``model`` artifact)."""
        art = next((a for a in manifest["artifacts"] if a["role"] == "model"), None)
        if art is None:
            raise NotFoundError(f"{manifest.get('name')} v{manifest.get('version')} has no "
                                "model artifact; re-register the version", field="artifacts")
        return self.blob_path(str(art["sha256"]))

    def has_blob(self, sha256: str) -> bool:
        """Return True if blob ``sha256`` is stored (False for malformed names)."""
        return self.blobs.has(sha256)

    # --------------------------------------------------------------------------- versions
    def create_version(self, name: str, manifest: Mapping[str, Any], metadata: Mapping[str, Any],
                       *, parent: int | None = None, lineage: str = "retrain") -> dict[str, Any]:
        """Register the next version of ``name`` atomically; return the stored manifest.

        Fills ``name``, ``version``, ``parent``, ``lineage``, ``created`` and ``format`` in a
        copy of ``manifest`` (the caller's dict is not modified), checks every artifact's blob
        is stored with the promised size (RegistryError otherwise, nothing written) and
        validates the result (ManifestError). The first version of a model becomes ``stable``.
        """
        name = _valid_name(name)
        if lineage not in LINEAGES:
            raise ManifestError(f"lineage {lineage!r} is not one of {LINEAGES}", field="lineage")
        if parent is not None and (isinstance(parent, bool) or not isinstance(parent, int)
                                   or parent < 1):
            raise ManifestError(f"parent must be a version number or None, got {parent!r}",
                                field="parent")
        doc = _json_copy(manifest, "manifest", ManifestError)
        meta = _json_copy(metadata, "metadata", RegistryError)
        with self._tx(write=True) as c:
            if parent is not None:
                self._resolve(c, name, parent)
            version = c.execute("SELECT COALESCE(MAX(version), 0) + 1 FROM versions "
                                "WHERE name = ?", (name,)).fetchone()[0]
            doc.update(name=name, version=version, parent=parent, lineage=lineage,
                       created=utc_iso(), format=FORMAT)
            parsed = Manifest.from_json(doc)
            self._check_blobs(parsed.artifacts)
            text = canonical_json(doc).decode("utf-8")
            model = parsed.artifact("model")
            metrics = doc.get("metrics") if isinstance(doc.get("metrics"), dict) else {}
            c.execute(
                "INSERT INTO versions (name, version, created, parent, lineage, task, "
                "model_size, metrics, manifest, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, doc["created"], parent, lineage, parsed.task,
                 model.size if model else 0, canonical_json(metrics).decode("utf-8"), text,
                 canonical_json(meta).decode("utf-8")))
            _index_refs(c, name, version, (doc, meta))
            c.execute("INSERT INTO aliases (name, alias, version, updated) VALUES "
                      "(?, 'stable', ?, ?) ON CONFLICT (name, alias) DO NOTHING",
                      (name, version, utc_iso()))
            _bump_sequence(c, name)  # 'latest' (and a first 'stable') now resolve anew
        log.info("registered %s version %d (%s, parent %s)", name, version, lineage, parent)
        return json.loads(text)  # type: ignore[no-any-return]

    def manifest(self, name: str, ref: Ref = "stable") -> dict[str, Any]:
        """Return the manifest of version ``ref`` of ``name``."""
        return json.loads(self._column(name, ref, "manifest"))  # type: ignore[no-any-return]

    def metadata(self, name: str, ref: Ref = "stable") -> dict[str, Any]:
        """Return the cloud-only metadata (params, pickle and data sha, ...) of a version."""
        return json.loads(self._column(name, ref, "metadata"))  # type: ignore[no-any-return]

    def manifest_etag(self, name: str, ref: Ref = "stable") -> str:
        """Return a strong ETag (unquoted): sha256 hex of the canonical manifest bytes."""
        return hashlib.sha256(self._column(name, ref, "manifest").encode("utf-8")).hexdigest()

    def served(self, name: str, ref: Ref = "stable") -> Served:
        """The version ``ref`` resolves to, its manifest and the model's sequence, at once."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            version = self._resolve(c, name, ref)
            text = c.execute("SELECT manifest FROM versions WHERE name = ? AND version = ?",
                             (name, version)).fetchone()[0]
            return Served(name, version, _sequence(c, name), str(text))

    def sequence(self, name: str) -> int:
        """The release sequence of ``name`` (0 before its first change under schema 2)."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            self._resolve(c, name, "latest")  # NotFoundError for an unknown model
            return _sequence(c, name)

    def resolve(self, name: str, ref: Ref = "stable") -> int:
        """Return the version number ``ref`` points at; NotFoundError lists what exists."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            return self._resolve(c, name, ref)

    def resolve_cached(self, name: str, ref: Ref = "stable") -> int:
        """:meth:`resolve`, answered from a per-thread memo while the database is unchanged.

        The memo is dropped when any connection — another thread, process or this object —
        has committed since it was filled, so a promote, rollback or new version is seen by
        the next call anywhere. A check costs one ``PRAGMA data_version`` instead of a
        transaction with a lookup. Failures are not remembered.
        """
        return int(self._memoized("resolve", name, ref, self.resolve))

    def served_cached(self, name: str, ref: Ref = "stable") -> Served:
        """:meth:`served` from the same per-thread memo as :meth:`resolve_cached`: a device's
        conditional sync then costs no database round trip while nothing has changed (every
        write that changes what a reference serves also moves the stamp)."""
        found: Served = self._memoized("served", name, ref, self.served)
        return found

    def _memoized(self, kind: str, name: str, ref: Ref, compute: Any) -> Any:
        memo = self._memo
        # Outside a transaction: the pragma is then one read transaction of its own, at a
        # third of the cost of BEGIN/pragma/COMMIT (PostgreSQL: a counter, no round trip).
        data_version = self._db.stamp()
        if data_version is None:
            return compute(name, ref)  # which says what failed, as a RegistryError
        stamp = (data_version, self._write_stamp)
        cache: dict[tuple[str, str, type, Ref], Any] | None = getattr(memo, "cache", None)
        if cache is None or memo.stamp != stamp or len(cache) >= _MEMO_MAX:
            cache = memo.cache = {}
            memo.stamp = stamp
        # The type is part of the key: True == 1 as a dict key, but True is no version.
        key = (kind, name, type(ref), ref)
        value = cache.get(key)
        if value is None:
            value = cache[key] = compute(name, ref)
        return value

    def versions(self, name: str) -> list[VersionInfo]:
        """Return every version of ``name``, oldest first."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            rows = c.execute("SELECT version, created, parent, lineage, task, metrics, "
                             "model_size FROM versions WHERE name = ? ORDER BY version",
                             (name,)).fetchall()
            if not rows:
                raise self._not_found(c, name, f"model {name!r}")
            by_version: dict[int, list[str]] = {}
            for alias, v in c.execute("SELECT alias, version FROM aliases WHERE name = ? "
                                      "ORDER BY alias", (name,)):
                by_version.setdefault(v, []).append(alias)
        return [VersionInfo(name, v, created, parent, lineage, task, json.loads(metrics), size,
                            tuple(by_version.get(v, ())))
                for v, created, parent, lineage, task, metrics, size in rows]

    def models(self) -> list[ModelSummary]:
        """Return one summary per model, sorted by name."""
        with self._tx(write=False) as c:
            rows = c.execute("SELECT name, MAX(version), COUNT(*) FROM versions GROUP BY name "
                             "ORDER BY name").fetchall()
            aliases: dict[str, dict[str, int]] = {}
            for name, alias, v in c.execute("SELECT name, alias, version FROM aliases "
                                            "ORDER BY name, alias"):
                aliases.setdefault(name, {})[alias] = v
        return [ModelSummary(name, latest, n, aliases.get(name, {})) for name, latest, n in rows]

    # ------------------------------------------------------------ policies and decisions
    def set_policy(self, name: str, policy: Mapping[str, Any]) -> None:
        """Store the training policy of ``name`` (a JSON object), replacing the last one."""
        name = lookup_name(name)
        doc = canonical_json(_json_copy(policy, "policy", RegistryError)).decode("utf-8")
        with self._tx(write=True) as c:
            self._resolve(c, name, "latest")  # NotFoundError for an unknown model
            c.execute("INSERT INTO policies (name, policy, updated) VALUES (?, ?, ?) "
                      "ON CONFLICT (name) DO UPDATE SET policy = excluded.policy, "
                      "updated = excluded.updated", (name, doc, utc_iso()))
        log.info("policy of %s set", name)

    def policies(self) -> dict[str, dict[str, Any]]:
        """``{name: policy}`` of every model that has one."""
        with self._tx(write=False) as c:
            rows = c.execute("SELECT name, policy FROM policies ORDER BY name").fetchall()
        return {name: json.loads(text) for name, text in rows}

    def add_decision(self, name: str, decision: Mapping[str, Any]) -> int:
        """Record one evaluation of ``name``'s triggers (with ``time`` and ``fired``); returns
        its id, for :meth:`finish_decision`."""
        name = lookup_name(name)
        doc = _json_copy(decision, "decision", RegistryError)
        with self._tx(write=True) as c:
            return insert_id(c, "INSERT INTO decisions (name, time, fired, decision) "
                             "VALUES (?, ?, ?, ?)", (name, str(doc.get("time") or utc_iso()),
                                                     int(bool(doc.get("fired"))),
                                                     canonical_json(doc).decode("utf-8")))

    def prune_decisions(self, name: str, before: str) -> int:
        """Delete ``name``'s decisions that did not fire, recorded before ``before`` (ISO
        time); returns how many. Fired ones — each trained a candidate, or says why not —
        are kept: they are the model's history. The quiet ones are a controller pass each
        (1,440 a day at one a minute) and only say nothing happened."""
        name = lookup_name(name)
        with self._tx(write=True) as c:
            gone = c.execute("DELETE FROM decisions WHERE name = ? AND fired = 0 AND time < ?",
                             (name, before))
            return int(gone.rowcount)

    def finish_decision(self, decision_id: int, outcome: Mapping[str, Any]) -> None:
        """Record what followed decision ``decision_id``: the candidate version, or why none."""
        doc = _json_copy(outcome, "outcome", RegistryError)
        candidate = doc.get("candidate")
        with self._tx(write=True) as c:
            done = c.execute("UPDATE decisions SET outcome = ?, candidate = ? WHERE id = ?",
                             (canonical_json(doc).decode("utf-8"),
                              candidate if isinstance(candidate, int) else None, decision_id))
            if done.rowcount == 0:
                raise NotFoundError(f"no decision {decision_id}", field="decision")

    def decisions(self, name: str, *, limit: int | None = None, fired_only: bool = False
                  ) -> list[dict[str, Any]]:
        """Recorded decisions of ``name``, newest first: each decision with its ``id`` and its
        ``outcome`` (None while the controller is still acting on it, or if it stopped)."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            rows = c.execute("SELECT id, decision, outcome FROM decisions WHERE name = ? AND "
                             "fired >= ? ORDER BY id DESC"
                             + ("" if limit is None else f" LIMIT {max(0, int(limit))}"),
                             (name, int(fired_only))).fetchall()
        return [{**json.loads(d), "id": i, "outcome": json.loads(o) if o else None}
                for i, d, o in rows]

    # ---------------------------------------------------------------------------- aliases
    def set_alias(self, name: str, alias: str, ref: Ref, *,
                  audit: Mapping[str, Any] | None = None) -> int:
        """Point ``alias`` of ``name`` at version ``ref`` (this is how a version is promoted).

        ``ref`` may itself be an alias (``set_alias("eta", "stable", "canary")``); returns the
        version number the alias now points at. With ``audit`` (``action``, ``by``, ...), the
        move is recorded in the audit trail (:meth:`audit`) in the same transaction, with
        ``name``, ``alias``, ``from``, ``to`` and ``time`` filled in: a move is never
        committed without its record, nor a record without its move.
        """
        return self._set_alias(name, alias, ref, audit)[0]

    def _set_alias(self, name: str, alias: str, ref: Ref, audit: Mapping[str, Any] | None
                   ) -> tuple[int, int | None]:
        name, alias = lookup_name(name), _check_alias(alias)
        with self._tx(write=True) as c:
            version = self._resolve(c, name, ref)
            row = c.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                            (name, alias)).fetchone()
            before = None if row is None else int(row[0])
            c.execute("INSERT INTO aliases (name, alias, version, updated) VALUES (?, ?, ?, ?) "
                      "ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, "
                      "updated = excluded.updated", (name, alias, version, utc_iso()))
            _bump_sequence(c, name)
            if audit is not None:
                _audit(c, {**_json_copy(audit, "audit", RegistryError), "name": name,
                           "alias": alias, "from": before, "to": version, "time": utc_iso()})
        log.info("alias %s/%s: %s -> %d", name, alias, before, version)
        return version, before

    def move_alias(self, name: str, alias: str, ref: Ref, *, audit: Mapping[str, Any]
                   ) -> tuple[int, int | None]:
        """:meth:`set_alias` with its audit record; returns (new, previous) versions."""
        return self._set_alias(name, alias, ref, audit)

    # ------------------------------------------------------------------------ audit trail
    def add_audit(self, entry: Mapping[str, Any]) -> None:
        """Record one action that is not an alias move (the entry's ``name`` and ``alias``,
        if any, index it)."""
        doc = _json_copy(entry, "audit", RegistryError)
        doc.setdefault("time", utc_iso())
        with self._tx(write=True, invalidates=False) as c:
            _audit(c, doc)

    def audit(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every recorded action (of model ``name``), oldest first."""
        sql = "SELECT entry FROM audit"
        args: tuple[Any, ...] = ()
        if name is not None:
            sql, args = sql + " WHERE name = ?", (name,)
        with self._tx(write=False) as c:
            return [json.loads(text) for (text,) in c.execute(sql + " ORDER BY id", args)]

    def _import_audit_file(self) -> None:
        """Move a pre-schema-5 ``audit.jsonl`` into the audit table, once (torn lines are
        skipped, as the file's reader always did); the file is kept as ``*.imported``."""
        path = self.root / AUDIT_FILE
        if not path.is_file():
            return
        entries = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        with self._tx(write=True, invalidates=False) as c:
            if not path.is_file():  # another process imported it first
                return
            for entry in entries:
                _audit(c, entry)
            path.rename(path.with_name(AUDIT_FILE + ".imported"))  # kept, never read again
        log.info("imported %d audit entries from %s", len(entries), path)

    def aliases(self, name: str) -> dict[str, int]:
        """Return ``{alias: version}`` for ``name``."""
        name = lookup_name(name)
        with self._tx(write=False) as c:
            self._resolve(c, name, "latest")  # NotFoundError for an unknown model
            rows = c.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias",
                             (name,)).fetchall()
        return dict(rows)

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` of ``name`` (NotFoundError if it does not exist)."""
        name, alias = lookup_name(name), _check_alias(alias)
        with self._tx(write=True) as c:
            gone = c.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            if gone.rowcount == 0:
                raise self._not_found(c, name, f"alias {alias!r} of model {name!r}")
            _bump_sequence(c, name)
        log.info("alias %s/%s deleted", name, alias)

    # -------------------------------------------------------------------------- artifacts
    def attach_artifact(self, name: str, ref: Ref, artifact: Mapping[str, Any]) -> dict[str, Any]:
        """Add, or replace by role, a non-model artifact (e.g. a ``table``) of a version.

        The blob must be stored. Roles ``model`` and ``model_fp32`` are fixed at creation
        (ConflictError), except that re-attaching an identical entry is a no-op. Returns the
        new manifest; its ETag changes with it.
        """
        name = lookup_name(name)
        entry = _json_copy(artifact, "artifact", ManifestError)
        art = Artifact.from_json(entry)
        entry.update(art.to_json())
        with self._tx(write=True) as c:
            version = self._resolve(c, name, ref)
            text, meta = c.execute("SELECT manifest, metadata FROM versions WHERE name = ? "
                                   "AND version = ?", (name, version)).fetchone()
            doc = json.loads(text)
            entries: list[dict[str, Any]] = doc["artifacts"]
            index = next((i for i, e in enumerate(entries) if e.get("role") == art.role), None)
            if index is not None and entries[index] == entry:
                return doc  # type: ignore[no-any-return]
            if art.role in MODEL_ROLES:
                raise ConflictError(
                    f"version {version} of {name!r}: the {art.role!r} artifact is fixed when a "
                    "version is created; register a new version to ship a different model",
                    field="role")
            self._check_blobs([art])
            if index is None:
                entries.append(entry)
            else:
                entries[index] = entry
            Manifest.from_json(doc)
            text = canonical_json(doc).decode("utf-8")
            c.execute("UPDATE versions SET manifest = ? WHERE name = ? AND version = ?",
                      (text, name, version))
            c.execute("DELETE FROM blob_refs WHERE name = ? AND version = ?", (name, version))
            _index_refs(c, name, version, (doc, json.loads(meta)))
            _bump_sequence(c, name)  # a device must prefer this manifest to the one before
        log.info("attached %s %s to %s version %d", art.role, art.sha256[:12], name, version)
        return json.loads(text)  # type: ignore[no-any-return]

    def gc(self, *, min_age_seconds: float = GC_MIN_AGE_S) -> int:
        """Delete unreferenced blobs, crash leftovers and orphaned training CSVs older than
        ``min_age_seconds``.

        A blob is kept while any version's manifest or metadata mentions its sha256. The age
        limit protects a training run that has stored its blobs but not yet registered its
        version; it runs under the write lock, so it cannot race a ``create_version``.
        Returns how many files were removed.
        """
        with self._tx(write=True) as c:
            keep = {row[0] for row in c.execute("SELECT DISTINCT sha256 FROM blob_refs")}
            now = time.time()
            doomed = [sha for sha, mtime in self.blobs.entries()
                      if sha not in keep and now - mtime >= min_age_seconds]
            removed = self.blobs.delete(doomed)
        for sha in doomed:  # a deleted blob's gzip copy (and its lock and marker) go too
            for suffix in (".gz", ".raw", ".lock"):
                (self.gzip_cache / f"{sha}{suffix}").unlink(missing_ok=True)
        removed += self.blobs.sweep(min_age_seconds)
        removed += self._gc_training(min_age_seconds)
        log.info("gc removed %d files from %s", removed, self.root)
        return removed

    def _gc_training(self, min_age_seconds: float) -> int:
        """Delete the controller's training CSVs (``<root>/training/<name>/*.csv``) that no
        version names as its ``training.source`` — a candidate that failed to train or
        register — once older than ``min_age_seconds`` (a controller may be training on a
        younger one now). Named ones stay: a retrain reads its line's source again."""
        folder = self.root / "training"
        if not folder.is_dir():
            return 0
        with self._tx(write=False) as c:
            sources = [json.loads(text).get("training", {}).get("source")
                       for (text,) in c.execute("SELECT manifest FROM versions")]
        keep = {str(Path(s).resolve()) for s in sources if isinstance(s, str)}
        now, removed = time.time(), 0
        for path in folder.glob("*/*.csv"):
            try:
                old = now - path.stat().st_mtime >= min_age_seconds
            except FileNotFoundError:
                continue
            if old and str(path.resolve()) not in keep:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # ------------------------------------------------------------ for other cloud stores
    @contextlib.contextmanager
    def transaction(self, *, write: bool = True, invalidates: bool = True
                    ) -> Iterator[Any]:
        """One transaction on the registry database, for stores that keep their tables in it
        (:mod:`hybridml.cloud.rollouts`). A write takes the lock up front (``BEGIN
        IMMEDIATE``); with ``invalidates`` (the default) it also drops this object's resolve
        memos and every :meth:`stamp` taken before it, as the registry's own writes do.
        Pass ``invalidates=False`` for bookkeeping that changes no answer (a unit seen).
        Change what a model's references serve? Call :func:`bump_sequence` inside."""
        with self._tx(write=write, invalidates=invalidates) as c:
            yield c

    def stamp(self) -> tuple[int, int] | None:
        """A value that changes whenever anything commits to the database (another
        connection: SQLite's ``data_version``, or another replica's NOTIFY on PostgreSQL;
        this object: its own write counter). Per thread, as :meth:`resolve_cached` uses it;
        None when changes cannot be known (then cache nothing)."""
        seen = self._db.stamp()
        return None if seen is None else (seen, self._write_stamp)

    @property
    def database(self) -> Any:
        """The registry's :class:`~hybridml.cloud.database.Store` (for ``migrate``)."""
        return self._db

    # ---------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _tx(self, *, write: bool, invalidates: bool = True) -> Iterator[Any]:
        """A transaction; after an invalidating write, the stamp that invalidates resolve
        memos moves (here at once; on other replicas by NOTIFY, at COMMIT)."""
        if not write or not invalidates:
            with self._db.tx(write=write) as c:
                yield c
            return
        try:
            with self._db.tx(write=True, notify=True) as c:
                yield c
        finally:
            self._write_stamp = next(self._writes) + 1

    def _column(self, name: str, ref: Ref, column: str) -> str:
        name = lookup_name(name)
        with self._tx(write=False) as c:
            version = self._resolve(c, name, ref)
            row = c.execute(f"SELECT {column} FROM versions WHERE name = ? AND version = ?",
                            (name, version)).fetchone()
        return str(row[0])

    def _resolve(self, c: SqlConn, name: str, ref: Ref) -> int:
        if (isinstance(ref, int) and not isinstance(ref, bool)) or (
                isinstance(ref, str) and _DIGITS_RE.fullmatch(ref)):
            version = int(ref)
            if 1 <= version <= _MAX_VERSION and c.execute(
                    "SELECT 1 FROM versions WHERE name = ? AND version = ?",
                    (name, version)).fetchone():
                return version
            raise self._not_found(c, name, f"version {version} of model {name!r}")
        if ref == "latest":
            row = c.execute("SELECT MAX(version) FROM versions WHERE name = ?",
                            (name,)).fetchone()
            if row[0] is None:
                raise self._not_found(c, name, f"model {name!r}")
            return int(row[0])
        if isinstance(ref, str) and _ALIAS_RE.fullmatch(ref):
            row = c.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?",
                            (name, ref)).fetchone()
            if row is None:
                raise self._not_found(c, name, f"alias {ref!r} of model {name!r}")
            return int(row[0])
        raise NotFoundError(f"{ref!r} is not a version reference: use a version number, an "
                            "alias such as 'stable', or 'latest'", field="ref")

    def _not_found(self, c: SqlConn, name: str, what: str) -> NotFoundError:
        versions = [r[0] for r in c.execute(
            "SELECT version FROM versions WHERE name = ? ORDER BY version", (name,))]
        if not versions:
            names = [r[0] for r in c.execute("SELECT DISTINCT name FROM versions ORDER BY name")]
            held = (f"models: {', '.join(names)}" if names
                    else "the registry is empty: train and register a model first")
            return NotFoundError(f"no model {name!r} in the registry; {held}", field="name")
        aliases = c.execute("SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias",
                            (name,)).fetchall()
        listed = ", ".join(f"{a}->{v}" for a, v in aliases) or "none"
        return NotFoundError(
            f"{what} not found: model {name!r} has versions {_ranges(versions)} and aliases "
            f"{listed}; use one of those, or 'latest'", field="ref")

    def _check_blobs(self, artifacts: Iterable[Artifact]) -> None:
        for art in artifacts:
            if not self.blobs.has(art.sha256):
                raise RegistryError(
                    f"artifact {art.role!r} refers to blob {art.sha256}, which is not in the "
                    "registry: put_blob() it first (nothing was written)", field="artifacts")
            size = self.blobs.size(art.sha256)
            if size != art.size:
                raise RegistryError(
                    f"artifact {art.role!r} says size {art.size} but blob {art.sha256} has "
                    f"{size} bytes: use the size put_blob() returned", field="artifacts")


def _valid_name(name: object) -> str:
    """Check a model name being written; ManifestError (from ``check_name``) if invalid."""
    return check_name(name)  # type: ignore[arg-type]


def lookup_name(name: object) -> str:
    """Check a model name being read: a name no model can have is simply not found (404,
    :class:`NotFoundError` naming ``name``)."""
    try:
        return _valid_name(name)
    except ManifestError as exc:
        raise NotFoundError(f"no model can exist under {name!r}: {exc.message}",
                            field="name") from exc


def _check_alias(alias: object) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias) or alias == "latest":
        raise ConfigError(
            f"invalid alias {alias!r}: use a lowercase word of up to 32 letters, digits or '_' "
            "starting with a letter (e.g. 'stable', 'canary'); 'latest' is reserved",
            field="alias")
    return alias


def _json_copy(value: object, what: str, error: type[RegistryError] | type[ManifestError]
               ) -> dict[str, Any]:
    """Deep-copy a JSON object, refusing what JSON cannot hold (NaN, numpy scalars, ...)."""
    if not isinstance(value, Mapping):
        raise error(f"{what} must be a JSON object (a dict), got {type(value).__name__}",
                    field=what)
    try:
        return json.loads(canonical_json(value))  # type: ignore[no-any-return]
    except (TypeError, ValueError) as exc:
        raise error(f"{what} is not valid JSON: {exc}; convert numpy values with float() or "
                    ".tolist() and replace NaN/inf", field=what) from exc


def _sequence(c: SqlConn, name: str) -> int:
    row = c.execute("SELECT sequence FROM sequences WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def bump_sequence(c: SqlConn, name: str) -> int:
    """Raise ``name``'s release sequence by one inside the caller's write transaction
    (:meth:`Registry.transaction`); returns the new sequence."""
    c.execute("INSERT INTO sequences (name, sequence, updated) VALUES (?, 1, ?) "
              "ON CONFLICT (name) DO UPDATE SET sequence = sequences.sequence + 1, "
              "updated = excluded.updated", (name, utc_iso()))
    return _sequence(c, name)


_bump_sequence = bump_sequence  # the name the registry's own writes use


def sequence_of(c: SqlConn, name: str) -> int:
    """``name``'s release sequence, read inside the caller's transaction."""
    return _sequence(c, name)


def _index_refs(c: SqlConn, name: str, version: int,
                docs: Iterable[object]) -> None:
    """Record every sha256 a version mentions, so gc keeps those blobs (metadata included)."""
    found: set[str] = set()
    stack = list(docs)
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if _SHA_RE.fullmatch(v):
                found.add(check_sha(v))
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    c.executemany("INSERT INTO blob_refs (sha256, name, version) VALUES (?, ?, ?) "
                  "ON CONFLICT DO NOTHING", [(sha, name, version) for sha in sorted(found)])


def _audit(c: SqlConn, entry: Mapping[str, Any]) -> None:
    """Append one audit record inside the caller's write transaction."""
    name, alias = entry.get("name"), entry.get("alias")
    c.execute("INSERT INTO audit (time, name, alias, entry) VALUES (?, ?, ?, ?)",
              (str(entry.get("time") or utc_iso()), name if isinstance(name, str) else None,
               alias if isinstance(alias, str) else None,
               json.dumps(dict(entry), sort_keys=True)))


def _ranges(values: list[int]) -> str:
    """Render sorted ints compactly: [1, 2, 3, 5] -> '1-3, 5'."""
    parts: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(parts)
