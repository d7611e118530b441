"""Performance over time from feedback, and traffic over time, per window of fixed length.

Windows are aligned to multiples of ``window_s`` since the epoch (days start at 00:00 UTC).
A label falls in the window of its ``created`` time; a summary in the window of its middle.

* **Realised**: the task's primary metric (:data:`hybridml.cloud.metrics.PRIMARY`) of the
  labels against the predictions the model made, per version and window; ``estimate`` False.
* **Estimate** (classifiers, where a window has fewer than :data:`MIN_LABELS` labels): the
  expected accuracy from the devices' histograms of the top probability — the mean confidence
  (confidence-based performance estimation). It is right for a calibrated model and says
  nothing about concept drift (the model is as sure as ever while it is wrong more often),
  which is why it is marked ``estimate`` and reported beside labels, never instead of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from hybridml.shared.clock import utc_iso

from . import metrics
from .ingest import parse_time

MIN_LABELS = 30


def windows(task: str, profile: dict[str, Any] | None, window_s: float, version: int,
            labelled: Iterable[tuple[float, Any, Any]], summaries: Sequence[dict[str, Any]]
            ) -> list[dict[str, Any]]:
    """Entries ``{"version", "start", "end", "labels", "metric", "value", "estimate"}`` of one
    version, oldest window first; ``labelled`` holds (time, label, prediction)."""
    pairs: dict[int, list[tuple[Any, Any]]] = {}
    for at, label, prediction in labelled:
        pairs.setdefault(int(at // window_s), []).append((label, prediction))
    edges = _confidence_edges(task, profile)
    conf: dict[int, np.ndarray] = {}
    for s in summaries:
        counts = (s.get("confidence") or {}).get("counts")
        if edges is None or not counts or len(counts) != len(edges) + 1:
            continue
        k = int(_middle(s) // window_s)
        conf[k] = conf.get(k, 0) + np.asarray(counts, dtype=np.float64)
    out = []
    for k in sorted(set(pairs) | set(conf)):
        span = {"version": version, "start": utc_iso(k * window_s),
                "end": utc_iso((k + 1) * window_s)}
        got = pairs.get(k, [])
        if got:
            out.append({**span, "labels": len(got), "metric": metrics.PRIMARY[task],
                        "value": realised(task, [g[0] for g in got], [g[1] for g in got]),
                        "estimate": False})
        if len(got) < MIN_LABELS and k in conf and edges is not None:
            value = expected_accuracy(edges, conf[k])
            if value is not None:
                out.append({**span, "labels": len(got), "metric": "accuracy", "value": value,
                            "estimate": True})
    return out


def realised(task: str, labels: Sequence[Any], predictions: Sequence[Any]) -> float:
    """The primary metric of ``predictions`` against ``labels`` (class values or numbers)."""
    if task == "regression":
        return metrics.primary(task, np.asarray(labels, dtype=np.float64),
                               np.asarray(predictions, dtype=np.float64))
    return metrics.primary(task, np.array([str(v) for v in labels]),
                           np.array([str(v) for v in predictions]))


def expected_accuracy(edges: Sequence[float], counts: Sequence[float] | np.ndarray
                      ) -> float | None:
    """Mean top probability of a confidence histogram (bins as in the profile: low overflow,
    inner bins, high overflow), each bin at its middle; None when it is empty."""
    total = float(np.sum(counts))
    if total <= 0:
        return None
    e = [float(x) for x in edges]
    mids = [e[0], *((a + b) / 2 for a, b in pairwise(e)), e[-1]]
    value = float(np.dot(np.clip(mids, 0.0, 1.0), np.asarray(counts, dtype=np.float64)))
    return round(value / total, 6)


def traffic(summaries: Iterable[dict[str, Any]], window_s: float) -> list[dict[str, Any]]:
    """Rows, rows by source and degraded rows per window, oldest first."""
    slots: dict[int, dict[str, Any]] = {}
    for s in summaries:
        k = int(_middle(s) // window_s)
        slot = slots.setdefault(k, {"start": utc_iso(k * window_s),
                                    "end": utc_iso((k + 1) * window_s), "rows": 0,
                                    "by_source": {}, "degraded": {}})
        slot["rows"] += int(s.get("rows", 0))
        for key in ("by_source", "degraded"):
            for name, n in (s.get(key) or {}).items():
                slot[key][name] = slot[key].get(name, 0) + int(n)
    return [slots[k] for k in sorted(slots)]


def _confidence_edges(task: str, profile: dict[str, Any] | None) -> list[float] | None:
    spec = (profile or {}).get("confidence")
    if task == "regression" or not isinstance(spec, dict) or not spec.get("edges"):
        return None
    return [float(x) for x in spec["edges"]]


def _middle(summary: dict[str, Any]) -> float:
    w = summary["window"]
    return (parse_time(w["start"], "start") + parse_time(w["end"], "end")) / 2
