"""What a rollout's analysis reads from telemetry, summed per arm (docs/rollouts.md §5).

The analysis (:mod:`hybridml.cloud.rollout_analysis`) asks the telemetry store only the three
queries of :class:`RolloutTelemetry` (summaries, events, feedback), so another store plugs in
here as it does in :mod:`hybridml.cloud.evidence`. The functions below are pure sums:

* :func:`traffic` — summaries of one version: rows, degraded rows, local inference failures
  per device and the merged latency histogram. A *local failure* is a degraded row whose
  fallback reason (:data:`hybridml.edge.fallback.REASONS`) is ``local_error`` or
  ``no_local_model``: the device's own model failed and the cloud did not answer either.
  (A local failure the cloud did answer is not visible in a summary: it is a ``cloud`` row.)
* :func:`p99` — the upper edge of the latency bin holding the 99th percentile of calls (the
  last edge when it falls in the overflow bin: a lower bound, said in ``detail``).
* :func:`shadow` / :func:`interleave` — a rollout's shadow and interleave records summed.
* :func:`labels` — feedback judged against the prediction of one version: the realised
  metric (:func:`hybridml.cloud.performance.realised`, the one metric code) and the inputs
  of the tests: rows correct (classifiers) or squared errors' mean and variance (regression).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from . import metrics, performance
from .fields import parse_time
from .telemetry import FeedbackRow

LOCAL_FAILURES = ("local_error", "no_local_model")


@runtime_checkable
class RolloutTelemetry(Protocol):
    """What the analysis asks of the telemetry store (``since``/``until``: POSIX seconds)."""

    def summaries(self, model: str, version: int | None = None, since: Any = None,
                  until: Any = None, device: str | None = None) -> list[dict[str, Any]]:
        """Summary bodies (with ``device``) whose window ends in (since, until]."""

    def events(self, model: str, kind: str, *, since: Any = None, until: Any = None
               ) -> list[dict[str, Any]]:
        """Event bodies of ``kind`` (with ``device``) in (since, until]."""

    def feedback_at(self, model: str, *, since: Any = None, until: Any = None
                    ) -> list[FeedbackRow]:
        """Feedback created in (since, until] (the device's clock, as summaries' windows are),
        with version, prediction and device."""


def wilson(x: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``x / n`` (95 % by default); (0, 1) for n 0.
    Unlike the normal interval it stays inside [0, 1] and is sound for a few rows."""
    if n <= 0:
        return 0.0, 1.0
    p = x / n
    mid = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, mid - half), min(1.0, mid + half)


@dataclass
class Histogram:
    """Latency counts on one set of edges (bin 0 below the first edge, the last above)."""

    edges: list[float]
    counts: list[int]

    def add(self, hist: dict[str, Any] | None) -> bool:
        """Add ``hist`` when it has the same edges; False (not added) otherwise."""
        if not hist or list(hist.get("edges") or []) != self.edges:
            return False
        self.counts = [a + int(b) for a, b in zip(self.counts, hist["counts"])]
        return True

    @classmethod
    def merged(cls, hists: Iterable[dict[str, Any] | None]) -> Histogram | None:
        """The sum of ``hists`` on the first one's edges (others on other edges are left
        out); None when there is none."""
        out: Histogram | None = None
        for h in hists:
            if not h or not h.get("edges"):
                continue
            if out is None:
                out = cls([float(e) for e in h["edges"]], [0] * (len(h["edges"]) + 1))
            out.add(h)
        return out


def p99(hist: Histogram | None) -> tuple[float | None, str]:
    """(p99 in ms, how it was read), interpolated linearly inside the bin that holds the 99th
    percentile, as Prometheus' ``histogram_quantile`` does (the first bin starts at 0); a
    percentile past the last edge reads as that edge, a lower bound. None without counts.

    Interpolation, not the bin's upper edge: the latency edges are 2-2.5x apart, so reading
    edges alone turns any shift of the tail into a ratio of 2 or more against a bound of 1.5.
    """
    if hist is None or sum(hist.counts) == 0:
        return None, "no latency counts"
    total, seen = sum(hist.counts), 0
    rank = 0.99 * total
    for i, n in enumerate(hist.counts):
        if n and seen + n >= rank:
            if i >= len(hist.edges):
                return hist.edges[-1], f"the 99th percentile of {total} calls is above the " \
                                       f"last edge: {hist.edges[-1]} ms is a lower bound"
            lo = hist.edges[i - 1] if i else 0.0
            value = lo + (hist.edges[i] - lo) * (rank - seen) / n
            return round(value, 4), f"interpolated in the bin {lo:g}-{hist.edges[i]:g} ms " \
                                    f"holding the 99th percentile of {total} calls"
        seen += n
    return hist.edges[-1], "rounding"  # pragma: no cover - seen reaches total


