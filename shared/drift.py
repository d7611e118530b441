"""Drift: how far a window's bin counts are from the reference profile, and what that means.

docs/monitoring.md §2 is the contract. Everything here is numpy + standard library: the device
runs it on every report and the cloud on counts summed over devices (:func:`merge_counts`).

* Distances on shares floored at :data:`FLOOR` (then renormalised): :func:`psi`,
  :func:`js_distance` (base 2, in [0, 1]), :func:`ks_binned`, :func:`linf`. Distances, not
  p-values: a test's p-value calls everything drifted once windows are large.
* :func:`status` — ``insufficient`` / ``ok`` / ``warn`` / ``alert`` from PSI, by
  :class:`Thresholds`.
* :func:`feature_report` — one feature's entry; :func:`drift_report` — the whole report, with
  the dataset-drift rule.

The binning itself (:func:`bin_index`, :func:`category_index`, :class:`Profile`) lives in
:mod:`hybridml.shared.reference` and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, DataError
from .reference import (
    ColumnProfile,
    Profile,
    Tally,
    bin_index,
    category_index,
)
from .schema import NUMERIC
from .settings import load_env

FORMAT = 1
# Both shares of every bin are floored here before the logarithms: an empty bin on one side
# would otherwise make PSI infinite. 1e-4 caps one empty bin's contribution at ~p·ln(p/1e-4).
FLOOR = 1e-4
INSUFFICIENT, OK, WARN, ALERT = "insufficient", "ok", "warn", "alert"
STATUSES = (INSUFFICIENT, OK, WARN, ALERT)


@dataclass(frozen=True)
class Thresholds:
    """When a distance becomes a warning or an alert (``HYBRIDML_DRIFT_*`` variables).

    * ``warn`` 0.1 and ``alert`` 0.25 — PSI's industry rules of thumb (credit scoring): below
      0.1 no meaningful change, 0.1–0.25 a moderate one, above 0.25 a major shift.
    * ``min_rows`` 500 and ``rows_per_bin`` 40 — a feature is judged when the window has
      ``min_rows`` rows and it has ``rows_per_bin * (bins - 1)`` values in bins (440 for 12
      bins, 2,000 for a 51-bin categorical), else it is ``insufficient``. On an unchanged
      stream PSI is sampling noise of about χ²(bins − 1)/values: tests/shared/test_drift.py
      measures the 99.9th percentile of a 12-bin feature's PSI at ~0.06 at 500 values (~0.07
      at 440: under ``warn``) but ~0.33 at 100 (over ``alert``); a 51-bin categorical at 500
      values is in ``warn`` in most stable windows, at 2,000 its 99.9th percentile is ~0.05.
    * ``unseen_alert`` 0.1 — a tenth of a categorical's values unknown to the model is an
      alert whatever PSI says: the model sees those rows with an all-zero one-hot.
    * ``missing_alert`` 0.1 — a numeric feature's missing share moving this far from the
      reference's is an alert (a dead sensor sends NaN, which PSI never sees).
    * ``top_features`` 3 and ``dataset_share`` 0.5 — dataset drift when any of the 3 most
      important features is in alert, or at least half the judged ones (Evidently's default
      share).
    """

    warn: float = 0.1
    alert: float = 0.25
    min_rows: int = 500
    rows_per_bin: int = 40
    unseen_alert: float = 0.1
    missing_alert: float = 0.1
    top_features: int = 3
    dataset_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.warn <= self.alert:
            raise ConfigError(f"drift thresholds need 0 < warn <= alert, got warn={self.warn} "
                              f"alert={self.alert}", field="warn")
        for name in ("min_rows", "rows_per_bin"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}",
                                  field=name)
        for name in ("unseen_alert", "missing_alert", "dataset_share"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name} is a share in (0, 1], got {value}", field=name)
        if self.top_features < 0:
            raise ConfigError(f"top_features must be 0 or more, got {self.top_features}",
                              field="top_features")

    def judges(self, window_rows: int, values: int, n_bins: int) -> bool:
        """True when a feature of ``n_bins`` bins with ``values`` of ``window_rows`` rows in
        its bins has enough of both to be judged."""
        return window_rows >= self.min_rows and values >= self.rows_per_bin * (n_bins - 1)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Thresholds:
        """Defaults overridden by ``HYBRIDML_DRIFT_WARN``, ``HYBRIDML_DRIFT_MIN_ROWS``, ..."""
        return load_env(cls, prefix="HYBRIDML_DRIFT_", env=env)


DEFAULT = Thresholds()


def psi(ref_props: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """Population stability index Σ (q − p)·ln(q/p) of the window's shares ``q`` (from
    ``counts``) against the reference ``p``, both floored at :data:`FLOOR` and renormalised."""
    p, q = _shares(ref_props, counts)
    return float(np.sum((q - p) * np.log(q / p)))


def js_distance(ref_props: Sequence[float] | np.ndarray,
                counts: Sequence[int] | np.ndarray) -> float:
    """Jensen–Shannon distance (the square root of the divergence), base 2: 0 for equal
    distributions, 1 for disjoint ones."""
    p, q = _shares(ref_props, counts)
    m = (p + q) / 2
    div = 0.5 * float(np.sum(p * np.log2(p / m))) + 0.5 * float(np.sum(q * np.log2(q / m)))
    return float(np.sqrt(min(max(div, 0.0), 1.0)))


def ks_binned(ref_props: Sequence[float] | np.ndarray,
              counts: Sequence[int] | np.ndarray) -> float:
    """Kolmogorov–Smirnov statistic of the binned distributions: the largest absolute
    difference of their cumulative shares."""
    p, q = _shares(ref_props, counts)
    return float(np.max(np.abs(np.cumsum(p) - np.cumsum(q))))


def linf(ref_props: Sequence[float] | np.ndarray, counts: Sequence[int] | np.ndarray) -> float:
    """L∞ distance: the largest absolute difference of one bin's shares."""
    p, q = _shares(ref_props, counts)
    return float(np.max(np.abs(p - q)))


