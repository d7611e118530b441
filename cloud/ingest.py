"""Telemetry and feedback records as they arrive (HTTP or a CSV): checked here, once.

The formats are docs/monitoring.md §4 and §5. Two levels, two kinds of refusal:

* the **upload** (:func:`parse_upload`): a JSON object ``{"records": [...], "dropped": {...}?}``.
  Anything else is a 400 naming the field (``records``, ``dropped.summary``, ...); more than
  :data:`MAX_RECORDS` records is a 413 naming ``records``. Nothing is stored then.
* each **record** (:func:`check_record`, :func:`check_feedback_item`): a record the rules refuse
  becomes an :class:`InputError` whose ``field`` is the path inside the record
  (``body.window.start``, ``body.features.hour.counts``); the caller refuses that record
  alone and stores the rest.

Record ids make uploads idempotent. A spool record carries ``<store id>:<sequence>``; a bare
feedback body may carry an ``id``, and without one its id is ``sha256:`` and the hash of its
canonical JSON, so the same body sent twice counts once.

What a record may say depends on the model version it names (the profile's bins, the task's
labels, the input schema): the caller passes a :data:`Facts` lookup returning
:class:`ModelFacts`, built once per version from its manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any

from hybridml.shared.clock import from_iso, utc_iso
from hybridml.shared.errors import HTTPError, HybridMLError, InputError
from hybridml.shared.manifest import canonical_json
from hybridml.shared.text import printable

from .facts import Facts, ModelFacts

FORMAT = 1
MAX_RECORDS = 500  # the device's batch limit (monitoring.md §4)
KINDS = ("alert", "health", "summary", "feedback", "sample")
MAX_COUNT = 10**12  # no window holds more rows; bounds what a buggy device can add
MAX_BINS = 1024
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9:._-]{0,127}")
STORE_ID_RE = re.compile(r"([0-9a-f]{10}):[0-9]{1,18}")
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
UPLOAD_KEYS = ("records", "dropped")
EARLIEST, LATEST = 946684800.0, 4102444800.0  # 2000-01-01 .. 2100-01-01


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
        raise InputError(f"unknown key {_short(unknown[0])} in the body; send "
                         f"{' and '.join(map(repr, keys))}", field=printable(str(unknown[0]), 80))
    records = data.get("records")
    if not isinstance(records, list):
        raise InputError("'records' must be a list of records", field="records")
    if len(records) > MAX_RECORDS:
        raise HTTPError(f"{len(records)} records exceed the limit of {MAX_RECORDS} per "
                        "upload; send them in batches", status=413, code="batch_too_large",
                        field="records", max_records=MAX_RECORDS)
    dropped = _tally(data.get("dropped", {}), "dropped")
    return Upload(records, dropped)


def check_record(raw: Any, facts: Facts) -> Record:
    """One spool record ``{"id", "kind", "priority"?, "created"?, "body"}``, checked."""
    if not isinstance(raw, dict):
        raise InputError("a record must be an object with 'id', 'kind' and 'body'",
                         field="record")
    rid = record_id(raw.get("id"))
    kind = raw.get("kind")
    if kind not in KINDS:
        raise InputError(f"kind {_short(kind)} is not one of {', '.join(KINDS)}", field="kind")
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
            raise InputError(f"kind {_short(raw['kind'])} is not 'feedback' on the feedback "
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
        raise InputError(f"the record is for model {_short(body['model'])}, posted to "
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
    _format(body, "body.")
    f = _facts(body, facts, "body.", version_required=True)
    window = body.get("window")
    if not isinstance(window, dict):
        raise InputError("'window' must be {\"start\": ISO, \"end\": ISO}", field="body.window")
    start = parse_time(window.get("start"), "body.window.start")
    end = parse_time(window.get("end"), "body.window.end")
    if end < start:
        raise InputError("the window ends before it starts", field="body.window.end")
    rows = _count(body.get("rows"), "body.rows")
    out: dict[str, Any] = {
        "format": FORMAT, "model": f.name, "version": f.version,
        "window": {"start": utc_iso(start), "end": utc_iso(end)}, "rows": rows,
        "by_source": _tally(body.get("by_source", {}), "body.by_source"),
        "degraded": _tally(body.get("degraded", {}), "body.degraded"),
        "stale": _flag(body.get("stale", False), "body.stale")}
    latency = body.get("latency_ms")
    if latency is not None:
        if not isinstance(latency, dict):
            raise InputError("'latency_ms' must be {\"edges\", \"counts\"}",
                             field="body.latency_ms")
        edges = latency.get("edges")
        if not isinstance(edges, list) or len(edges) > MAX_BINS or not all(
                isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
                for e in edges):
            raise InputError("'latency_ms.edges' must be a list of numbers",
                             field="body.latency_ms.edges")
        out["latency_ms"] = {"edges": edges, "counts": _counts(latency.get("counts"),
                                                               "body.latency_ms.counts", None)}
    features = body.get("features", {})
    if not isinstance(features, dict):
        raise InputError("'features' must be an object by feature name", field="body.features")
    known = (f.profile or {}).get("features") or {}
    out["features"] = {}
    for name, entry in features.items():
        where = f"body.features.{printable(str(name), 64)}"
        if name not in known if known else not KEY_RE.fullmatch(str(name)):
            raise InputError(f"feature {_short(name)} is not in the profile of {f.name!r} v"
                             f"{f.version}", field=where)
        if not isinstance(entry, dict):
            raise InputError("a feature's entry must be {\"counts\", \"missing\"}", field=where)
        item = {"counts": _counts(entry.get("counts"), where + ".counts",
                                  f.bins("features", name)),
                "missing": _count(entry.get("missing", 0), where + ".missing")}
        if "unseen" in entry:
            item["unseen"] = _count(entry["unseen"], where + ".unseen")
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
        out[key] = {"counts": _counts(entry.get("counts"), f"body.{key}.counts", f.bins(key))}
    return Summary(rid, f.name, f.version, start, end, rows, out)


def check_feedback(rid: str, body: dict[str, Any], facts: Facts, prefix: str = "body."
                   ) -> Feedback:
    """A feedback body (format 1): a label with a ``prediction_id`` (and, from a device, the
    ``prediction`` and ``version`` it judges), or with the ``features`` of a labelled row."""
    _format(body, prefix)
    f = _facts(body, facts, prefix, version_required=False)
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
        raise InputError(f"{field} holds {_short(obj)}", field=field)

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
        raise InputError(f"record id {_short(value)} is not an id: send the spool's "
                         "'<store id>:<sequence>' (1-128 letters, digits, ':._-')", field=field)
    return value


def parse_time(value: Any, field: str) -> float:
    """POSIX seconds of an ISO 8601 time (``2026-12-01T16:00:00Z``; no zone means UTC) or of
    a number of seconds; InputError naming ``field`` for anything else."""
    when: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        when = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        with contextlib.suppress(ValueError):
            when = from_iso(value)
    if when is None or not EARLIEST <= when < LATEST:  # also refuses NaN
        raise InputError(f"{field} {_short(value)} is not a time: send ISO 8601 UTC such as "
                         "2026-12-01T16:00:00Z (years 2000-2099)", field=field)
    return when


# -------------------------------------------------------------------------------- internals
def _format(body: dict[str, Any], prefix: str) -> None:
    if body.get("format") != FORMAT:
        raise InputError(f"format {_short(body.get('format'))} is unknown; this cloud reads "
                         f"format {FORMAT}", field=prefix + "format")


def _facts(body: dict[str, Any], facts: Facts, prefix: str, *, version_required: bool
           ) -> ModelFacts:
    model = body.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 64:
        raise InputError("'model' must be the model's name", field=prefix + "model")
    version = body.get("version")
    if version is None and version_required:
        raise InputError("'version' is missing: send the model version counted",
                         field=prefix + "version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)
                                or not 0 < version < 10**9):
        raise InputError(f"'version' {_short(version)} is not a version number",
                         field=prefix + "version")
    try:
        return facts(model, version)
    except HybridMLError as exc:  # NotFoundError naming "model" or "version"
        raise InputError(exc.message, field=prefix + str(exc.details.get("field", "model"))
                         ) from None


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise InputError(f"{field.rsplit('.', 1)[-1]} must be a whole number from 0 to "
                         f"{MAX_COUNT}, not {_short(value)}", field=field)
    return value


def _counts(value: Any, field: str, n: int | None) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_BINS:
        raise InputError("'counts' must be a list of whole numbers", field=field)
    if n is not None and len(value) != n:
        raise InputError(f"{len(value)} counts do not fit the profile's {n} bins (edges + 1, "
                         "or categories + 1)", field=field)
    return [_count(v, field) for v in value]


def _tally(value: Any, field: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > 64:
        raise InputError(f"'{field.rsplit('.', 1)[-1]}' must be an object of counts by name",
                         field=field)
    out = {}
    for key, count in value.items():
        if not KEY_RE.fullmatch(key):
            raise InputError(f"key {_short(key)} is not a name (letters, digits, '_.-')",
                             field=f"{field}.{printable(key, 64)}")
        out[key] = _count(count, f"{field}.{key}")
    return out


def _flag(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{field.rsplit('.', 1)[-1]} must be true or false", field=field)
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = printable(repr(value), limit)
    return text
