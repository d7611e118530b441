"""The telemetry store: what devices reported, in ``<registry>/telemetry.db``.

::

    TelemetryStore          the API the cloud uses (HTTP ingest, monitor, triggers, /metrics):
      │                     checks records (hybridml.cloud.ingest), computes drift and
      │                     performance (hybridml.shared.drift, hybridml.cloud.performance)
      └── SqlTelemetry   every SQL statement; a PostgreSQL backend implements the same
                            nine methods (TelemetryBackend)

Idempotency: every record is keyed by (device, record id) in one ledger; a record already
there is a *duplicate* and changes nothing, so a device retrying an upload whose answer it
lost never counts twice. A device is the name of the token that sent the record (or, on a
server without tokens, the store id in the record id).

Time: a summary belongs to the moment its window ends (``since < end <= until``), so a
period never counts a summary twice; feedback is placed at its ``created`` time (else when it
arrived) for performance, and selected by arrival for ``labelled_*`` ("what arrived since the
last training"). ``since``/``until`` take ISO 8601 text or POSIX seconds.

Feedback and metrics: a device's feedback carries the ``prediction`` and ``version`` it
judges, so the cloud computes realised metrics per version without raw inputs. Feedback that
has only a ``prediction_id`` is joined to a ``sample`` record whose body names that
``prediction_id`` with its ``prediction`` and ``version``; otherwise it cannot be scored and
is left out of performance (the edge's reservoir samples — rows without ids — are kept as
events, not joined). Feedback with ``features`` is also a labelled training row, fingerprinted
(sha256 of its canonical JSON) like training data. Alerts, health records and samples are
kept as sent (``events``), and so are a rollout's ``shadow`` and ``interleave`` records
(checked by :mod:`hybridml.cloud.ingest_rollout`; docs/rollouts.md §4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import HybridMLError, RegistryError

from . import fleet, performance
from .database import Store, open_database
from .facts import Facts, FactsCache
from .ingest import (
    Feedback,
    Record,
    Summary,
    check_feedback_item,
    check_record,
    device_of,
    parse_time,
    refusal,
)
from .registry import Registry

log = logging.getLogger("hybridml.cloud.telemetry")

DB_NAME = "telemetry.db"
STORE = "telemetry"
ROWID_TABLES = ("feedback", "events")  # read in arrival order
SCHEMA_VERSION = 2  # 2: events by kind (rollouts read shadow, interleave, health records)
ANONYMOUS = "anonymous"  # the device of a record without a store id, on a server without tokens
_SCHEMA = (  # every statement IF NOT EXISTS: an older file upgrades by running them all
    "CREATE TABLE IF NOT EXISTS records (device TEXT NOT NULL, id TEXT NOT NULL, "
    "kind TEXT NOT NULL, received REAL NOT NULL, PRIMARY KEY (device, id)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS summaries (device TEXT NOT NULL, id TEXT NOT NULL, "
    "model TEXT NOT NULL, version INTEGER NOT NULL, start REAL NOT NULL, \"end\" REAL NOT NULL, "
    "rows INTEGER NOT NULL, body TEXT NOT NULL, received REAL NOT NULL, "
    "PRIMARY KEY (device, id))",
    "CREATE INDEX IF NOT EXISTS summaries_by_end ON summaries (model, version, \"end\")",
    "CREATE TABLE IF NOT EXISTS feedback (device TEXT NOT NULL, id TEXT NOT NULL, "
    "model TEXT NOT NULL, version INTEGER, prediction_id TEXT, prediction TEXT, "
    "label TEXT NOT NULL, features TEXT, sha256 TEXT, at REAL NOT NULL, "
    "received REAL NOT NULL, PRIMARY KEY (device, id))",
    "CREATE INDEX IF NOT EXISTS feedback_by_received ON feedback (model, received)",
    "CREATE TABLE IF NOT EXISTS events (device TEXT NOT NULL, id TEXT NOT NULL, "
    "kind TEXT NOT NULL, model TEXT, prediction_id TEXT, created REAL, body TEXT NOT NULL, "
    "received REAL NOT NULL, PRIMARY KEY (device, id))",
    "CREATE INDEX IF NOT EXISTS events_by_prediction ON events (model, prediction_id)",
    "CREATE TABLE IF NOT EXISTS dropped (device TEXT NOT NULL, batch TEXT NOT NULL, "
    "kind TEXT NOT NULL, count INTEGER NOT NULL, received REAL NOT NULL, "
    "PRIMARY KEY (device, batch, kind))",
    "CREATE TABLE IF NOT EXISTS counters (name TEXT NOT NULL, label TEXT NOT NULL, "
    "value INTEGER NOT NULL, PRIMARY KEY (name, label))",
    # Schema 2: the rollout queries read events by kind (shadow, interleave, health).
    "CREATE INDEX IF NOT EXISTS events_by_kind ON events (model, kind, received)",
)


class TelemetryError(RegistryError):
    """The telemetry database failed (a storage error, not bad input)."""

    code = "telemetry"


@dataclass
class IngestResult:
    """The answer to an upload: ids stored now, ids stored before, records refused."""

    accepted: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """``{"accepted": [...], "duplicates": [...], "refused": [{"id", "error", ...}]}``."""
        return {"accepted": self.accepted, "duplicates": self.duplicates,
                "refused": self.refused}


@dataclass(frozen=True)
class FeedbackRow:
    """One stored label, with the prediction it judges when known."""

    version: int | None
    prediction: Any
    label: Any
    at: float
    features: dict[str, Any] | None
    sha256: str | None
    device: str | None = None  # who sent it (rollouts judge arms by device)


Period = tuple[float | None, float | None]  # (since, until) in POSIX seconds


class TelemetryBackend(Protocol):
    """Where telemetry is kept: the nine operations a backend implements."""

    def store(self, items: Sequence[tuple[str, Record]], dropped: Sequence[tuple[str, str,
              Mapping[str, int]]], counts: Mapping[tuple[str, str], int], received: float
              ) -> tuple[list[str], list[str]]:
        """Store new records and drop counts; add ``counts`` and each new summary's
        :meth:`~hybridml.cloud.ingest.Summary.counters` to the counters, all at once;
        return the (accepted, duplicate) ids."""

    def summaries(self, model: str, version: int | None, period: Period,
                  device: str | None) -> list[tuple[str, str, str]]:
        """(device, id, body JSON) of matching summaries, oldest end first."""

    def feedback(self, model: str, received: Period, labelled: bool, *, dated: bool = False
                 ) -> list[FeedbackRow]:
        """Stored feedback of ``model`` (predictions joined from samples), oldest first;
        ``received`` is the period of arrival, or of creation (``at``) when ``dated``."""

    def labelled_count(self, model: str, received: Period) -> int:
        """How many labelled rows (feedback with features) arrived in the period."""

    def events(self, model: str, kind: str) -> list[tuple[str, str, str, float]]:
        """(device, id, body JSON, received) of ``model``'s events of ``kind``, oldest
        first."""

    def devices(self, model: str) -> list[tuple[str, float, int, str]]:
        """(device, last seen, rows, versions "1,3") of each device that reported."""

    def models(self) -> list[str]:
        """Models with any summary."""

    def counters(self) -> dict[tuple[str, str], int]:
        """Ingest counters ((name, label) -> value) and drop totals ("dropped", kind)."""

    def close(self) -> None:
        """Close this thread's connection."""


