"""Device summaries built in tests the way a device builds them: rows binned on the version's
profile with :func:`hybridml.shared.drift.bin_index` / :func:`category_index`, counted, and
wrapped in spool records (docs/monitoring.md §4)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.drift import bin_index, category_index


class Span(TypedDict):
    """A summary's window in POSIX seconds (``summary(..., **span)``)."""

    start: float
    end: float


def counts_of(spec: Mapping[str, Any], values: Sequence[Any]) -> dict[str, Any]:
    """``{"counts", "missing"(, "unseen")}`` of ``values`` on one profile entry."""
    if spec["kind"] == "numeric":
        nums = np.array([math.nan if v is None else float(v) for v in values])
        idx = bin_index(spec["edges"], nums)
        return {"counts": np.bincount(idx[idx >= 0], minlength=len(spec["edges"]) + 1)
                .tolist(), "missing": int((idx < 0).sum())}
    cats = ["" if v is None else str(v) for v in values]
    idx = category_index(spec["categories"], cats)
    return {"counts": np.bincount(idx, minlength=len(spec["categories"]) + 1).tolist(),
            "missing": sum(1 for c in cats if c == ""), "unseen": 0}


def summary(manifest: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, start: float,
            end: float, predictions: Sequence[Any] | None = None,
            confidence: Sequence[float] | None = None,
            by_source: Mapping[str, int] | None = None) -> dict[str, Any]:
    """The summary body of ``rows`` (dicts by feature name) seen by ``manifest``'s version.

    ``predictions`` default to values spread over the reference's bins (their drift is not
    what these tests look at); ``confidence`` is required for a classifier's profile.
    """
    prof = manifest["profile"]
    n = len(rows)
    body: dict[str, Any] = {
        "format": 1, "model": manifest["name"], "version": manifest["version"],
        "window": {"start": utc_iso(start), "end": utc_iso(end)}, "rows": n,
        "by_source": dict(by_source or {"edge": n}), "degraded": {},
        "features": {name: counts_of(spec, [r.get(name) for r in rows])
                     for name, spec in prof["features"].items()},
        "stale": False}
    pspec = prof["predictions"]
    if predictions is None:
        if pspec["kind"] == "numeric":
            e = pspec["edges"]
            predictions = list(np.linspace(e[0], e[-1], n))
        else:
            predictions = [pspec["categories"][i % len(pspec["categories"])] for i in range(n)]
    body["predictions"] = {"counts": counts_of(pspec, predictions)["counts"]}
    if "confidence" in prof:
        body["confidence"] = {"counts": counts_of(prof["confidence"],
                                                  list(confidence or [0.9] * n))["counts"]}
    return body


def records(store_id: str, bodies: Iterable[Mapping[str, Any]], first: int = 1,
            kind: str = "summary") -> list[dict[str, Any]]:
    """Spool records ``<store id>:<sequence>`` wrapping ``bodies``."""
    return [{"id": f"{store_id}:{first + i}", "kind": kind, "priority": 1,
             "created": "2026-12-01T16:00:00Z", "body": dict(b)}
            for i, b in enumerate(bodies)]


def shifted(rows: Sequence[Mapping[str, Any]], feature: str, by: float
            ) -> list[dict[str, Any]]:
    """``rows`` with ``feature`` moved by ``by`` (missing values stay missing)."""
    return [{**r, feature: None if r[feature] is None else r[feature] + by} for r in rows]
