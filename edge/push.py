"""Upload the spool to the cloud: batches, idempotent ids, quarantine for what it refuses.

:func:`push` sends the pending records of a :class:`~hybridml.edge.spool.Spool` in upload order
(alerts and health first, then summaries, feedback, samples; oldest first within a kind), in
batches of at most :attr:`PushLimits.max_records` records or :attr:`PushLimits.max_bytes`
bytes (docs/monitoring.md §4): feedback to ``POST /v1/models/<name>/feedback``, the rest to
``POST /v1/telemetry`` with the counts of records dropped since the last report.

What each answer means for the records:

* **200**: ``accepted`` and ``duplicates`` (the cloud had them already: a retried upload) are
  deleted; ``refused`` ones are quarantined with the cloud's reason (kept, never sent again);
  a record the answer does not mention stays pending for the next push.
* **a 4xx refusing the whole batch for its content** (400, 413, 415, 422): the batch is split
  in halves and each is sent again, down to the one record at fault, which is quarantined —
  a bad record never blocks the others.
* **a 4xx about the device or the endpoint** (401, 403, 404, 405, 408, 429 ...): the push stops
  and keeps everything; it is not the records' fault (a revoked token, an older cloud).
* **5xx, time-outs, no connection**: the push stops and keeps everything for next time.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybridml.shared.errors import ConfigError, HybridMLError, RemoteError

from .spool import Entry, Spool

if TYPE_CHECKING:
    from .client import CloudClient

log = logging.getLogger("hybridml.edge.push")

SPLIT_STATUSES = frozenset({400, 413, 415, 422})  # the batch's content: find the bad record
ENVELOPE_BYTES = 160  # a record's id, kind, priority and created around its body


@dataclass(frozen=True)
class PushLimits:
    """The largest upload: ``max_records`` records or ``max_bytes`` bytes (a record larger
    than that goes alone)."""

    max_records: int = 500
    max_bytes: int = 256 * 1024

    def __post_init__(self) -> None:
        if self.max_records < 1 or self.max_bytes < 1:
            raise ConfigError("push limits need max_records >= 1 and max_bytes >= 1",
                              field="max_records" if self.max_records < 1 else "max_bytes")


@dataclass
class PushResult:
    """What one :func:`push` did. ``error`` says why it stopped early (the records it did not
    send are kept for the next push), None when it sent everything it had."""

    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    uploads: int = 0
    pending: int = 0
    dropped_reported: dict[str, int] = field(default_factory=dict)
    error: str | None = None
    unavailable: bool = False  # stopped because the cloud could not answer (back off)

    @property
    def ok(self) -> bool:
        """True when nothing stopped the push."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The result for ``push --json``."""
        return {"accepted": self.accepted, "duplicates": self.duplicates,
                "quarantined": self.quarantined, "uploads": self.uploads,
                "pending": self.pending, "dropped_reported": self.dropped_reported,
                "error": self.error, "unavailable": self.unavailable}


class _Stop(Exception):
    """The cloud cannot take records now: stop, keep the rest."""

    def __init__(self, error: HybridMLError) -> None:
        super().__init__(error.message)
        self.error = error


def push(spool: Spool, client: CloudClient, *, model: str | None = None,
         limits: PushLimits | None = None) -> PushResult:
    """Send the spool's pending records (of ``model`` and of no model, when given) to the
    cloud through ``client``; see the module docstring for what each answer does."""
    return _Pusher(spool, client, limits or PushLimits()).run(model)