class SqlTelemetry:
    """:class:`TelemetryBackend` on a store database: ``<registry>/telemetry.db`` (SQLite:
    WAL, owner-only) or the ``telemetry`` tables of PostgreSQL (docs/storage.md §2). The
    same SQL runs on both."""

    def __init__(self, db: Store) -> None:
        self._db = db

    @property
    def db(self) -> Store:
        """The store's database (``migrate`` copies it)."""
        return self._db

    @classmethod
    def open(cls, registry: Registry) -> SqlTelemetry:
        """The telemetry store beside ``registry`` (its storage backend, its root)."""
        return cls(open_database(registry.storage, registry.root, STORE, create=True,
                                 schema=_SCHEMA, version=SCHEMA_VERSION, error=TelemetryError,
                                 rowid_tables=ROWID_TABLES))

    def store(self, items: Sequence[tuple[str, Record]], dropped: Sequence[tuple[str, str,
              Mapping[str, int]]], counts: Mapping[tuple[str, str], int], received: float
              ) -> tuple[list[str], list[str]]:
        """See :meth:`TelemetryBackend.store`; one transaction.

        It needs no store-wide lock (``lock=False``: PostgreSQL runs uploads side by side;
        SQLite serialises its writers anyway). The primary key of ``records`` decides which
        upload stores a record — a concurrent one waits on that key and then finds it there —
        and the counters are upserts that add, written in key order so that two uploads never
        wait on each other in a circle. (Records go in as listed: their order is the arrival
        order readers see; two uploads holding the same ids are a device's retries of one
        spool batch, in one order.)"""
        accepted: list[str] = []
        duplicates: list[str] = []
        counts = dict(counts)
        with self._db.tx(write=True, lock=False) as c:
            for device, r in items:
                kind = "summary" if isinstance(r, Summary) else \
                    "feedback" if isinstance(r, Feedback) else r.kind
                cur = c.execute("INSERT INTO records (device, id, kind, received) VALUES "
                                "(?, ?, ?, ?) ON CONFLICT DO NOTHING",
                                (device, r.id, kind, received))
                if cur.rowcount == 0:
                    duplicates.append(r.id)
                    continue
                accepted.append(r.id)
                if isinstance(r, Summary):
                    for key, n in r.counters().items():
                        counts[key] = counts.get(key, 0) + n
                    c.execute("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (device, r.id, r.model, r.version, r.start, r.end, r.rows,
                               json.dumps(r.body, separators=(",", ":")), received))
                elif isinstance(r, Feedback):
                    c.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (device, r.id, r.model, r.version, r.prediction_id,
                               None if r.prediction is None else json.dumps(r.prediction),
                               json.dumps(r.label), None if r.features is None
                               else json.dumps(r.features), r.sha256,
                               received if r.at is None else r.at, received))
                else:
                    c.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (device, r.id, r.kind, r.model, r.prediction_id, r.created,
                               r.body, received))
            for device, batch, tally in dropped:
                for kind, n in tally.items():
                    c.execute("INSERT INTO dropped VALUES (?, ?, ?, ?, ?) "
                              "ON CONFLICT DO NOTHING",
                              (device, batch, kind, n, received))
            counts = {**counts, ("records_accepted", "all"): len(accepted),
                      ("records_duplicate", "all"): len(duplicates)}
            c.executemany("INSERT INTO counters VALUES (?, ?, ?) ON CONFLICT (name, label) "
                          "DO UPDATE SET value = counters.value + excluded.value",
                          [(n, lab, v) for (n, lab), v in sorted(counts.items())])
        return accepted, duplicates

    def summaries(self, model: str, version: int | None, period: Period,
                  device: str | None) -> list[tuple[str, str, str]]:
        """See :meth:`TelemetryBackend.summaries`."""
        sql = "SELECT device, id, body FROM summaries WHERE model = ?"
        args: list[Any] = [model]
        for clause, value in (("version = ?", version), ('"end" > ?', period[0]),
                              ('"end" <= ?', period[1]), ("device = ?", device)):
            if value is not None:
                sql += " AND " + clause
                args.append(value)
        with self._db.tx(write=False) as c:
            return [tuple(r) for r in c.execute(sql + ' ORDER BY "end", device, id', args)]

    def feedback(self, model: str, received: Period, labelled: bool, *, dated: bool = False
                 ) -> list[FeedbackRow]:
        """See :meth:`TelemetryBackend.feedback`."""
        # Feedback without its prediction takes it (and the version) from the sample record
        # that names its prediction_id: decoded here, so the SQL is the same on both engines.
        sql = ("SELECT f.version, f.prediction, f.label, f.at, f.features, f.sha256, f.device, "
               "CASE WHEN f.prediction IS NULL AND f.prediction_id IS NOT NULL THEN "
               "(SELECT e.body FROM events e WHERE e.kind = 'sample' AND e.model = f.model "
               "AND e.prediction_id = f.prediction_id ORDER BY e.received, e.rowid LIMIT 1) "
               "END FROM feedback f WHERE f.model = ?")
        args: list[Any] = [model]
        if labelled:
            sql += " AND f.features IS NOT NULL"
        sql += _received(received, args, "f.at" if dated else "f.received")
        with self._db.tx(write=False) as c:
            rows = c.execute(sql + " ORDER BY f.received, f.rowid", args).fetchall()
        out = []
        for v, p, lab, at, feats, sha, dev, sample in rows:
            prediction = None if p is None else json.loads(p)
            if sample is not None:
                doc = json.loads(sample)
                doc = doc if isinstance(doc, dict) else {}
                v = doc.get("version") if v is None else v
                prediction = doc.get("prediction")
            out.append(FeedbackRow(None if v is None else int(v), prediction, json.loads(lab),
                                   float(at), None if feats is None else json.loads(feats),
                                   sha, dev))
        return out

    def labelled_count(self, model: str, received: Period) -> int:
        """See :meth:`TelemetryBackend.labelled_count`."""
        args: list[Any] = [model]
        sql = "SELECT COUNT(*) FROM feedback f WHERE f.model = ? AND f.features IS NOT NULL"
        sql += _received(received, args)
        with self._db.tx(write=False) as c:
            return int(c.execute(sql, args).fetchone()[0])

    def events(self, model: str, kind: str) -> list[tuple[str, str, str, float]]:
        """See :meth:`TelemetryBackend.events`."""
        with self._db.tx(write=False) as c:
            return [tuple(r) for r in c.execute(
                "SELECT device, id, body, received FROM events WHERE model = ? AND kind = ? "
                "ORDER BY received, rowid", (model, kind))]

    def devices(self, model: str) -> list[tuple[str, float, int, str]]:
        """See :meth:`TelemetryBackend.devices`."""
        with self._db.tx(write=False) as c:
            rows = c.execute(
                "SELECT device, MAX(received), SUM(rows), version FROM "
                "(SELECT device, received, rows, version FROM summaries WHERE model = ? "
                "UNION ALL SELECT device, received, 0, version FROM feedback WHERE model = ?) u "
                "GROUP BY device, version ORDER BY device, version", (model, model)).fetchall()
        out: dict[str, tuple[float, int, list[str]]] = {}
        for device, seen, n, version in rows:
            last, total, versions = out.get(device, (seen, 0, []))
            if version is not None:
                versions.append(str(version))
            out[device] = (max(last, seen), total + int(n or 0), versions)
        return [(d, seen, n, ",".join(vs)) for d, (seen, n, vs) in out.items()]

    def models(self) -> list[str]:
        """See :meth:`TelemetryBackend.models`."""
        with self._db.tx(write=False) as c:
            return [r[0] for r in c.execute("SELECT DISTINCT model FROM summaries ORDER BY 1")]

    def counters(self) -> dict[tuple[str, str], int]:
        """See :meth:`TelemetryBackend.counters`."""
        with self._db.tx(write=False) as c:
            out = {(n, lab): int(v) for n, lab, v in c.execute("SELECT * FROM counters")}
            for kind, n in c.execute("SELECT kind, SUM(count) FROM dropped GROUP BY kind"):
                out[("dropped", kind)] = int(n)
        return out

    def close(self) -> None:
        """See :meth:`TelemetryBackend.close`."""
        self._db.close()


