"""Which arm of a rollout a unit (a device, a caller) belongs to: deterministic, pure Python.

A unit's bucket in rollout ``r`` is ``fnv1a32(str(fnv1a32(f"hybridml:{r}:{unit}"))) % 10000``:
GrowthBook's hashing v2 (``gbhash(seed, value, 2)`` in growthbook/growthbook-python,
``growthbook/core.py``: FNV-1a 32-bit over the characters' code points, applied a second time
to the decimal text of the first hash so that nearby seeds do not give correlated buckets).
The same unit always lands in the same bucket of a rollout, and two rollouts shuffle units
independently, because the rollout id is part of the hashed text.

The role a bucket gets (docs/rollouts.md §2)::

    shadow      b < devices·100          arm "candidate", role "shadow"
    canary      b < percent·100          arm "candidate", role "canary"
    interleave  b < devices·100          arm "candidate", role "interleave"
    ab          split ranges, in order   arm "A", "B", ... , role "arm"
    otherwise                            arm "stable",    role None (plain stable)

Thresholds are whole buckets (``round(percent * 100)``), so raising a canary's percentage
only ever adds units: ``b < t1`` implies ``b < t2`` for ``t1 <= t2``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

BUCKETS = 10000
STRATEGIES = ("shadow", "canary", "ab", "interleave")
ROLES = ("shadow", "canary", "arm", "interleave")
STABLE_ARM = "stable"
CANDIDATE_ARM = "candidate"
_FNV_OFFSET = 0x811C9DC5
_FNV_PRIME = 0x01000193
_ROLE_OF = {"shadow": "shadow", "canary": "canary", "interleave": "interleave"}


def fnv1a32(text: str) -> int:
    """FNV-1a 32-bit of ``text``, over its characters' code points (as GrowthBook's SDK)."""
    h = _FNV_OFFSET
    for ch in text:
        h = ((h ^ ord(ch)) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def bucket(rollout_id: int, unit: str) -> int:
    """The bucket, in ``[0, 10000)``, of ``unit`` in rollout ``rollout_id``."""
    return fnv1a32(str(fnv1a32(f"hybridml:{rollout_id}:{unit}"))) % BUCKETS


def threshold(percent: float) -> int:
    """The number of buckets ``percent`` % of units covers (0-10000)."""
    return max(0, min(BUCKETS, round(percent * BUCKETS / 100)))


def arm_letter(index: int) -> str:
    """``A``, ``B``, ``C``, ... for arm 0, 1, 2, ... of an A/B test."""
    if not 0 <= index < 26:
        raise ValueError(f"arm index {index} is outside 0-25")
    return chr(ord("A") + index)


@dataclass(frozen=True)
class Role:
    """What a bucket is given: ``arm`` (``stable``, ``candidate`` or an A/B letter),
    ``role`` (None outside every cohort) and, for A/B, the arm's ``index``."""

    arm: str
    role: str | None
    index: int | None = None

    @property
    def in_cohort(self) -> bool:
        """True when the unit takes part (it gets a ``rollout`` block)."""
        return self.role is not None


OUTSIDE = Role(STABLE_ARM, None)


def role_for(strategy: str, b: int, *, percent: float = 100.0,
             split: Sequence[float] = ()) -> Role:
    """The role of bucket ``b`` under ``strategy``.

    ``percent`` is the share of units in the cohort (canary: the current step; shadow and
    interleave: ``devices``); ``split`` the A/B arms' percents, summing to 100.
    ``ValueError`` for an unknown strategy, a bucket out of range, or an empty split.
    """
    if not 0 <= b < BUCKETS:
        raise ValueError(f"bucket {b} is outside [0, {BUCKETS})")
    if strategy == "ab":
        if not split:
            raise ValueError("an A/B test needs the arms' split")
        edge = 0.0
        for i, share in enumerate(split):
            edge += share
            if b < threshold(edge) or i == len(split) - 1:
                return Role(arm_letter(i), "arm", i)
    role = _ROLE_OF.get(strategy)
    if role is None:
        raise ValueError(f"strategy {strategy!r} is not one of {STRATEGIES}")
    return Role(CANDIDATE_ARM, role) if b < threshold(percent) else OUTSIDE


__all__ = ["BUCKETS", "CANDIDATE_ARM", "OUTSIDE", "ROLES", "STABLE_ARM", "STRATEGIES", "Role",
           "arm_letter", "bucket", "fnv1a32", "role_for", "threshold"]
