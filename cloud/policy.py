"""Training policies and their triggers: when should a model be trained again?

A :class:`Policy` per model lives in the registry (``Registry.set_policy``). Its triggers are
evaluated by :func:`evaluate`, a pure function of the policy and an :class:`Evidence`
snapshot (gathered by :mod:`hybridml.cloud.evidence`), so every rule here is tested without
a clock, a store or a model:

==============  ==============================================================================
trigger         fires when
==============  ==============================================================================
``time``        ``every_s`` seconds have passed since the latest version was trained
``performance`` the realised metric of the active version, over its most recent windows
                holding at least ``min_labels`` labels, is below ``min_metric`` (above it for
                RMSE, where lower is better); estimates from confidence never count
``data``        labelled rows that arrived since the last training are at least
                ``new_data_fraction`` of the line's training rows (its base retrain's), or
                at least ``new_data_rows``
``drift``       at least ``drift_devices`` of the reporting devices, weighted by their rows,
                were in dataset drift in each of the last 2 windows of ``drift_window_s``
==============  ==============================================================================

Any trigger fires the decision, unless the last fired decision was less than ``cooldown_s``
ago: then the decision is **held** (recorded, not acted on). A trigger whose setting is None
is off. ``mode`` (auto, finetune, retrain) says how the candidate is trained, ``window_s`` and
``reservoir_rows`` what it trains on (:mod:`hybridml.cloud.trainset`), and ``auto_promote``
whether a blessed candidate becomes ``stable``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from hybridml.shared.clock import format_duration, parse_duration, utc_iso
from hybridml.shared.errors import ConfigError

MODES = ("auto", "finetune", "retrain")
TRIGGERS = ("time", "performance", "data", "drift")
# How the controller ships a blessed candidate (None: auto_promote decides, at once). A/B
# needs arms a person chooses; these three take one candidate beside stable.
ROLLOUTS = (None, "shadow", "canary", "interleave")
DRIFT_WINDOWS = 2
LOWER_IS_BETTER = frozenset({"rmse", "mae"})


@dataclass(frozen=True)
class Policy:
    """When to train a model again, how, and what to do with a blessed candidate."""

    every_s: float | None = None
    min_metric: float | None = None
    min_labels: int = 200
    new_data_fraction: float | None = None
    new_data_rows: int | None = None
    drift_devices: float | None = None
    mode: str = "auto"
    cooldown_s: float = 6 * 3600.0
    auto_promote: bool = False
    rollout: str | None = None  # shadow, canary or interleave: how a blessed candidate ships
    window_s: float | None = None  # None: every labelled row since the line's base is new
    reservoir_rows: int = 100_000
    drift_window_s: float = 3600.0

    def __post_init__(self) -> None:
        _positive(self.every_s, "every_s", allow_none=True)
        _positive(self.window_s, "window_s", allow_none=True)
        _positive(self.drift_window_s, "drift_window_s", allow_none=False)
        _positive(self.cooldown_s, "cooldown_s", allow_none=False, allow_zero=True)
        for name in ("min_labels", "reservoir_rows", "new_data_rows"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ConfigError(f"{name} must be a whole number >= 0, got {v!r}", field=name)
        for name in ("new_data_fraction", "drift_devices"):
            v = getattr(self, name)
            if v is not None and not (_number(v) and 0 < v <= 1):
                raise ConfigError(f"{name} must be a share in (0, 1] such as 0.05 (or '5%'), "
                                  f"got {v!r}", field=name)
        if self.min_metric is not None and not _number(self.min_metric):
            raise ConfigError(f"min_metric must be a number, got {self.min_metric!r}",
                              field="min_metric")
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r}: use one of {', '.join(MODES)}",
                              field="mode")
        if not isinstance(self.auto_promote, bool):
            raise ConfigError("auto_promote must be true or false", field="auto_promote")
        if self.rollout not in ROLLOUTS:
            raise ConfigError(f"rollout {str(self.rollout)[:40]!r}: use one of "
                              f"{', '.join(r for r in ROLLOUTS if r)}, or off (promote or "
                              "keep the candidate as auto_promote says)", field="rollout")

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in the registry."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Policy:
        """Parse a stored or user-given policy; ConfigError naming an unknown key."""
        if not isinstance(data, Mapping):
            raise ConfigError("a policy must be a JSON object", field="policy")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown policy key {unknown[0]!r}; the keys are "
                              f"{', '.join(sorted(known))}", field=unknown[0])
        return cls(**dict(data))

    def updated(self, **changes: Any) -> Policy:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    @property
    def enabled(self) -> list[str]:
        """The triggers that are on."""
        on = {"time": self.every_s is not None, "performance": self.min_metric is not None,
              "data": self.new_data_fraction is not None or self.new_data_rows is not None,
              "drift": self.drift_devices is not None}
        return [t for t in TRIGGERS if on[t]]


@dataclass(frozen=True)
class Evidence:
    """What the triggers look at, gathered at one moment (POSIX seconds)."""

    now: float
    active: int | None  # the version devices run (``stable``)
    latest: int | None  # the newest version: its training is "the last training"
    last_trained: float | None
    training_rows: int  # the rows the line's base retrain was trained on
    labelled_since: int  # labelled rows arrived since the last training
    metric: str  # the task's primary metric
    performance: Sequence[Mapping[str, Any]] = ()  # the active version's windows, any order
    device_drift: Sequence[Mapping[str, Any]] = ()  # per device, the last windows
    last_fired: float | None = None  # the last fired decision: the cooldown runs from it

    def to_json(self) -> dict[str, Any]:
        """A compact JSON record of the evidence (stored with the decision)."""
        return {"now": utc_iso(self.now), "active": self.active, "latest": self.latest,
                "last_trained": None if self.last_trained is None
                else utc_iso(self.last_trained),
                "training_rows": self.training_rows, "labelled_since": self.labelled_since,
                "metric": self.metric}


@dataclass(frozen=True)
class Trigger:
    """One trigger's verdict, with the numbers it was judged on."""

    name: str
    fired: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"name": self.name, "fired": self.fired, "reason": self.reason,
                "evidence": self.evidence}


