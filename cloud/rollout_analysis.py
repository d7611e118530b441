"""A rollout's analysis, and acting on it (docs/rollouts.md §5).

:func:`analyse` reads what the stores hold and says what the data supports — ``hold``,
``advance``, ``promote``, ``abort``, ``ready`` or ``inconclusive`` — with its reasons, checks,
per-arm numbers and tests; it changes nothing (``rollout status`` shows it). :func:`tick`
analyses the running rollout of a model, records the analysis (and its memo) on the rollout,
and acts through :class:`~hybridml.cloud.rollouts.Rollouts`, which audits every change:

=============  =====================================================================
action         what :func:`tick` does
=============  =====================================================================
advance        ``rollouts.advance`` to the next canary step
promote        ``rollouts.finish(..., "promoted", winner=...)``
abort          ``rollouts.finish(..., "aborted")``, recording ``ever_served`` and
               ``ever_assigned`` in the evidence
inconclusive   ``rollouts.finish(..., "inconclusive-held")``
ready          recorded only (a person promotes) — unless ``auto_promote``: promote
hold           recorded only
=============  =====================================================================

The strategies are in :mod:`hybridml.cloud.rollout_canary` (canary, shadow) and
:mod:`hybridml.cloud.rollout_experiments` (A/B, interleave); the sums they read in
:mod:`hybridml.cloud.rollout_facts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hybridml.shared.clock import utc_iso

from .facts import ModelFacts
from .rollout_canary import canary, shadow_rollout
from .rollout_experiments import ab, interleave_rollout
from .rollout_facts import RolloutTelemetry
from .verdict import ACTIONS, Check, Verdict, conf, rounded

if TYPE_CHECKING:
    from .rollouts import Rollout, Rollouts

log = logging.getLogger("hybridml.cloud.rollout_analysis")
FORMAT = 1
Strategy = Callable[["Rollout", "Rollouts", RolloutTelemetry, ModelFacts, float, Verdict], str]
STRATEGIES: dict[str, Strategy] = {"canary": canary, "shadow": shadow_rollout, "ab": ab,
                                   "interleave": interleave_rollout}


@dataclass(frozen=True)
class Analysis:
    """What the data says about one rollout at one moment."""

    rollout: int
    strategy: str
    action: str  # one of ACTIONS
    reasons: list[str]
    checks: list[Check]
    arms: dict[str, Any]
    tests: dict[str, Any]
    memo: dict[str, Any]
    now: float
    step: int | None = None
    winner: int | None = None  # the version a promote moves stable to
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON stored as the rollout's ``decision`` and in audit evidence."""
        return {"format": FORMAT, "rollout": self.rollout, "strategy": self.strategy,
                "action": self.action, "time": utc_iso(self.now), "step": self.step,
                "winner": self.winner, "reasons": list(self.reasons),
                "checks": [c.to_json() for c in self.checks], "arms": rounded(self.arms),
                "tests": rounded(self.tests), **self.extra}


def analyse(rollout: Rollout, rollouts: Rollouts, telemetry: RolloutTelemetry, now: float
            ) -> Analysis:
    """The analysis of ``rollout`` at ``now`` (pure over what the stores return)."""
    v = Verdict()
    facts = ModelFacts.from_manifest(rollouts.registry.manifest(rollout.name, rollout.stable))
    action = STRATEGIES[rollout.strategy](rollout, rollouts, telemetry, facts, now, v)
    assert action in ACTIONS, action
    winner = None
    if action in ("promote", "ready"):
        if rollout.strategy == "ab":
            letter = v.arms.get("winner")
            winner = rollout.arms[ord(letter) - ord("A")] if isinstance(letter, str) else None
        else:
            winner = rollout.candidate
    return Analysis(rollout.id, rollout.strategy, action, v.reasons, v.checks, v.arms,
                    v.tests, v.memo, now, rollout.step, winner)


def tick(rollouts: Rollouts, telemetry: RolloutTelemetry, name: str, now: float, *,
         actor: str = "controller") -> Analysis | None:
    """Analyse the running rollout of ``name`` (None without one), record the analysis and
    act on it (see the module docstring)."""
    r = rollouts.active(name)
    if r is None:
        return None
    a = analyse(r, rollouts, telemetry, now)
    decision = a.to_json()
    rollouts.record_decision(r.id, decision, a.memo)
    reason = "; ".join(a.reasons)[:2000] or a.action
    action = a.action
    if action == "ready" and conf(r, "auto_promote", False):
        action = "promote"
    if action == "advance":
        rollouts.advance(r.id, (r.step or 0) + 1, actor=actor, reason=reason,
                         evidence=decision)
    elif action == "promote":
        rollouts.finish(r.id, "promoted", actor=actor, reason=reason, evidence=decision,
                        winner=a.winner)
    elif action == "abort":
        cand = a.arms.get("candidate") or {}
        evidence = {**decision, "ever_served": cand.get("ever_served", _served(r, a)),
                    "ever_assigned": cand.get("ever_assigned", _assigned(r, rollouts))}
        rollouts.finish(r.id, "aborted", actor=actor, reason=reason, evidence=evidence)
    elif action == "inconclusive":
        rollouts.finish(r.id, "inconclusive-held", actor=actor, reason=reason,
                        evidence=decision)
    log.info("%s: rollout %d (%s) %s: %s", name, r.id, r.strategy, action, reason)
    return a


def _served(r: Rollout, a: Analysis) -> int:
    """Devices that reported answers of a non-stable version (A/B, shadow, interleave)."""
    return sum(int(arm.get("devices", 0)) for key, arm in a.arms.items()
               if isinstance(arm, dict) and arm.get("version") not in (None, r.stable))


def _assigned(r: Rollout, rollouts: Rollouts) -> int:
    return sum(1 for u in rollouts.units(r.id) if u.arm not in ("stable", "A")
               or u.candidate_since is not None)


__all__ = ["Analysis", "Check", "analyse", "tick"]
