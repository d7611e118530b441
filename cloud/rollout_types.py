"""The value objects of a rollout: the row (:class:`Rollout`), a unit's :class:`Assignment`
and a recorded :class:`Unit` (docs/rollouts.md §1–3); :class:`hybridml.cloud.rollouts.Rollouts`
stores and changes them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hybridml.shared.assign import Role, role_for

from .rollout_config import Config

BLOCK_FORMAT = 1


@dataclass(frozen=True)
class Rollout:
    """One row of ``rollouts``, its config parsed (docs/rollouts.md §1)."""

    id: int
    name: str
    strategy: str
    state: str
    stable: int
    candidate: int | None
    arms: tuple[int, ...]
    config: Config
    step: int | None
    step_started: float | None
    started: float
    ended: float | None
    forced: bool
    decision: dict[str, Any] | None
    memo: dict[str, Any] | None

    @property
    def percent(self) -> float:
        """The share of units in the cohort now (canary: the current step's percent)."""
        return self.config.percent(self.strategy, self.step)

    def role(self, b: int) -> Role:
        """The role of bucket ``b`` in this rollout (:func:`hybridml.shared.assign.role_for`)."""
        return role_for(self.strategy, b, percent=self.percent, split=self.config.split or ())

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times in POSIX seconds)."""
        return {"id": self.id, "name": self.name, "strategy": self.strategy,
                "state": self.state, "stable": self.stable, "candidate": self.candidate,
                "arms": list(self.arms), "config": self.config.to_json(), "step": self.step,
                "percent": self.percent, "step_started": self.step_started,
                "started": self.started, "ended": self.ended, "forced": self.forced,
                "decision": self.decision, "memo": self.memo}


@dataclass(frozen=True)
class Assignment:
    """A unit's place in a running rollout (docs/rollouts.md §2). ``role`` is None outside
    every cohort: then ``serve`` is the rollout's stable version and ``companion`` None."""

    rollout: Rollout
    arm: str
    role: str | None
    bucket: int
    serve: int
    companion: int | None
    sample: float | None

    @property
    def in_cohort(self) -> bool:
        """True when the unit's manifest carries a ``rollout`` block."""
        return self.role is not None

    def block(self, companion: Mapping[str, Any] | None) -> dict[str, Any]:
        """The manifest's ``rollout`` block (§3), with the companion's stored manifest."""
        r = self.rollout
        return {"format": BLOCK_FORMAT, "id": r.id, "strategy": r.strategy, "role": self.role,
                "arm": self.arm, "stable": r.stable, "candidate": r.candidate,
                "serve": self.serve, "step": r.step, "percent": r.percent,
                "sample": self.sample, "forced": r.forced,
                "companion": None if companion is None else dict(companion)}


@dataclass(frozen=True)
class Unit:
    """One row of ``rollout_units``: a unit, the arm it was last given, when it was seen."""

    unit: str
    arm: str
    bucket: int
    first_seen: float
    last_seen: float
    candidate_since: float | None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)



def rollout_of(row: Sequence[Any]) -> Rollout:
    """A :class:`Rollout` from a ``rollouts`` row (columns in table order)."""
    (rid, name, strategy, state, stable, candidate, arms, config, step, step_started, started,
     ended, forced, decision, memo) = row
    versions = tuple(json.loads(arms))
    return Rollout(int(rid), name, strategy, state, int(stable), candidate, versions,
                   Config.stored(json.loads(config)), step,
                   step_started, float(started), ended, bool(forced),
                   json.loads(decision) if decision else None, json.loads(memo) if memo else None)


def blessed(manifest: Mapping[str, Any]) -> bool:
    """True when the gate blessed the version (``manifest["gate"]["blessed"] is True``)."""
    gate = manifest.get("gate")
    return isinstance(gate, Mapping) and gate.get("blessed") is True


__all__ = ["BLOCK_FORMAT", "Assignment", "Rollout", "Unit", "blessed", "rollout_of"]