@dataclass(frozen=True)
class Decision:
    """The verdict of one evaluation: fire (train a candidate) or not, and why."""

    time: float
    fired: bool
    held: bool  # a trigger fired, but the cooldown held it
    cooldown_until: float | None
    triggers: tuple[Trigger, ...]
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        """The JSON recorded in the registry's decisions."""
        return {"time": utc_iso(self.time), "fired": self.fired, "held": self.held,
                "cooldown_until": None if self.cooldown_until is None
                else utc_iso(self.cooldown_until),
                "triggers": [t.to_json() for t in self.triggers],
                "evidence": self.evidence.to_json()}


def evaluate(policy: Policy, ev: Evidence) -> Decision:
    """Judge every trigger of ``policy`` on ``ev``, then apply the cooldown."""
    triggers = (time_trigger(policy, ev), performance_trigger(policy, ev),
                data_trigger(policy, ev), drift_trigger(policy, ev))
    until = None if ev.last_fired is None else ev.last_fired + policy.cooldown_s
    any_fired = any(t.fired for t in triggers)
    held = any_fired and until is not None and ev.now < until
    return Decision(ev.now, any_fired and not held, held, until, triggers, ev)


def time_trigger(policy: Policy, ev: Evidence) -> Trigger:
    """Fires ``every_s`` seconds after the last training."""
    if policy.every_s is None:
        return Trigger("time", False, "off")
    if ev.last_trained is None:
        return Trigger("time", False, "nothing trained yet")
    age = ev.now - ev.last_trained
    fired = age >= policy.every_s
    return Trigger("time", fired, f"last trained {format_duration(age)} ago; every "
                   f"{format_duration(policy.every_s)}",
                   {"since_training_s": round(age, 3), "every_s": policy.every_s})


def performance_trigger(policy: Policy, ev: Evidence) -> Trigger:
    """Fires when the active version's realised metric, over its most recent windows holding
    ``min_labels`` labels, falls past ``min_metric``."""
    if policy.min_metric is None:
        return Trigger("performance", False, "off")
    windows = sorted((w for w in ev.performance if not w.get("estimate")
                      and w.get("version") == ev.active and int(w.get("labels") or 0) > 0),
                     key=lambda w: str(w.get("end")), reverse=True)
    used: list[Mapping[str, Any]] = []
    for w in windows:
        used.append(w)
        if sum(int(u["labels"]) for u in used) >= policy.min_labels:
            break
    labels = sum(int(u["labels"]) for u in used)
    evidence: dict[str, Any] = {"labels": labels, "min_labels": policy.min_labels,
                                "metric": ev.metric, "bound": policy.min_metric,
                                "windows": len(used)}
    if labels < policy.min_labels or not used:
        return Trigger("performance", False, f"{labels} labels of v{ev.active}; "
                       f"{policy.min_labels} needed", evidence)
    value = _pooled(ev.metric, used)
    evidence["value"] = value
    worse = value > policy.min_metric if ev.metric in LOWER_IS_BETTER \
        else value < policy.min_metric
    side = "above" if ev.metric in LOWER_IS_BETTER else "below"
    return Trigger("performance", worse, f"{ev.metric} {value:.4f} on {labels} labels is "
                   f"{side if worse else 'not ' + side} {policy.min_metric}", evidence)


