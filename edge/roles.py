"""The rollout a loaded version takes part in, with its companion loaded (docs/rollouts.md §4).

:func:`load_rollout` pairs the loaded served version with its loaded companion
(:mod:`hybridml.edge.companion`) and, for roles ``shadow`` and ``canary``, the plan of its
shadow (:mod:`hybridml.edge.shadow`) in one :class:`Rollout`, which the runtime swaps in beside
the version; a call uses it only when its ``served`` is the very version the call read, so no
call ever pairs a version with another version's companion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from hybridml.shared.errors import HybridMLError, InferenceError, ModelLoadError
from hybridml.shared.manifest import DELIVERY_KEYS, canonical_json
from hybridml.shared.rollout import SHADOW_ROLES, RolloutBlock

from .companion import COMPANION_ROLES, Companion
from .session import ModelSession
from .shadow import Shadow, ShadowPlan

if TYPE_CHECKING:
    from .loaded import LoadedVersion
    from .store import LocalStore

log = logging.getLogger("hybridml.edge.roles")


@dataclass(frozen=True)
class Rollout:
    """The rollout a loaded version takes part in: its ``block``, the loaded ``companion``
    (None when the store has none that fits, or it failed to load) and, for roles shadow and
    canary with a companion of the same columns, the shadow ``plan``."""

    served: LoadedVersion
    block: RolloutBlock
    companion: Companion | None
    plan: ShadowPlan | None

    def on(self, v: LoadedVersion) -> Rollout:
        """This rollout for another snapshot of the same version (a new table or policy)."""
        plan = None if self.plan is None else self.plan.on(v)
        return replace(self, served=v, plan=plan)


def load_rollout(store: LocalStore, name: str, v: LoadedVersion, shadow: Shadow,
                 threads: int = 1) -> tuple[Rollout | None, HybridMLError | None]:
    """The :class:`Rollout` of the loaded version ``v`` (None outside a rollout) and the
    error its companion failed to load with (None if it loaded, or none was needed)."""
    block = RolloutBlock.of(v.manifest)
    if block is None:
        return None, None
    wanted = block.companion_manifest() if block.role in COMPANION_ROLES else None
    if wanted is None:
        return Rollout(v, block, None, None), None
    kept = store.companion(name)
    if kept is None or kept.content() != wanted.content():
        log.warning("rollout %s: the store holds no companion v%s for %s v%s (a sync did not "
                    "fetch it, or it failed its checks); serving alone", block.id,
                    wanted.version, name, v.version)
        return Rollout(v, block, None, None), None
    model = kept.artifact("model")
    assert model is not None  # Manifest.from_json guarantees a model artifact
    try:
        session = ModelSession(store.artifact_path(model.sha256), kept.schema, kept.task,
                               threads=threads)
        session.warm()
    except (ModelLoadError, InferenceError, OSError) as exc:
        err = exc if isinstance(exc, HybridMLError) else \
            ModelLoadError(f"cannot open companion v{kept.version}: {exc}")
        log.warning("rollout %s: companion %s v%s failed to load, serving v%s alone: %s",
                    block.id, name, kept.version, v.version, err.message)
        return Rollout(v, block, None, None), err
    companion = Companion(kept, session)
    plan = shadow.plan(v, companion, block) if block.role in SHADOW_ROLES else None
    return Rollout(v, block, companion, plan), None


def companion_changed(store: LocalStore, name: str, v: LoadedVersion,
                      rollout: Rollout | None) -> bool:
    """Whether the store now holds another companion for the loaded ``v`` than ``rollout``
    has loaded (a sync fetched it after ``v`` was loaded alone, say)."""
    block = RolloutBlock.of(v.manifest)
    have = None if rollout is None or rollout.served is not v or rollout.companion is None \
        else rollout.companion.manifest.content()
    if block is None or block.companion is None or block.role not in COMPANION_ROLES:
        return have is not None
    kept = store.companion(name)
    fits = kept is not None and kept.content() == canonical_json(
        {k: x for k, x in block.companion.items() if k not in DELIVERY_KEYS})
    return (kept.content() if fits and kept is not None else None) != have


__all__ = ["Rollout", "companion_changed", "load_rollout"]
