"""The companion: the other model a device's rollout role needs (docs/rollouts.md §4).

A device in a rollout's cohort keeps the other version beside the one it serves (in
``companion.json``, :meth:`~hybridml.edge.store.LocalStore.companion`): stable beside a
canary, the candidate beside stable in a shadow or interleave. This module is what is known
of it once loaded, and whether its answers can be compared with the served version's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridml.shared.manifest import Manifest
from hybridml.shared.rollout import SHADOW_ROLES, RolloutBlock

from .session import ModelSession

if TYPE_CHECKING:
    from .loaded import LoadedVersion

DEFAULT_TOLERANCE = 1e-3
COMPANION_ROLES = (*SHADOW_ROLES, "interleave")  # roles that load the companion


@dataclass(frozen=True)
class Companion:
    """The loaded companion: its manifest and onnxruntime session."""

    manifest: Manifest
    session: ModelSession

    @property
    def version(self) -> int:
        """The companion's version."""
        return self.manifest.version

    @property
    def classes(self) -> tuple[Any, ...]:
        """The companion's classes (empty for regression)."""
        return tuple(self.manifest.classes or ())


def same_columns(v: LoadedVersion, companion: Companion) -> str | None:
    """Why the companion cannot run the served version's encoded rows, or None if it can
    (the same feature names and kinds in the same order, and the same kind of task)."""
    a, b = v.schema, companion.manifest.schema
    if a.names != b.names or [f.kind for f in a.features] != [f.kind for f in b.features]:
        return f"its columns {list(b.names)} differ from the served version's {list(a.names)}"
    if (v.manifest.task == "regression") != (companion.manifest.task == "regression"):
        return f"its task {companion.manifest.task!r} is not comparable to {v.manifest.task!r}"
    return None


def tolerance(block: RolloutBlock, served: Manifest, companion: Manifest) -> float:
    """Regression agreement bound: 10 % of the stable version's holdout RMSE (the companion
    in a canary, else the served version), else :data:`DEFAULT_TOLERANCE`."""
    stable = companion if block.role == "canary" else served
    metrics = stable.raw.get("metrics")
    if isinstance(metrics, Mapping):
        for where in (metrics, metrics.get("edge_test"), metrics.get("sklearn_test")):
            rmse = where.get("rmse") if isinstance(where, Mapping) else None
            if isinstance(rmse, (int, float)) and not isinstance(rmse, bool) \
                    and math.isfinite(rmse) and rmse > 0:
                return 0.1 * float(rmse)
    return DEFAULT_TOLERANCE


__all__ = ["COMPANION_ROLES", "DEFAULT_TOLERANCE", "Companion", "same_columns", "tolerance"]