def data_trigger(policy: Policy, ev: Evidence) -> Trigger:
    """Fires when enough labelled rows arrived since the last training."""
    if policy.new_data_fraction is None and policy.new_data_rows is None:
        return Trigger("data", False, "off")
    bounds = [b for b in (policy.new_data_rows, None if policy.new_data_fraction is None
                          else math.ceil(policy.new_data_fraction * ev.training_rows))
              if b is not None]
    need = max(1, min(bounds))
    fired = ev.labelled_since >= need
    return Trigger("data", fired, f"{ev.labelled_since} new labelled rows; {need} needed "
                   f"({ev.training_rows} training rows)",
                   {"labelled_since": ev.labelled_since, "needed": need,
                    "training_rows": ev.training_rows})


def drift_trigger(policy: Policy, ev: Evidence) -> Trigger:
    """Fires when a traffic-weighted share of reporting devices was in dataset drift in each
    of the last :data:`DRIFT_WINDOWS` windows."""
    if policy.drift_devices is None:
        return Trigger("drift", False, "off")
    total = drifting = 0
    alerting: list[str] = []
    for d in ev.device_drift:
        windows = list(d.get("windows") or [])[-DRIFT_WINDOWS:]
        rows = sum(int(w.get("rows") or 0) for w in windows)
        if rows <= 0:
            continue  # not reporting
        total += rows
        if len(windows) == DRIFT_WINDOWS and all(w.get("dataset_drift") is True
                                                  for w in windows):
            drifting += rows
            alerting.append(str(d.get("device")))
    share = drifting / total if total else 0.0
    fired = total > 0 and share >= policy.drift_devices
    return Trigger("drift", fired, f"{share:.0%} of the traffic of reporting devices drifted in "
                   f"{DRIFT_WINDOWS} consecutive windows; {policy.drift_devices:.0%} needed",
                   {"share": round(share, 6), "rows": total, "devices": sorted(alerting),
                    "needed": policy.drift_devices})


# -------------------------------------------------------------------------- CLI value parsing
def parse_duration_or_off(text: str, field: str) -> float | None:
    """``90m``, ``6h``, ``7d`` as seconds; ``off`` as None (the setting is switched off)."""
    return None if str(text).strip().lower() == "off" else parse_duration(text, field)


def parse_share(text: str, field: str) -> float | None:
    """``0.2`` or ``20%`` as 0.2; ``off`` as None."""
    t = str(text).strip().lower()
    if t == "off":
        return None
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise ConfigError(f"{field} {text!r}: write a share such as 0.2 or 20% (or 'off')",
                          field=field)
    return value


def parse_new_data(text: str) -> tuple[float | None, int | None]:
    """``--new-data``: ``5%`` is a share of the training rows, ``500`` a row count, ``off``
    neither. Returns ``(new_data_fraction, new_data_rows)``."""
    t = str(text).strip().lower()
    if t == "off":
        return None, None
    if t.endswith("%"):
        return parse_share(t, "new_data"), None
    if t.isdigit() and int(t) > 0:
        return None, int(t)
    raise ConfigError(f"--new-data {text!r}: write a share of the training rows such as 5%, "
                      "a number of rows such as 500, or 'off'", field="new_data")


# -------------------------------------------------------------------------------- internals
def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: Any, name: str, *, allow_none: bool, allow_zero: bool = False) -> None:
    if v is None and allow_none:
        return
    if not _number(v) or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a positive number of seconds (e.g. '6h'), got {v!r}",
                          field=name)


def _pooled(metric: str, windows: Sequence[Mapping[str, Any]]) -> float:
    """The label-weighted metric over windows (RMSE: the root of the pooled mean square)."""
    n = [int(w["labels"]) for w in windows]
    v = [float(w["value"]) for w in windows]
    if metric == "rmse":
        return round(math.sqrt(sum(k * x * x for k, x in zip(n, v)) / sum(n)), 6)
    return round(sum(k * x for k, x in zip(n, v)) / sum(n), 6)


__all__ = ["DRIFT_WINDOWS", "MODES", "TRIGGERS", "Decision", "Evidence", "Policy", "Trigger",
           "data_trigger", "drift_trigger", "evaluate", "parse_duration_or_off",
           "parse_new_data", "parse_share", "performance_trigger", "time_trigger"]