class _Pusher:
    def __init__(self, spool: Spool, client: CloudClient, limits: PushLimits) -> None:
        self.spool, self.client, self.limits = spool, client, limits
        self.result = PushResult()
        self.dropped = spool.dropped()

    def run(self, model: str | None) -> PushResult:
        spool, r = self.spool, self.result
        spool.expire()
        self.dropped = spool.dropped()
        queue = spool.queue(model=model)
        telemetry = [e for e in queue if e.kind != "feedback" or e.model is None]
        feedback: dict[str, list[Entry]] = {}
        for e in queue:
            if e.kind == "feedback" and e.model is not None:
                feedback.setdefault(e.model, []).append(e)
        try:
            if not telemetry and self.dropped:
                self._send([], None)  # drop counts alone, when nothing else goes there
            for batch in self._batches(telemetry):
                self._send(batch, None)
            for name, entries in sorted(feedback.items()):
                for batch in self._batches(entries):
                    self._send(batch, name)
        except _Stop as stop:
            r.error = stop.error.message
            r.unavailable = isinstance(stop.error, RemoteError) or stop.error.status >= 500
            log.warning("push stopped: %s (records kept for the next push)", r.error)
        r.pending = len(spool.queue(model=model))
        return r

    def _batches(self, entries: Sequence[Entry]) -> Iterator[list[Entry]]:
        batch: list[Entry] = []
        size = 0
        for e in entries:
            cost = e.bytes + ENVELOPE_BYTES
            if batch and (len(batch) >= self.limits.max_records or
                          size + cost > self.limits.max_bytes):
                yield batch
                batch, size = [], 0
            batch.append(e)
            size += cost
        if batch:
            yield batch

    def _send(self, batch: list[Entry], name: str | None) -> None:
        """Upload one batch (splitting it when the cloud refuses its content)."""
        records = self.spool.records([e.seq for e in batch])
        if batch and not records:
            return  # gone meanwhile (another process pushed them)
        dropped = self.dropped if name is None and self.dropped else None
        try:
            payload = [r.to_json() for r in records]
            answer = self.client.feedback(name, payload) if name is not None else \
                self.client.telemetry(payload, dropped)
        except HybridMLError as exc:
            if not _splittable(exc):
                raise _Stop(exc) from exc
            if dropped and str(exc.details.get("field", "")).startswith("dropped"):
                log.warning("the cloud refused the drop counts %s (%s); sending without them",
                            dropped, exc.message)
                self.dropped = {}
                self._send(batch, name)
                return
            if len(records) <= 1:
                if records:
                    self.spool.quarantine({records[0].seq: f"{exc.code}: {exc.message}"})
                    self.result.quarantined += 1
                    log.warning("quarantined %s: the cloud refused it (%s)", records[0].id,
                                exc.message)
                return
            half = len(batch) // 2
            self._send(batch[:half], name)
            self._send(batch[half:], name)
            return
        self.result.uploads += 1
        self._settle(records, answer)
        if dropped:
            self.spool.forget_dropped(dropped)
            self.result.dropped_reported = dict(dropped)
            self.dropped = {}

    def _settle(self, records: Sequence[Any], answer: dict[str, Any]) -> None:
        """Delete what the cloud has, quarantine what it refused."""
        by_id = {r.id: r.seq for r in records}
        accepted = [by_id[i] for i in answer["accepted"] if i in by_id]
        duplicates = [by_id[i] for i in answer["duplicates"] if i in by_id]
        refused: dict[int, str] = {}
        for item in answer["refused"]:
            if not isinstance(item, dict):
                continue
            index = item.get("index")
            seq = records[index].seq if isinstance(index, int) and \
                0 <= index < len(records) else by_id.get(str(item.get("id")))
            if seq is not None:
                where = f" ({item['field']})" if item.get("field") else ""
                refused[seq] = f"{item.get('code', 'refused')}: {item.get('error')}{where}"
        self.spool.remove(accepted + duplicates)
        if refused:
            self.spool.quarantine(refused)
            log.warning("the cloud refused %d record(s), quarantined; first: %s", len(refused),
                        next(iter(refused.values())))
        r = self.result
        r.accepted += len(accepted)
        r.duplicates += len(duplicates)
        r.quarantined += len(refused)


def _splittable(exc: HybridMLError) -> bool:
    """A refusal of the batch's content (split it to find the record at fault)."""
    status = getattr(exc, "status", 500)
    return status in SPLIT_STATUSES


__all__ = ["SPLIT_STATUSES", "PushLimits", "PushResult", "push"]