class TelemetryStore:
    """Ingest, query and analyse telemetry of the models in ``registry``.

    ``backend`` defaults to :class:`SqlTelemetry` on ``<registry>/telemetry.db``;
    ``clock`` (POSIX seconds) is what "now" means for :meth:`device_drift`.
    """

    def __init__(self, registry: Registry, *, backend: TelemetryBackend | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.backend: TelemetryBackend = backend or SqlTelemetry.open(registry)
        self.clock = clock
        self.facts = FactsCache(registry)  # (model, version=None) -> ModelFacts

    def close(self) -> None:
        """Close this thread's database connection."""
        self.backend.close()

    # ------------------------------------------------------------------------------ ingest
    def ingest_summaries(self, device: str | None, records: Sequence[Any],
                         dropped: Mapping[str, int] | None = None) -> IngestResult:
        """Store the spool records of one upload (``POST /v1/telemetry``).

        Every kind is taken: summaries, feedback (as :meth:`add_feedback` would), alerts,
        health and samples. ``device`` None means "the store id in each record's id" (a
        server without tokens). Bad records are refused alone, with the field named.
        """
        checked, refused = self._check(records, lambda raw, facts: check_record(raw, facts))
        items = [(device or device_of(r.id) or ANONYMOUS, r) for r in checked]
        drops = []
        if dropped:
            first = records[0].get("id") if records and isinstance(records[0], dict) else None
            batch = first if isinstance(first, str) else f"t{int(self.clock()) // 60}"
            drops.append((device or device_of(batch) or ANONYMOUS, batch[:128], dropped))
        return self._store(items, drops, refused, "telemetry")

    def add_feedback(self, model: str, device: str | None, records: Sequence[Any]
                     ) -> IngestResult:
        """Store feedback records for ``model`` (``POST /v1/models/<model>/feedback``, the
        ``feedback`` command): bodies (an optional ``id``) or spool records of that kind."""
        self.facts(model)  # NotFoundError for an unknown model: the whole request is wrong
        checked, refused = self._check(
            records, lambda raw, facts: check_feedback_item(raw, facts, model))
        items = [(device or device_of(r.id) or ANONYMOUS, r) for r in checked]
        return self._store(items, [], refused, "feedback")

    def _check(self, records: Sequence[Any], check: Callable[[Any, Facts], Record]
               ) -> tuple[list[Record], list[dict[str, Any]]]:
        good: list[Record] = []
        refused: list[dict[str, Any]] = []
        for i, raw in enumerate(records):
            try:
                good.append(check(raw, self.facts))
            except HybridMLError as exc:
                refused.append(refusal(raw, i, exc))
        return good, refused

    def _store(self, items: list[tuple[str, Record]], drops: list[tuple[str, str,
               Mapping[str, int]]], refused: list[dict[str, Any]], endpoint: str
               ) -> IngestResult:
        counts = {("uploads", endpoint): 1, ("records_refused", "all"): len(refused)}
        accepted, duplicates = self.backend.store(items, drops, counts, self.clock())
        if refused:
            log.info("refused %d of %d %s records (first: %s)", len(refused),
                     len(refused) + len(items), endpoint, refused[0]["error"])
        return IngestResult(accepted, duplicates, refused)

    # ------------------------------------------------------------------------------ queries
    def summaries(self, model: str, version: int | None = None, since: Any = None,
                  until: Any = None, device: str | None = None) -> list[dict[str, Any]]:
        """Stored summary bodies whose window ends in (since, until], oldest first; each also
        carries ``device`` and ``id``."""
        rows = self.backend.summaries(model, version, _period(since, until), device)
        return [{**json.loads(body), "device": dev, "id": rid} for dev, rid, body in rows]

    def drift(self, model: str, version: int, *, since: Any = None, until: Any = None,
              device: str | None = None) -> dict[str, Any]:
        """The drift report (monitoring.md §2) of ``version``'s summaries ending in the
        period, counts summed (one device, or the fleet: traffic-weighted)."""
        return fleet.report(self.facts(model, version),
                            self.summaries(model, version, since, until, device),
                            _period(since, until))

    def device_drift(self, model: str, version: int, window_s: float, windows: int = 2
                     ) -> list[dict[str, Any]]:
        """Per device, the last ``windows`` windows of ``window_s`` seconds before now (oldest
        first): ``{"device", "windows": [{"start", "end", "rows", "dataset_drift",
        "alerts"}]}``."""
        now = self.clock()
        edges = [now - window_s * k for k in range(windows, -1, -1)]
        return fleet.device_windows(self.facts(model, version),
                                    self.summaries(model, version, edges[0], now), edges)

    def performance(self, model: str, *, version: int | None = None, window_s: float = 86400
                    ) -> list[dict[str, Any]]:
        """Realised metric per version and window from labels, and a confidence-based
        estimate where labels are few (see :mod:`hybridml.cloud.performance`)."""
        rows = [r for r in self.backend.feedback(model, (None, None), False)
                if r.prediction is not None and r.version is not None
                and (version is None or r.version == version)]
        summaries = self.summaries(model, version)
        versions = sorted({r.version for r in rows if r.version is not None}
                          | {int(s["version"]) for s in summaries})
        out: list[dict[str, Any]] = []
        for v in versions:
            facts = self.facts(model, v)
            out += performance.windows(
                facts.task, facts.profile, window_s, v,
                [(r.at, r.label, r.prediction) for r in rows if r.version == v],
                [s for s in summaries if s["version"] == v])
        return out

    def traffic(self, model: str, *, version: int | None = None, window_s: float = 3600,
                since: Any = None, until: Any = None) -> list[dict[str, Any]]:
        """Rows by source per window (``{"start", "end", "rows", "by_source", "degraded"}``)."""
        return performance.traffic(self.summaries(model, version, since, until), window_s)

    def events(self, model: str, kind: str, *, since: Any = None, until: Any = None
               ) -> list[dict[str, Any]]:
        """Stored event bodies of ``kind`` (``shadow``, ``interleave``, ``health``, ...) at a
        time in (since, until], oldest first; each also carries ``device``, ``id`` and
        ``received``. An event's time is its window's end (shadow, interleave), else when it
        arrived."""
        lo, hi = _period(since, until)
        out = []
        for dev, rid, body, received in self.backend.events(model, kind):
            doc = json.loads(body)
            win = doc.get("window") if isinstance(doc, dict) else None
            at = parse_time(win["end"], "end") if isinstance(win, dict) else received
            if (lo is None or at > lo) and (hi is None or at <= hi):
                out.append({**doc, "device": dev, "id": rid, "received": received})
        return out

    def feedback(self, model: str, *, since: Any = None, until: Any = None
                 ) -> list[FeedbackRow]:
        """Feedback of ``model`` that arrived in (since, until], oldest first, with the
        prediction (and version) it judges where known and the device that sent it."""
        return self.backend.feedback(model, _period(since, until), False)

    def feedback_at(self, model: str, *, since: Any = None, until: Any = None
                    ) -> list[FeedbackRow]:
        """:meth:`feedback` by the time each label was created on its device (``at``), not
        when it arrived: what a rollout's analysis compares with the windows of summaries."""
        return self.backend.feedback(model, _period(since, until), False, dated=True)

    def labelled_rows(self, model: str, since: Any = None
                      ) -> tuple[list[dict[str, Any]], list[Any]]:
        """Labelled rows (feedback with features) that arrived after ``since``: the rows (by
        column name) and their labels, in arrival order."""
        found = self.backend.feedback(model, _period(since, None), True)
        return [r.features or {} for r in found], [r.label for r in found]

    def labelled_count(self, model: str, since: Any = None) -> int:
        """How many labelled rows arrived after ``since``."""
        return self.backend.labelled_count(model, _period(since, None))

    def labelled_sha256(self, model: str, since: Any = None) -> str:
        """A fingerprint of :meth:`labelled_rows`: sha256 over each row's own (the sha256 of
        its canonical JSON, as training data is fingerprinted), in order."""
        h = hashlib.sha256()
        for r in self.backend.feedback(model, _period(since, None), True):
            h.update(bytes.fromhex(r.sha256 or ""))
        return h.hexdigest()

    def devices(self, model: str) -> list[dict[str, Any]]:
        """Each device that reported on ``model``: ``{device, last_seen, rows, versions}``."""
        return [{"device": d, "last_seen": utc_iso(seen), "rows": int(rows or 0),
                 "versions": sorted({int(v) for v in str(vs or "").split(",") if v})}
                for d, seen, rows, vs in self.backend.devices(model)]

    def models(self) -> list[str]:
        """Models any device reported a summary for."""
        return self.backend.models()

    def counters(self) -> dict[tuple[str, str], int]:
        """Ingest counters since the database was made (for ``/metrics``)."""
        return self.backend.counters()


def _period(since: Any, until: Any) -> Period:
    return (None if since is None else parse_time(since, "since"),
            None if until is None else parse_time(until, "until"))


def _received(period: Period, args: list[Any], column: str = "f.received") -> str:
    sql = ""
    if period[0] is not None:
        sql += f" AND {column} > ?"
        args.append(period[0])
    if period[1] is not None:
        sql += f" AND {column} <= ?"
        args.append(period[1])
    return sql
