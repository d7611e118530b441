"""The settings of one rollout (``rollouts.config``, docs/rollouts.md §1): defaults and checks.

Each key applies to some strategies only; a key given for a strategy it does not apply to is
a :class:`ConfigError` (a ``steps`` on a shadow rollout is a mistake, not a no-op). Keys that
do not apply stay ``None`` and are left out of :meth:`Config.to_json`.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from hybridml.shared.errors import ConfigError

ALL = ("shadow", "canary", "ab", "interleave")
DAY = 86400.0
# key -> the strategies it applies to
APPLIES: dict[str, tuple[str, ...]] = {
    "sample": ("shadow", "canary"), "devices": ("shadow", "interleave"),
    "min_predictions": ("shadow",), "min_devices": ALL, "steps": ("canary",),
    "dwell_s": ("canary",), "report_timeout_s": ("canary",), "split": ("ab",),
    "metric": ("ab",), "alpha": ("ab", "interleave"), "min_samples": ("ab", "interleave"),
    "max_duration_s": ("ab", "interleave", "shadow"), "agreement": ("shadow", "canary"),
    "tolerance": ("shadow", "canary"), "latency_ratio": ("shadow", "canary"),
    "latency_floor_ms": ("shadow", "canary"),
    "error_margin": ("canary",), "metric_margin": ("canary",), "auto_promote": ("shadow",),
}
_METRIC_RE = re.compile(r"[a-z][a-z0-9_]{0,39}")
# What an A/B test can compare per label: a proportion (two-proportion z-test) for classifiers,
# a mean (Welch) for regression. Balanced accuracy, F1 or AUC are not sums over independent
# labels, so they have no such test; the first of each is the default.
AB_METRICS = {"classifier": ("accuracy", "error_rate"), "regression": ("mse", "rmse")}


@dataclass(frozen=True)
class Config:
    """A rollout's settings; ``None`` where a key does not apply to its strategy."""

    sample: float | None = None
    devices: float | None = None
    min_predictions: int | None = None
    min_devices: int | None = None
    steps: tuple[float, ...] | None = None
    dwell_s: float | None = None
    report_timeout_s: float | None = None
    split: tuple[float, ...] | None = None
    metric: str | None = None
    alpha: float | None = None
    min_samples: int | None = None
    max_duration_s: float | None = None
    agreement: float | None = None
    tolerance: float | None = None
    latency_ratio: float | None = None
    latency_floor_ms: float | None = None
    error_margin: float | None = None
    metric_margin: float | None = None
    auto_promote: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The keys that apply, as stored in ``rollouts.config``."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        for key in ("steps", "split"):
            if key in out:
                out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, strategy: str, data: Any, *, arms: int = 2,
                  stable: Mapping[str, Any] | None = None) -> Config:
        """Check ``data`` for ``strategy`` and fill the defaults.

        ``arms`` is the number of A/B arms (for ``split``); ``stable`` the stable version's
        manifest (the default ``metric``, ``tolerance`` and ``metric_margin`` follow its task
        and holdout RMSE). :class:`ConfigError` names the key and the fix.
        """
        if strategy not in ALL:
            raise ConfigError(f"strategy {str(strategy)[:40]!r} is not one of "
                              f"{', '.join(ALL)}", field="strategy")
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("config must be a JSON object of settings, e.g. "
                              "{\"steps\": [5, 50, 100]}", field="config")
        for key in data:
            if key not in APPLIES:
                raise ConfigError(f"unknown config key {str(key)[:40]!r}; known keys: "
                                  f"{', '.join(APPLIES)}", field=f"config.{str(key)[:40]}")
            if strategy not in APPLIES[key]:
                raise ConfigError(f"config key {key!r} applies to {', '.join(APPLIES[key])} "
                                  f"rollouts, not {strategy}; leave it out",
                                  field=f"config.{key}")
        given = {k: _check(k, v, arms) for k, v in data.items() if v is not None}
        defaults = _defaults(strategy, arms, stable or {})
        if "metric" in given and "metric" in defaults:
            _check_metric(given["metric"], defaults["metric"])
        return replace(cls(), **{k: given.get(k, defaults[k]) for k in defaults})

    @classmethod
    def stored(cls, data: Mapping[str, Any]) -> Config:
        """A config as :meth:`to_json` stored it, checked when the rollout started: read back
        as it is, not judged again by the rules of this release (a rule tightened by an
        upgrade must not make a running rollout unreadable, and so every manifest request
        fail). Unknown keys, from a newer release, are left out."""
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                   for k, v in data.items() if k in known}
        return replace(cls(), **values)

    def percent(self, strategy: str, step: int | None) -> float:
        """The share of units in the cohort: the canary's current step, the shadow's or
        interleave's ``devices``, 100 for A/B."""
        if strategy == "canary" and self.steps is not None:
            return self.steps[step or 0]
        if strategy in ("shadow", "interleave") and self.devices is not None:
            return self.devices
        return 100.0


