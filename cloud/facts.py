"""What a model version's telemetry is checked against: its task, classes, schema and profile.

:class:`ModelFacts` is read once per version from its manifest (versions are immutable);
:class:`FactsCache` answers ``(model, version)`` lookups for the ingest checks and the monitor,
resolving "no version" to the version ``stable`` points at now, and raising
:class:`NotFoundError` naming ``model`` or ``version``, the field a record got wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hybridml.shared.errors import HybridMLError, NotFoundError
from hybridml.shared.labels import as_label
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import InputSchema
from hybridml.shared.text import printable

from .registry import Registry

PROFILE_FORMAT = 1
CACHE_SIZE = 256


@dataclass(frozen=True)
class ModelFacts:
    """What the records of one model version are checked against."""

    name: str
    version: int
    task: str
    classes: tuple[Any, ...]
    schema: InputSchema
    profile: dict[str, Any] | None  # format 1 only; None for older versions

    @classmethod
    def from_manifest(cls, doc: Mapping[str, Any]) -> ModelFacts:
        """Facts of the version ``doc`` describes (a registry manifest)."""
        m = Manifest.from_json(dict(doc))
        profile = doc.get("profile")
        fmt1 = isinstance(profile, dict) and profile.get("format") == PROFILE_FORMAT
        return cls(m.name, m.version, m.task, tuple(m.classes or ()), m.schema,
                   profile if fmt1 else None)

    def bins(self, entry: str, name: str | None = None) -> int | None:
        """Counts the profile expects for a feature (``entry="features"``), ``predictions`` or
        ``confidence``; None when the profile has no such entry."""
        if self.profile is None:
            return None
        spec = (self.profile.get("features") or {}).get(name) if name is not None \
            else self.profile.get(entry)
        if not isinstance(spec, dict):
            return None
        cuts = spec.get("edges") if spec.get("kind") == "numeric" else spec.get("categories")
        return len(cuts) + 1 if isinstance(cuts, list) else None

    def label(self, value: Any, field: str) -> Any:
        """``value`` as a label of this model (:func:`hybridml.shared.labels.as_label`, the
        device's rule too); InputError naming ``field`` otherwise."""
        return as_label(value, task=self.task, classes=self.classes, model=self.name,
                        version=self.version, field=field)


Facts = Callable[[str, "int | None"], ModelFacts]


class FactsCache:
    """``cache(model, version=None)``: the :class:`ModelFacts` of a version of a model in
    ``registry`` (None: the one ``stable`` points at); thread-safe."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._items: dict[tuple[str, int], ModelFacts] = {}
        self._lock = threading.Lock()

    def __call__(self, model: str, version: int | None = None) -> ModelFacts:
        """The facts of ``model`` v``version``; NotFoundError naming ``model`` or
        ``version``."""
        hit = self._items.get((model, version)) if version is not None else None
        if hit is not None:
            return hit
        try:
            number = self.registry.resolve_cached(model, version or "stable")
        except HybridMLError as exc:
            try:
                latest = self.registry.resolve_cached(model, "latest")
            except HybridMLError:
                raise NotFoundError(f"no model {printable(model, 64)!r} in this registry",
                                    field="model") from exc
            raise NotFoundError(f"model {model!r} has no version {version} (latest is v"
                                f"{latest})", field="version") from exc
        hit = self._items.get((model, number))
        if hit is None:
            hit = ModelFacts.from_manifest(self.registry.manifest(model, number))
            with self._lock:
                if len(self._items) >= CACHE_SIZE:
                    self._items.clear()
                self._items[(model, number)] = hit
        return hit


def _short(value: Any, limit: int = 60) -> str:
    return printable(repr(value), limit)
