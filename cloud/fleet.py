"""Drift of many summaries at once: the fleet's, one device's, or per device and window.

Summaries of one model version are summed bin by bin (:func:`hybridml.shared.drift.
merge_counts`) before any distance is computed, so the fleet's drift weighs each device by
its traffic: a device that made 10,000 predictions counts 100 times as much as one that made
100, and a quiet device's noisy window cannot raise an alert on its own.

A period without summaries still has a report: every feature ``insufficient``, 0 rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import Any

from hybridml.shared import drift
from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import NotFoundError

from .ingest import ModelFacts, parse_time

Period = tuple[float | None, float | None]  # (since, until) in POSIX seconds


def report(facts: ModelFacts, summaries: Sequence[dict[str, Any]], period: Period
           ) -> dict[str, Any]:
    """The drift report (docs/monitoring.md §2) of ``summaries`` of ``facts``' version summed;
    the window is ``period`` where given, else the summaries' own span."""
    if facts.profile is None:
        raise NotFoundError(f"{facts.name!r} v{facts.version} has no format-1 reference "
                            "profile (it was trained by an older release): retrain it to "
                            "monitor drift", field="version")
    # Latency is not drift, and devices may bin it on other edges: it is not summed here.
    found = [{k: v for k, v in s.items() if k not in ("latency_ms", "device", "id")}
             for s in summaries]
    merged = drift.merge_counts(found) if found else empty_summary(facts)
    start = period[0] if period[0] is not None else (
        parse_time(found[0]["window"]["start"], "start") if found else None)
    end = period[1] if period[1] is not None else (
        parse_time(found[-1]["window"]["end"], "end") if found else None)
    window = {"start": None if start is None else utc_iso(start),
              "end": None if end is None else utc_iso(end)}
    return drift.drift_report(facts.profile, merged, model=facts.name, version=facts.version,
                              window=window)


def device_windows(facts: ModelFacts, summaries: Sequence[dict[str, Any]],
                   edges: Sequence[float]) -> list[dict[str, Any]]:
    """Per device (by name), one entry per window between consecutive ``edges``: ``{"start",
    "end", "rows", "dataset_drift", "alerts"}`` (the features in alert). A summary is in the
    window its own window ends in."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for s in summaries:
        by_device.setdefault(str(s.get("device")), []).append(s)
    out = []
    for device, found in sorted(by_device.items()):
        ends = [parse_time(s["window"]["end"], "end") for s in found]
        slots = []
        for lo, hi in pairwise(edges):
            part = [s for s, end in zip(found, ends) if lo < end <= hi]
            r = report(facts, part, (lo, hi))
            slots.append({"start": r["window"]["start"], "end": r["window"]["end"],
                          "rows": r["rows"], "dataset_drift": bool(r["dataset_drift"]),
                          "alerts": alerts(r)})
        out.append({"device": device, "windows": slots})
    return out


def alerts(r: dict[str, Any]) -> list[str]:
    """Names of the features in ``alert`` in a drift report."""
    return [f["name"] for f in r.get("features", []) if f.get("status") == drift.ALERT]


def empty_summary(facts: ModelFacts) -> dict[str, Any]:
    """A summary with no rows on the bins of ``facts``' profile."""
    profile = facts.profile or {}

    def zeros(entry: str, name: str | None = None) -> list[int]:
        return [0] * (facts.bins(entry, name) or 1)

    body: dict[str, Any] = {
        "format": 1, "model": facts.name, "version": facts.version, "rows": 0,
        "features": {name: {"counts": zeros("features", name), "missing": 0}
                     for name in profile.get("features") or {}}}
    for key in ("predictions", "confidence"):
        if isinstance(profile.get(key), dict):
            body[key] = {"counts": zeros(key)}
    return body