def _defaults(strategy: str, arms: int, stable: Mapping[str, Any]) -> dict[str, Any]:
    task = str((stable.get("output") or {}).get("task") or "multiclass")
    regression = task == "regression"
    test = ((stable.get("metrics") or {}).get("edge_test") or {})
    rmse = test.get("rmse") if isinstance(test, Mapping) else None
    tolerance = 0.1 * float(rmse) if isinstance(rmse, (int, float)) and rmse > 0 else 1e-3
    every: dict[str, Any] = {
        "sample": 1.0 if strategy == "shadow" else 0.1, "devices": 100.0,
        "min_predictions": 1000, "min_devices": 2, "steps": (1.0, 5.0, 20.0, 50.0, 100.0),
        "dwell_s": DAY, "report_timeout_s": 6 * 3600.0,
        "split": tuple(100.0 / max(arms, 1) for _ in range(max(arms, 1))),
        "metric": AB_METRICS["regression" if regression else "classifier"][0], "alpha": 0.05,
        "min_samples": 100 if strategy == "interleave" else 200,
        "max_duration_s": 14 * DAY, "agreement": 0.9, "tolerance": tolerance,
        "latency_ratio": 1.5, "latency_floor_ms": 0.5, "error_margin": 0.01,
        "metric_margin": 0.01 if regression else 0.005, "auto_promote": False,
    }
    return {k: v for k, v in every.items() if strategy in APPLIES[k]}


def _check_metric(given: str, default: str) -> None:
    """An A/B metric the arms' two-sample test can judge, for the model's task."""
    kind = "regression" if default in AB_METRICS["regression"] else "classifier"
    if given not in AB_METRICS[kind]:
        how = ("the share of labels predicted right, a proportion per label (two-proportion "
               "z-test)" if kind == "classifier" else
               "the squared error of each label (Welch t-test on its mean)")
        raise ConfigError(f"config.metric {given!r} cannot be compared between A/B arms of "
                          f"a {kind}: use {' or '.join(AB_METRICS[kind])} ({how})",
                          field="config.metric")


def _check(key: str, value: Any, arms: int) -> Any:
    """One given setting, checked; ConfigError naming ``config.<key>``."""
    field = f"config.{key}"
    if key == "auto_promote":
        if not isinstance(value, bool):
            raise ConfigError("config.auto_promote must be true or false", field=field)
        return value
    if key == "metric":
        if not isinstance(value, str) or not _METRIC_RE.fullmatch(value):
            raise ConfigError("config.metric must be a metric name such as 'accuracy' or "
                              "'rmse'", field=field)
        return value
    if key in ("steps", "split"):
        return _percents(key, value, arms)
    if key in ("min_predictions", "min_devices", "min_samples"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{field} must be a whole number >= 1, got {_show(value)}",
                              field=field)
        return value
    number = _number(key, value)
    bounds = {"sample": (False, 1.0, "in (0, 1], e.g. 0.1 for every tenth call"),
              "devices": (False, 100.0, "a percent in (0, 100]"),
              "alpha": (False, 0.5, "in (0, 0.5], e.g. 0.05"),
              "agreement": (True, 1.0, "a share in [0, 1], e.g. 0.9")}
    if key in bounds:
        zero_ok, high, hint = bounds[key]
        if not (number >= 0 if zero_ok else number > 0) or number > high:
            raise ConfigError(f"{field} {_show(value)} must be {hint}", field=field)
    elif key in ("dwell_s", "report_timeout_s", "max_duration_s", "latency_ratio"):
        if number <= 0:
            raise ConfigError(f"{field} must be > 0, got {_show(value)}", field=field)
    elif number < 0:  # tolerance, latency_floor_ms, error_margin, metric_margin
        raise ConfigError(f"{field} must be >= 0, got {_show(value)}", field=field)
    return number


def _percents(key: str, value: Any, arms: int) -> tuple[float, ...]:
    field = f"config.{key}"
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{field} must be a list of percents, e.g. "
                          f"{'[1, 5, 20, 50, 100]' if key == 'steps' else '[50, 50]'}",
                          field=field)
    values = tuple(_number(key, v) for v in value)
    if any(not 0 < v <= 100 for v in values):
        raise ConfigError(f"{field} {_show(list(value))}: every percent must be in (0, 100]",
                          field=field)
    if key == "steps":
        if any(b <= a for a, b in itertools.pairwise(values)):
            raise ConfigError(f"config.steps {_show(list(value))} must increase step by step, "
                              "e.g. [1, 5, 20, 50, 100]", field=field)
        if values[-1] != 100:
            raise ConfigError(f"config.steps {_show(list(value))} must end at 100 (the last "
                              "step serves every device); add 100", field=field)
        return values
    if len(values) != arms:
        raise ConfigError(f"config.split has {len(values)} percents for {arms} arms; give one "
                          "per arm, in the arms' order", field=field)
    if abs(math.fsum(values) - 100) > 1e-6:
        raise ConfigError(f"config.split {_show(list(value))} sums to {math.fsum(values):g}; "
                          "the percents must sum to 100", field=field)
    return values


def _number(key: str, value: Any) -> float:
    number = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an int of hundreds of digits
            number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"config.{key} must be a number, got {_show(value)}",
                          field=f"config.{key}")
    return number


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit
        return "a number of thousands of digits"
    return text if len(text) <= 60 else text[:60] + "..."


KEYS = tuple(f.name for f in fields(Config))

__all__ = ["ALL", "APPLIES", "KEYS", "Config"]
