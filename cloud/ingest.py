"""Telemetry and feedback records as they arrive (HTTP or a CSV): checked here, once.

The formats are docs/monitoring.md §4 and §5. Two levels, two kinds of refusal:

* the **upload** (:func:`parse_upload`): a JSON object ``{"records": [...], "dropped": {...}?}``.
  Anything else is a 400 naming the field (``records``, ``dropped.summary``, ...); more than
  :data:`MAX_RECORDS` records is a 413 naming ``records``. Nothing is stored then.
* each **record** (:func:`check_record`, :func:`check_feedback_item`): a record the rules refuse
  becomes an :class:`InputError` whose ``field`` is the path inside the record
  (``body.window.start``, ``body.features.hour.counts``); the caller refuses that record
  alone and stores the rest.

A rollout's ``shadow`` and ``interleave`` records and ``load_failed`` health records are
checked by :mod:`hybridml.cloud.ingest_rollout` (docs/rollouts.md §4); the field rules every
check shares are in :mod:`hybridml.cloud.fields`.

Record ids make uploads idempotent. A spool record carries ``<store id>:<sequence>``; a bare
feedback body may carry an ``id``, and without one its id is ``sha256:`` and the hash of its
canonical JSON, so the same body sent twice counts once.

What a record may say depends on the model version it names (the profile's bins, the task's
labels, the input schema): the caller passes a :data:`Facts` lookup returning
:class:`ModelFacts`, built once per version from its manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from hybridml.shared.errors import HTTPError, HybridMLError, InputError
from hybridml.shared.manifest import canonical_json
from hybridml.shared.text import printable

from .facts import Facts, ModelFacts  # noqa: F401  (ModelFacts: read from here by fleet)
from .fields import (
    FORMAT,
    KEY_RE,
    check_format,
    count,
    counts,
    flag,
    histogram,
    model_facts,
    parse_time,
    short,
    tally,
    window,
)
from .ingest_rollout import ROLLOUT_KINDS, check_rollout_event

MAX_RECORDS = 500  # the device's batch limit (monitoring.md §4)
KINDS = ("alert", "health", "summary", "feedback", "sample", *ROLLOUT_KINDS)
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,127}")
STORE_ID_RE = re.compile(r"([0-9a-f]{10}):[0-9]{1,18}")
UPLOAD_KEYS = ("records", "dropped")


@dataclass(frozen=True)
class Upload:
    """A checked upload body: its raw records (checked one by one later) and drop counts."""

    records: list[Any]
    dropped: dict[str, int]


@dataclass(frozen=True)
class Summary:
    """A checked summary record; ``body`` is the normalised summary (known keys only)."""

    id: str
    model: str
    version: int
    start: float
    end: float
    rows: int
    body: dict[str, Any]

    def counters(self) -> dict[tuple[str, str], int]:
        """What this summary adds to the store's counters (``/metrics``): its rows, and its
        rows by source and degraded rows by reason, labelled ``model|version|name``."""
        key = f"{self.model}|{self.version}"
        out = {("rows", key): self.rows}
        for name, group in (("predictions", "by_source"), ("degraded", "degraded")):
            for label, n in self.body.get(group, {}).items():
                out[(name, f"{key}|{label}")] = n
        return out


@dataclass(frozen=True)
class Feedback:
    """A checked feedback record: a label, with the prediction it judges or its features."""

    id: str
    model: str
    version: int | None
    prediction_id: str | None
    prediction: Any
    label: Any
    features: dict[str, Any] | None
    at: float | None
    sha256: str | None  # fingerprint of (features, label): labelled rows only


@dataclass(frozen=True)
class Event:
    """An alert, health or sample record, kept as sent (samples can be joined by
    ``prediction_id``)."""

    id: str
    kind: str
    model: str | None
    prediction_id: str | None
    created: float | None
    body: str  # the body as JSON text


Record = Summary | Feedback | Event


def refusal(raw: Any, index: int, exc: HybridMLError) -> dict[str, Any]:
    """The ``refused`` entry of one record: its id (if it had a usable one), its index in the
    upload, and the error (message, code, field)."""
    rid = raw.get("id") if isinstance(raw, dict) else None
    out: dict[str, Any] = {"id": rid if isinstance(rid, str) and ID_RE.fullmatch(rid) else None,
                           "index": index, "error": exc.message[:300], "code": exc.code}
    if exc.details.get("field") is not None:
        out["field"] = printable(str(exc.details["field"]), 120)
    return out


def device_of(record_id: str) -> str | None:
    """The store id in a spool record id (``7f3a9c2e1b:42`` -> ``7f3a9c2e1b``), else None."""
    m = STORE_ID_RE.fullmatch(record_id)
    return m.group(1) if m else None


def parse_upload(data: Any, keys: tuple[str, ...] = UPLOAD_KEYS) -> Upload:
    """Check an upload body (already parsed as strict JSON) with top-level ``keys``;
    400/413 naming the field."""
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object {\"records\": [...]}", field="body")
    unknown = [k for k in data if k not in keys]
    if unknown:
        raise InputError(f"unknown key {short(unknown[0])} in the body; send "
                         f"{' and '.join(map(repr, keys))}", field=printable(str(unknown[0]), 80))
    records = data.get("records")
    if not isinstance(records, list):
        raise InputError("'records' must be a list of records", field="records")
    if len(records) > MAX_RECORDS:
        raise HTTPError(f"{len(records)} records exceed the limit of {MAX_RECORDS} per "
                        "upload; send them in batches", status=413, code="batch_too_large",
                        field="records", max_records=MAX_RECORDS)
    dropped = tally(data.get("dropped", {}), "dropped")
    return Upload(records, dropped)


def check_record(raw: Any, facts: Facts) -> Record:
    """One spool record ``{"id", "kind", "priority"?, "created"?, "body"}``, checked."""
    if not isinstance(raw, dict):
        raise InputError("a record must be an object with 'id', 'kind' and 'body'",
                         field="record")
    rid = record_id(raw.get("id"))
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InputError(f"kind {short(kind)} is not one of {', '.join(KINDS)}", field="kind")
    if "priority" in raw and (isinstance(raw["priority"], bool)
                              or not isinstance(raw["priority"], int)):
        raise InputError("'priority' must be an integer", field="priority")
    created = parse_time(raw["created"], "created") if raw.get("created") is not None else None
    body = raw.get("body")
    if not isinstance(body, dict):
        raise InputError("'body' must be an object", field="body")
    if kind == "summary":
        return check_summary(rid, body, facts)
    if kind == "feedback":
        return check_feedback(rid, body, facts)
    checked = check_rollout_event(str(kind), body, facts)  # shadow, interleave, load_failed
    if checked is not None:
        body = checked
    model = body.get("model")
    pid = body.get("prediction_id")
    return Event(rid, str(kind), model if isinstance(model, str) and len(model) <= 64 else None,
                 pid if isinstance(pid, str) and len(pid) <= 128 else None, created,
                 json_text(body, "body"))


def check_feedback_item(raw: Any, facts: Facts, model: str) -> Feedback:
    """One item of ``POST /v1/models/<model>/feedback``: a feedback body (with an optional
    ``id``), or a spool record of kind ``feedback`` wrapping one."""
    if not isinstance(raw, dict):
        raise InputError("a feedback record must be an object", field="record")
    if "body" in raw and "kind" in raw:
        if raw["kind"] != "feedback":
            raise InputError(f"kind {short(raw['kind'])} is not 'feedback' on the feedback "
                             "endpoint; send other records to /v1/telemetry", field="kind")
        rid = record_id(raw.get("id"))
        if not isinstance(raw["body"], dict):
            raise InputError("'body' must be an object", field="body")
        body = dict(raw["body"])
        prefix = "body."
    else:
        body = {k: v for k, v in raw.items() if k != "id"}
        rid = record_id(raw["id"]) if "id" in raw else ""
        prefix = ""
    body.setdefault("model", model)
    if body["model"] != model:
        raise InputError(f"the record is for model {short(body['model'])}, posted to "
                         f"{model!r}'s feedback", field=prefix + "model")
    fb = check_feedback(rid, body, facts, prefix)
    if rid:
        return fb
    # No id: the content names it (checked values only), so a resent body is a duplicate.
    content = {k: v for k, v in dataclasses.asdict(fb).items() if k not in ("id", "sha256")}
    return dataclasses.replace(fb, id="sha256:" + hashlib.sha256(
        canonical_json(content)).hexdigest())


def check_summary(rid: str, body: dict[str, Any], facts: Facts) -> Summary:
    """A summary body (format 1), normalised to its known keys."""
    check_format(body, "body.")
    f = model_facts(body, facts, "body.", version_required=True)
    start, end, win = window(body, "body.")
    rows = count(body.get("rows"), "body.rows")
    out: dict[str, Any] = {
        "format": FORMAT, "model": f.name, "version": f.version,
        "window": win, "rows": rows,
        "by_source": tally(body.get("by_source", {}), "body.by_source"),
        "degraded": tally(body.get("degraded", {}), "body.degraded"),
        "stale": flag(body.get("stale", False), "body.stale")}
    latency = body.get("latency_ms")
    if latency is not None:  # the p99 of a canary reads it: counts must fit the edges
        out["latency_ms"] = histogram(latency, "body.latency_ms")
    features = body.get("features", {})
    if not isinstance(features, dict):
        raise InputError("'features' must be an object by feature name", field="body.features")
    known = (f.profile or {}).get("features") or {}
    out["features"] = {}
    for name, entry in features.items():
        where = f"body.features.{printable(str(name), 64)}"
        if name not in known if known else not KEY_RE.fullmatch(str(name)):
            raise InputError(f"feature {short(name)} is not in the profile of {f.name!r} v"
                             f"{f.version}", field=where)
        if not isinstance(entry, dict):
            raise InputError("a feature's entry must be {\"counts\", \"missing\"}", field=where)
        item = {"counts": counts(entry.get("counts"), where + ".counts",
                                  f.bins("features", name)),
                "missing": count(entry.get("missing", 0), where + ".missing")}
        if "unseen" in entry:
            item["unseen"] = count(entry["unseen"], where + ".unseen")
        out["features"][name] = item
    absent = [n for n in known if n not in features]
    if absent:  # every summary of a version sums with the others: the same bins throughout
        raise InputError(f"the summary has no counts for feature {absent[0]!r}; count every "
                         "feature of the profile", field=f"body.features.{absent[0]}")
    for key in ("predictions", "confidence"):
        entry = body.get(key)
        if entry is None:
            if f.bins(key) is not None:
                raise InputError(f"the summary has no '{key}' counts; the profile of "
                                 f"{f.name!r} v{f.version} has them", field=f"body.{key}")
            continue
        if not isinstance(entry, dict):
            raise InputError(f"'{key}' must be {{\"counts\": [...]}}", field=f"body.{key}")
        out[key] = {"counts": counts(entry.get("counts"), f"body.{key}.counts", f.bins(key))}
    return Summary(rid, f.name, f.version, start, end, rows, out)


def check_feedback(rid: str, body: dict[str, Any], facts: Facts, prefix: str = "body."
                   ) -> Feedback:
    """A feedback body (format 1): a label with a ``prediction_id`` (and, from a device, the
    ``prediction`` and ``version`` it judges), or with the ``features`` of a labelled row."""
    check_format(body, prefix)
    f = model_facts(body, facts, prefix, version_required=False)
    pid = body.get("prediction_id")
    if pid is not None and not (isinstance(pid, str) and 0 < len(pid) <= 128
                                and pid.isprintable()):
        raise InputError("'prediction_id' must be the id the prediction carried "
                         "(<store id>:<model>:<counter>)", field=prefix + "prediction_id")
    features = body.get("features")
    if pid is None and features is None:
        raise InputError("send 'prediction_id' (the prediction judged) or 'features' (a "
                         "labelled row) with the label", field=prefix + "prediction_id")
    if "label" not in body or body["label"] is None:
        raise InputError("'label' is missing: send the true value", field=prefix + "label")
    label = f.label(body["label"], prefix + "label")
    prediction = f.label(body["prediction"], prefix + "prediction") \
        if body.get("prediction") is not None else None
    row, sha = None, None
    if features is not None:
        if not isinstance(features, dict):
            raise InputError("'features' must be an object by column name",
                             field=prefix + "features")
        try:
            f.schema.check_row(features)
        except InputError as exc:
            raise InputError(f"features: {exc.message}",
                             field=f"{prefix}features.{exc.field or ''}".rstrip(".")) from None
        row = {k: features[k] for k in f.schema.names}
        sha = hashlib.sha256(canonical_json({"features": row, "label": label})).hexdigest()
    at = parse_time(body["created"], prefix + "created") \
        if body.get("created") is not None else None
    version = f.version if "version" in body and body["version"] is not None else None
    return Feedback(rid, f.name, version, pid, prediction, label, row, at, sha)


def json_text(value: Any, field: str) -> str:
    """``value`` (parsed from a request) as compact JSON text; InputError naming ``field``
    when it holds what JSON cannot carry: a ``NaN``/``Infinity`` literal or text that is not
    valid Unicode (a lone surrogate)."""
    def refuse(obj: Any) -> Any:
        raise InputError(f"{field} holds {short(obj)}", field=field)

    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                          default=refuse)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError):
        raise InputError(f"{field} holds a NaN/Infinity or text that is not valid Unicode; "
                         "send strict JSON", field=field) from None
    return text


def record_id(value: Any, field: str = "id") -> str:
    """A record id: 1-128 letters, digits, ``:``, ``.``, ``_`` or ``-``."""
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise InputError(f"record id {short(value)} is not an id: send the spool's "
                         "'<store id>:<sequence>' (1-128 letters, digits, ':._-')", field=field)
    return value


# -------------------------------------------------------------------------------- internals
