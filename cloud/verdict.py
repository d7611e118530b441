"""The pieces of a rollout's analysis: checks, and the verdict a strategy builds from them.

A :class:`Check` says whether one rule held (``passed`` True/False) or could not be judged
yet (None: not enough data, which never passes). A strategy (:mod:`hybridml.cloud.
rollout_canary`, :mod:`hybridml.cloud.rollout_experiments`) fills a :class:`Verdict` —
its checks, one-line reasons, per-arm numbers, the statistical tests and the memo carried
to the next look — and returns the action; :mod:`hybridml.cloud.rollout_analysis` freezes
it into an :class:`~hybridml.cloud.rollout_analysis.Analysis`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ACTIONS = ("hold", "advance", "promote", "abort", "ready", "inconclusive")


@dataclass(frozen=True)
class Check:
    """One rule of a strategy: its value against its bound, and whether it held."""

    name: str
    passed: bool | None  # None: not enough data (never a pass)
    value: Any
    bound: Any
    detail: str

    def to_json(self) -> dict[str, Any]:
        """``{"name", "passed", "value", "bound", "detail"}``."""
        return {"name": self.name, "passed": self.passed, "value": rounded(self.value),
                "bound": rounded(self.bound), "detail": self.detail}


@dataclass
class Verdict:
    """What a strategy found, filled as it goes."""

    checks: list[Check] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    arms: dict[str, Any] = field(default_factory=dict)
    tests: dict[str, Any] = field(default_factory=dict)
    memo: dict[str, Any] = field(default_factory=dict)

    def check(self, name: str, passed: bool | None, value: Any, bound: Any, detail: str
              ) -> Check:
        """Record a check (and return it)."""
        c = Check(name, passed, value, bound, detail)
        self.checks.append(c)
        return c

    def failed(self) -> list[Check]:
        """The checks that did not hold."""
        return [c for c in self.checks if c.passed is False]

    def unjudged(self) -> list[Check]:
        """The checks without enough data."""
        return [c for c in self.checks if c.passed is None]

    def say(self, reason: str) -> None:
        """Add a one-line reason."""
        self.reasons.append(reason)


def conf(rollout: Any, key: str, default: Any = None) -> Any:
    """A setting of ``rollout.config`` (a :class:`~hybridml.cloud.rollouts.Config` or its
    JSON), ``default`` when it is unset."""
    config = rollout.config
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def rounded(value: Any) -> Any:
    """Floats to 6 significant digits (JSON: no NaN/inf), lists and dicts inside too."""
    if isinstance(value, float):
        return float(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return value


def rate(x: float | None) -> str:
    """``x`` as a percentage for a reason line (``n/a`` for None)."""
    return "n/a" if x is None else f"{100 * x:.2f} %"