@dataclass
class Traffic:
    """Summaries of one version summed: per-device rows, failures, and the latency."""

    rows: int = 0
    degraded: int = 0
    devices: dict[str, int] = field(default_factory=dict)  # device -> rows
    failures: dict[str, int] = field(default_factory=dict)  # device -> local failures
    last: dict[str, float] = field(default_factory=dict)  # device -> newest window end
    latency: Histogram | None = None

    def error_rate(self) -> float | None:
        """Degraded rows (local failures included) per row; None without rows."""
        return self.degraded / self.rows if self.rows else None


def traffic(summaries: Iterable[dict[str, Any]], exclude: Collection[str] = ()) -> Traffic:
    """Sum ``summaries`` (one version), leaving out devices in ``exclude``."""
    out = Traffic()
    hists = []
    for s in summaries:
        dev = str(s.get("device"))
        if dev in exclude:
            continue
        rows = int(s.get("rows", 0))
        degraded = s.get("degraded") or {}
        out.rows += rows
        out.degraded += sum(int(n) for n in degraded.values())
        out.devices[dev] = out.devices.get(dev, 0) + rows
        fails = sum(int(degraded.get(k, 0)) for k in LOCAL_FAILURES)
        if fails:
            out.failures[dev] = out.failures.get(dev, 0) + fails
        end = parse_time(s["window"]["end"], "end")
        out.last[dev] = max(out.last.get(dev, end), end)
        hists.append(s.get("latency_ms"))
    out.latency = Histogram.merged(hists)
    return out


@dataclass
class ShadowTotals:
    """A rollout's shadow records summed."""

    rows: int = 0
    agree: int = 0
    errors: int = 0
    devices: dict[str, int] = field(default_factory=dict)  # device -> compared rows
    latency: Histogram | None = None

    def agreement(self) -> float | None:
        """Share of compared rows that agree; None without rows."""
        return self.agree / self.rows if self.rows else None

    def error_rate(self) -> float | None:
        """Share of the companion's rows that failed; None when it ran on none."""
        ran = self.rows + self.errors
        return self.errors / ran if ran else None


def shadow(records: Iterable[dict[str, Any]], rollout: int,
           devices: Collection[str] | None = None) -> ShadowTotals:
    """The shadow records of ``rollout`` (from ``devices`` only, when given) summed."""
    out = ShadowTotals()
    hists = []
    for r in records:
        dev = str(r.get("device"))
        if r.get("rollout") != rollout or (devices is not None and dev not in devices):
            continue
        out.rows += int(r["rows"])
        out.agree += int(r["agree"])
        out.errors += int(r["errors"])
        if r["rows"]:
            out.devices[dev] = out.devices.get(dev, 0) + int(r["rows"])
        hists.append(r.get("latency_ms"))
    out.latency = Histogram.merged(hists)
    return out


def interleave(records: Iterable[dict[str, Any]], rollout: int) -> dict[str, Any]:
    """The interleave records of ``rollout`` summed: impressions, clicks, wins, ties, and
    the devices that sent them."""
    keys = ("impressions", "clicks", "credited_a", "credited_b", "wins_a", "wins_b", "ties")
    out: dict[str, Any] = dict.fromkeys(keys, 0)
    devices: set[str] = set()
    for r in records:
        if r.get("rollout") != rollout:
            continue
        for k in keys:
            out[k] += int(r[k])
        devices.add(str(r.get("device")))
    out["devices"] = len(devices)
    return out


@dataclass(frozen=True)
class Labels:
    """Feedback of one arm judged against that arm's predictions."""

    n: int
    correct: int  # classifiers: rows predicted right
    mean_sq: float  # regression: mean squared error
    var_sq: float  # regression: sample variance of the squared errors
    value: float | None  # the task's primary metric (performance.realised), None without rows
    metric: str
    devices: int  # devices that sent them

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"labels": self.n, "metric": self.metric, "value": self.value,
                "correct": self.correct, "mean_sq_error": round(self.mean_sq, 9),
                "devices": self.devices}


def labels(rows: Sequence[FeedbackRow], task: str, version: int,
           accept: Any = None) -> Labels:
    """Feedback rows judging ``version``'s predictions (``accept(device)`` True, when given)."""
    pairs = [(r.label, r.prediction, r.device) for r in rows
             if r.version == version and r.prediction is not None
             and (accept is None or accept(r.device))]
    metric = metrics.PRIMARY[task]
    if not pairs:
        return Labels(0, 0, 0.0, 0.0, None, metric, 0)
    ys, ps = [p[0] for p in pairs], [p[1] for p in pairs]
    value = performance.realised(task, ys, ps)
    devices = len({p[2] for p in pairs})
    if task == "regression":
        sq = [(float(y) - float(p)) ** 2 for y, p in zip(ys, ps)]
        mean = sum(sq) / len(sq)
        var = sum((s - mean) ** 2 for s in sq) / (len(sq) - 1) if len(sq) > 1 else 0.0
        return Labels(len(sq), 0, mean, var, value, metric, devices)
    correct = sum(1 for y, p in zip(ys, ps) if str(y) == str(p))
    return Labels(len(pairs), correct, 0.0, 0.0, value, metric, devices)
