"""``hybridml-cloud migrate``: schema upgrades on demand, and moving an embedded registry to a
fleet's backends, verified (docs/storage.md).

* ``migrate`` alone opens every store on the configured backends, which runs any pending
  schema upgrade (each store does so at open, under its write lock) and reports the versions.
* ``migrate --from DIR`` copies an embedded registry (SQLite files and ``<DIR>/blobs``) into the
  configured database and artifact store: every blob (sha256 checked on upload and read back),
  every row of the registry, token and telemetry stores (ids and arrival order kept), and the
  signing keys (sealed under ``$HYBRIDML_KEY_PASSPHRASE`` when they go to PostgreSQL). The
  target must hold no model yet. Each store's rows go in one transaction, so a failure leaves
  that store as it was; run it again after fixing the cause. It ends by comparing every table's
  row count and every manifest, and fails loudly on any difference. The source is only read
  (and upgraded to the current schema, which adds tables and keeps every row).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridml.shared.errors import ConfigError, RegistryError

from .registry import Registry
from .storage import Storage
from .telemetry import SqlTelemetry
from .tokens import TokenStore

log = logging.getLogger("hybridml.cloud.migrate")

# In dependency order; every column is copied as it is (ids included).
REGISTRY_TABLES = ("versions", "aliases", "blob_refs", "sequences", "policies", "decisions",
                   "rollouts", "rollout_events", "rollout_units", "audit")
TELEMETRY_TABLES = ("records", "summaries", "feedback", "events", "dropped", "counters")
TOKEN_TABLES = ("tokens",)
ID_TABLES = ("decisions", "rollouts", "rollout_events", "audit")  # identity keys to advance
ROWID_ORDER = ("feedback", "events", "tokens")  # copied in arrival order
COPY_CHUNK = 5000  # rows read and written at a time


@dataclass
class Report:
    """What ``migrate`` did: rows per table, blobs copied, keys moved, schema versions."""

    rows: dict[str, int] = field(default_factory=dict)
    blobs: int = 0
    blob_bytes: int = 0
    keys: int = 0
    schemas: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form (``migrate --json``)."""
        return {"rows": self.rows, "blobs": self.blobs, "blob_bytes": self.blob_bytes,
                "keys": self.keys, "schemas": self.schemas}


def upgrade(root: Path, storage: Storage) -> Report:
    """Open every store on ``storage`` (running pending upgrades); report their versions."""
    reg = Registry(root, storage=storage)
    _ensure_bucket(reg)
    telemetry = SqlTelemetry.open(reg)
    TokenStore(reg, storage).list()
    report = Report(schemas={"registry": reg.database.schema_version(),
                             "telemetry": telemetry.db.schema_version()})
    if storage.on_postgres:
        report.schemas["tokens"] = TokenStore(reg, storage).schema_version()
    return report


def migrate(source: Path, storage: Storage, *, cache: Path | None = None) -> Report:
    """Copy the embedded registry at ``source`` onto ``storage``; see the module docstring."""
    if storage.embedded:
        raise ConfigError("migrate --from needs a target: pass --db postgresql://... and/or "
                          "--artifacts s3://bucket/prefix", field="db")
    src = Registry(source, create=False)
    with tempfile.TemporaryDirectory(prefix="hybridml-migrate-") as tmp:
        dst = Registry(cache or Path(tmp), storage=storage)
        _ensure_bucket(dst)
        if dst.models():
            held = ", ".join(m.name for m in dst.models())
            raise ConfigError(f"the target already holds models ({held}): migrate into an "
                              "empty database", field="db")
        report = Report()
        for sha, _ in src.blobs.entries():
            got, size = dst.blobs.put(src.blobs.path(sha))
            if got != sha or dst.blobs.size(sha) != size:
                raise RegistryError(f"blob {sha} changed on its way to {storage.artifacts}: "
                                    "nothing was switched over; check the store", field="sha256")
            report.blobs += 1
            report.blob_bytes += size
        if storage.on_postgres:
            _copy(src.database, dst.database, REGISTRY_TABLES, report)
            _copy(SqlTelemetry.open(src).db, SqlTelemetry.open(dst).db, TELEMETRY_TABLES,
                  report)
            if TokenStore(src).path.exists():
                _copy(TokenStore(src).database, TokenStore(dst, storage).database,
                      TOKEN_TABLES, report)
            report.keys = _copy_keys(src, dst)
        _verify(src, dst, report)
        report.schemas = upgrade(cache or Path(tmp), storage).schemas
    log.info("migrated %s: %d blobs, %s", source, report.blobs, report.rows)
    return report


def _ensure_bucket(reg: Registry) -> None:
    """Create the S3 bucket if it is missing (here only: serving never creates one)."""
    create = getattr(reg.blobs, "create_bucket", None)
    if create is not None and create():
        log.info("created bucket for %s", reg.storage.artifacts)


def _copy(src: Any, dst: Any, tables: tuple[str, ...], report: Report) -> None:
    """Every row of ``tables`` from one store's database to another's, in one transaction."""
    with src.tx(write=False) as s, dst.tx(write=True, notify=True) as d:
        for table in tables:
            order = " ORDER BY rowid" if table in ROWID_ORDER else ""
            cur = s.execute(f"SELECT * FROM {table}{order}")
            columns = [c[0] for c in cur.description]
            names = ", ".join(f'"{c}"' for c in columns)  # "end" is a reserved word
            insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in columns)})"
            copied = 0
            while rows := cur.fetchmany(COPY_CHUNK):  # a big telemetry table never whole
                d.executemany(insert, rows)
                copied += len(rows)
            if table in ID_TABLES and dst.dialect == "postgresql":
                d.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                          f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")
            report.rows[table] = copied


def _copy_keys(src: Registry, dst: Registry) -> int:
    """Seal each file key of ``src`` into ``dst``'s database; the active one stays active."""
    from .signing import KeyRing

    ring, target = KeyRing(src.root), KeyRing(dst)
    active = ring.active_id()
    for info in ring.list():
        if info.has_private:
            target.adopt(ring.private_key(info.key_id), created=info.created)
    if active is not None:
        target.use(active)
    return len(ring.list())


def _verify(src: Registry, dst: Registry, report: Report) -> None:
    """Fail unless every model, version, manifest and alias arrived unchanged."""
    for model in src.models():
        for info in src.versions(model.name):
            if src.manifest(model.name, info.version) != dst.manifest(model.name, info.version):
                raise RegistryError(f"{model.name} v{info.version}: the manifest differs after "
                                    "the copy", field="versions")
        if src.aliases(model.name) != dst.aliases(model.name):
            raise RegistryError(f"{model.name}: the aliases differ after the copy",
                                field="aliases")
    for sha, _ in src.blobs.entries():
        if not dst.blobs.has(sha):
            raise RegistryError(f"blob {sha} is missing after the copy", field="sha256")