def status(psi: float | None, rows: int, *, warn: float = Thresholds.warn,
           alert: float = Thresholds.alert, min_rows: int = Thresholds.min_rows) -> str:
    """``insufficient`` below ``min_rows`` rows (or without a PSI); else ``ok`` below
    ``warn``, ``warn`` below ``alert``, and ``alert`` from ``alert`` up."""
    if psi is None or rows < min_rows:
        return INSUFFICIENT
    if psi < warn:
        return OK
    return WARN if psi < alert else ALERT


def feature_report(name: str, ref: Mapping[str, Any] | ColumnProfile,
                   counts: Sequence[int] | np.ndarray, missing: int, unseen: int = 0, *,
                   thresholds: Thresholds = DEFAULT) -> dict[str, Any]:
    """One feature's entry of the drift report (docs/monitoring.md §2).

    ``ref`` is the feature's profile entry; ``counts`` the window's bin counts on it; ``rows``
    in the entry is ``sum(counts)``, the values compared. Numeric: missing values are not in a
    bin, so the window has ``rows + missing`` rows; the status comes from PSI, or is ``alert``
    when the missing share (``missing / (rows + missing)``) is ``missing_alert`` or more away
    from the reference's. Categorical: ``""`` and unseen values are in the bins (the window has
    ``rows`` rows), ``missing`` and ``unseen`` are shares of it, and an unseen share of
    ``unseen_alert`` or more is an ``alert`` whatever PSI says. PSI is judged only on enough
    rows and values (:meth:`Thresholds.judges`), the shares on ``min_rows`` rows.
    """
    col = ref if isinstance(ref, ColumnProfile) else ColumnProfile.from_json(ref, name, name)
    c = _counts(counts, col.n_bins, name)
    rows = int(c.sum())
    out: dict[str, Any] = {"name": name, "kind": col.kind, "rows": rows}
    measures = {"psi": psi, "js": js_distance, "ks": ks_binned} if col.kind == NUMERIC \
        else {"psi": psi, "linf": linf}
    for key, fn in measures.items():
        out[key] = round(fn(col.proportions, c), 6) if rows else None
    t = thresholds
    window = rows + missing if col.kind == NUMERIC else rows
    judged = t.judges(window, rows, col.n_bins)
    out["status"] = status(out["psi"] if judged else None, window, warn=t.warn, alert=t.alert,
                           min_rows=t.min_rows)
    if col.kind == NUMERIC:
        share = missing / window if window else 0.0
        out["missing"] = round(share, 6)
        if window >= t.min_rows and abs(share - col.missing) >= t.missing_alert:
            out["status"] = ALERT
    else:
        out["missing"] = round(missing / rows, 6) if rows else 0.0
        out["unseen"] = round(unseen / rows, 6) if rows else 0.0
        if rows >= t.min_rows and unseen / rows >= t.unseen_alert:
            out["status"] = ALERT
    return out


def drift_report(profile: Profile | Mapping[str, Any], summary: Mapping[str, Any], *,
                 model: str | None = None, version: int | None = None,
                 window: Mapping[str, Any] | None = None,
                 thresholds: Thresholds = DEFAULT) -> dict[str, Any]:
    """The drift report of a summary's counts (one device's window, or :func:`merge_counts`
    of many) against ``profile`` (a :class:`Profile` or its JSON).

    ``model``, ``version`` and ``window`` default to the summary's own. A feature the summary
    has no counts for, or counts of another length, is a :class:`DataError`: the summary was
    made with another profile. ``dataset_drift`` is true when at least ``dataset_share`` of
    the judged (not ``insufficient``) features are in ``alert``, or any of the
    ``top_features`` most important ones is. Features are reported in the profile's order:
    schema order for ``Profile.of(manifest)``, the JSON object's for a bare profile.
    """
    prof = profile if isinstance(profile, Profile) else Profile.from_json(profile)
    _check_format(summary)
    counted = summary.get("features")
    if not isinstance(counted, Mapping):
        raise DataError("the summary has no 'features' counts", field="features")
    features = [_entry_report(f, counted.get(f.name), f"features.{f.name}", thresholds)
                for f in prof.features]
    judged = [f for f in features if f["status"] != INSUFFICIENT]
    alerts = {f["name"] for f in judged if f["status"] == ALERT}
    top = set(prof.top_features(thresholds.top_features))
    dataset = bool(alerts) and (len(alerts) >= thresholds.dataset_share * len(judged)
                                or bool(alerts & top))
    conf = None
    if prof.confidence is not None:
        conf = _entry_report(prof.confidence, summary.get("confidence"), "confidence",
                             thresholds)
    rows = summary.get("rows")
    return {
        "format": FORMAT,
        "model": model if model is not None else summary.get("model"),
        "version": version if version is not None else summary.get("version"),
        "rows": int(rows) if isinstance(rows, int) else max(
            (f["rows"] for f in features), default=0),
        "window": dict(window if window is not None else summary.get("window") or {}),
        "features": features,
        "predictions": _entry_report(prof.predictions, summary.get("predictions"),
                                     "predictions", thresholds),
        "confidence": conf,
        "dataset_drift": dataset,
    }


def merge_counts(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary whose counts are the sums of ``summaries`` (the same model version: one
    device's windows, or the fleet's — summing counts weighs each device by its traffic).

    Counts of different lengths, different features, latency edges, models or versions are a
    :class:`DataError`: those summaries were made with different profiles. The window spans
    the earliest start to the latest end.
    """
    items = list(summaries)
    if not items:
        raise DataError("no summaries to merge", field="summaries")
    for s in items:
        _check_format(s)
    first = items[0]
    for key in ("model", "version"):
        values = {s.get(key) for s in items}
        if len(values) > 1:
            raise DataError(f"summaries of different {key}s cannot be summed: "
                            f"{sorted(map(str, values))}", field=key)
    out: dict[str, Any] = {"format": FORMAT, "model": first.get("model"),
                           "version": first.get("version")}
    starts = [s["window"]["start"] for s in items if _has_window(s, "start")]
    ends = [s["window"]["end"] for s in items if _has_window(s, "end")]
    if starts or ends:
        out["window"] = {"start": min(starts) if starts else None,
                         "end": max(ends) if ends else None}
    out["rows"] = sum(_int(s.get("rows", 0), "rows") for s in items)
    for key in ("by_source", "degraded"):
        if any(key in s for s in items):
            out[key] = _sum_maps([s.get(key) or {} for s in items], key)
    if any("latency_ms" in s for s in items):
        out["latency_ms"] = _sum_histograms([s.get("latency_ms") for s in items])
    names = [tuple(sorted(s.get("features") or {})) for s in items]
    if len(set(names)) > 1:
        raise DataError("summaries count different features (made with different profiles): "
                        f"{' vs '.join(', '.join(n) for n in sorted(set(names)))}",
                        field="features")
    out["features"] = {n: _sum_entries([s["features"][n] for s in items], f"features.{n}")
                       for n in names[0]}
    for key in ("predictions", "confidence"):
        entries = [s.get(key) for s in items]
        if any(e is not None for e in entries):
            out[key] = _sum_entries(entries, key)
    out["stale"] = any(bool(s.get("stale")) for s in items)
    return out


# -------------------------------------------------------------------------------- internals
def _shares(ref_props: Sequence[float] | np.ndarray,
            counts: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The floored, renormalised reference and window shares."""
    p = np.asarray(ref_props, dtype=np.float64)
    c = _counts(counts, p.size, "counts")
    total = float(c.sum())
    if total <= 0:
        raise DataError("the window has no counts to compare; a distance needs at least one "
                        "value", field="counts")
    if p.ndim != 1 or (p < 0).any() or p.sum() <= 0:
        raise DataError("reference proportions must be non-negative shares", field="ref_props")
    p = np.maximum(p / p.sum(), FLOOR)
    q = np.maximum(c / total, FLOOR)
    return p / p.sum(), q / q.sum()


def _check_format(summary: Mapping[str, Any]) -> None:
    fmt = summary.get("format", FORMAT)
    if fmt != FORMAT:
        raise DataError(f"summary format {fmt!r} is not supported (this kit reads format "
                        f"{FORMAT}); upgrade hybridml", field="format")


def _counts(counts: Sequence[int] | np.ndarray, n_bins: int, where: str) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.size != n_bins:
        raise DataError(f"{where}: {c.size} counts for {n_bins} reference bins; the counts "
                        "were made with another profile", field=where)
    if not np.isfinite(c).all() or (c < 0).any():
        raise DataError(f"{where}: counts must be non-negative numbers", field=where)
    return c


def _entry_report(col: ColumnProfile, entry: Any, where: str,
                  thresholds: Thresholds) -> dict[str, Any]:
    if not isinstance(entry, Mapping) or "counts" not in entry:
        raise DataError(f"the summary has no counts for {where}; it was made with another "
                        "profile", field=where)
    return feature_report(col.name, col, entry["counts"],
                          _int(entry.get("missing", 0), f"{where}.missing"),
                          _int(entry.get("unseen", 0), f"{where}.unseen"),
                          thresholds=thresholds)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise DataError(f"{where} must be a count, got {str(value)[:40]!r}", field=where)
    return int(value)


def _has_window(summary: Mapping[str, Any], key: str) -> bool:
    window = summary.get("window")
    return isinstance(window, Mapping) and isinstance(window.get(key), str)


def _sum_vectors(vectors: Sequence[Any], where: str) -> list[int]:
    arrays = [np.asarray(v, dtype=np.int64) for v in vectors]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1 or any(a.ndim != 1 for a in arrays):
        raise DataError(f"{where}: counts of lengths {sorted(a.size for a in arrays)} cannot "
                        "be summed (made with different profiles)", field=where)
    if any((a < 0).any() for a in arrays):
        raise DataError(f"{where}: counts must be non-negative", field=where)
    return [int(v) for v in np.sum(arrays, axis=0)]


def _sum_entries(entries: Sequence[Any], where: str) -> dict[str, Any]:
    if not all(isinstance(e, Mapping) and "counts" in e for e in entries):
        raise DataError(f"{where}: every summary needs its counts", field=where)
    out: dict[str, Any] = {"counts": _sum_vectors([e["counts"] for e in entries], where)}
    for key in ("missing", "unseen"):
        if any(key in e for e in entries):
            out[key] = sum(_int(e.get(key, 0), f"{where}.{key}") for e in entries)
    return out


def _sum_maps(maps: Sequence[Any], where: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        if not isinstance(m, Mapping):
            raise DataError(f"{where} must be an object of counts", field=where)
        for k, v in m.items():
            out[k] = out.get(k, 0) + _int(v, f"{where}.{k}")
    return out


def _sum_histograms(hists: Sequence[Any]) -> dict[str, Any]:
    present = [h for h in hists if h is not None]
    if not all(isinstance(h, Mapping) for h in present):
        raise DataError("latency_ms must be {edges, counts}", field="latency_ms")
    edges = {tuple(h.get("edges") or ()) for h in present}
    if len(edges) > 1:
        raise DataError("latency histograms with different edges cannot be summed",
                        field="latency_ms.edges")
    return {"edges": list(next(iter(edges))),
            "counts": _sum_vectors([h.get("counts") for h in present], "latency_ms.counts")}


__all__ = ["ALERT", "DEFAULT", "FLOOR", "FORMAT", "INSUFFICIENT", "OK", "STATUSES", "WARN",
           "ColumnProfile", "Profile", "Tally", "Thresholds", "bin_index", "category_index",
           "drift_report", "feature_report", "js_distance", "ks_binned", "linf", "merge_counts",
           "psi", "status"]
