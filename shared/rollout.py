"""The signed ``rollout`` block: the role a device plays in a running rollout.

docs/rollouts.md §3 is the contract. A device in a rollout's cohort gets the served version's
manifest with a ``rollout`` block inside the signed bytes::

    "rollout": {"format": 1, "id": 7, "strategy": "canary", "role": "canary",
                "arm": "candidate", "stable": 4, "candidate": 5, "serve": 5, "step": 1,
                "percent": 5, "sample": 0.1, "forced": false,
                "companion": { ...the registry's manifest of version 4... }}

* ``role``: ``shadow`` (serve stable, shadow the candidate), ``canary`` (serve the candidate,
  shadow stable), ``arm`` (an A/B arm: serve that version, no companion) or ``interleave``
  (serve stable; ``rank`` interleaves stable and candidate).
* ``serve`` is the outer manifest's ``version``; ``companion`` the other model's full
  manifest (the same model name, another version, no ``release``, ``signature`` or
  ``rollout`` of its own: the outer signature covers it), or null.
* Like ``release`` and ``signature`` the block is about the delivery, not the model:
  :meth:`~hybridml.shared.manifest.Manifest.content` leaves it out.

:meth:`RolloutBlock.from_json` validates a block (given a ``parse`` function, the companion
too); :meth:`RolloutBlock.of` takes it from a manifest, parses the companion with the
manifest's own class and checks both against the manifest (``serve``, the companion's name).
:meth:`~hybridml.shared.manifest.Manifest.from_json` runs the same checks, so a parsed
manifest never carries a block that does not fit it. This module does not import
:mod:`hybridml.shared.manifest` (which imports it): the manifest class comes in as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from .errors import ManifestError

ROLLOUT_FORMAT = 1
ROLES = ("shadow", "canary", "arm", "interleave")
STRATEGIES = ("shadow", "canary", "ab", "interleave")
SHADOW_ROLES = ("shadow", "canary")  # roles whose device runs the companion beside each call
_FIELDS = ("format", "id", "strategy", "role", "arm", "stable", "candidate", "serve", "step",
           "percent", "sample", "forced", "companion")
_NOT_IN_COMPANION = ("release", "signature", "rollout")


class ManifestLike(Protocol):
    """What this module needs of a manifest (:class:`~hybridml.shared.manifest.Manifest`)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def raw(self) -> Mapping[str, Any]: ...


M = TypeVar("M", bound=ManifestLike)


@dataclass(frozen=True)
class RolloutBlock(Generic[M]):
    """A parsed ``rollout`` block (see the module docstring). ``companion`` is the embedded
    manifest as decoded JSON; :meth:`companion_manifest` gives it parsed."""

    id: int
    strategy: str
    role: str
    serve: int
    arm: str | None = None
    stable: int | None = None
    candidate: int | None = None
    step: int | None = None
    percent: float | None = None
    sample: float = 1.0
    forced: bool = False
    companion: Mapping[str, Any] | None = None
    parsed: M | None = field(default=None, compare=False, repr=False)

    @property
    def companion_version(self) -> int | None:
        """The companion's version, or None without a companion."""
        return None if self.companion is None else int(self.companion["version"])

    def companion_manifest(self) -> M | None:
        """The companion as a manifest (of the class :meth:`of` was given), or None."""
        if self.companion is None:
            return None
        if self.parsed is None:
            raise ManifestError("this rollout block was read without a manifest parser; read "
                                "it with RolloutBlock.of(manifest)", field="rollout.companion")
        return self.parsed

    def to_json(self) -> dict[str, Any]:
        """The block as it goes into a manifest."""
        return {"format": ROLLOUT_FORMAT, "id": self.id, "strategy": self.strategy,
                "role": self.role, "arm": self.arm, "stable": self.stable,
                "candidate": self.candidate, "serve": self.serve, "step": self.step,
                "percent": self.percent, "sample": self.sample, "forced": self.forced,
                "companion": None if self.companion is None else dict(self.companion)}

    @staticmethod
    def of(manifest: M) -> RolloutBlock[M] | None:
        """The block of ``manifest``, checked against it (the companion parsed with the
        manifest's class); None when it has none."""
        parse: Callable[[Any], M] = type(manifest).from_json  # type: ignore[attr-defined]
        return block_of(manifest.raw, manifest.name, manifest.version, parse)

    @staticmethod
    def from_json(data: Any, parse: Callable[[Any], M] | None = None) -> RolloutBlock[M]:
        """Validate a decoded block; :class:`ManifestError` names ``rollout.<field>``.
        ``parse`` (a manifest class's ``from_json``) validates and parses the companion."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest 'rollout' must be an object", field="rollout")
        if data.get("format") != ROLLOUT_FORMAT:
            raise ManifestError(f"rollout format {str(data.get('format'))[:20]!r} is not "
                                f"supported (this kit reads {ROLLOUT_FORMAT}); upgrade hybridml "
                                "on this device", field="rollout.format")
        unknown = sorted(str(k) for k in data if k not in _FIELDS)
        if unknown:
            raise ManifestError(f"rollout has unknown field {unknown[0][:40]!r} (known: "
                                f"{', '.join(_FIELDS)})", field=f"rollout.{unknown[0][:40]}")
        rid = _required(data, "id")
        serve = _required(data, "serve")
        strategy, role = data.get("strategy"), data.get("role")
        if strategy not in STRATEGIES:
            raise ManifestError(f"rollout 'strategy' {str(strategy)[:40]!r} is not one of "
                                f"{', '.join(STRATEGIES)}", field="rollout.strategy")
        if role not in ROLES:
            raise ManifestError(f"rollout 'role' {str(role)[:40]!r} is not one of "
                                f"{', '.join(ROLES)}", field="rollout.role")
        arm = data.get("arm")
        if arm is not None and (not isinstance(arm, str) or not 0 < len(arm) <= 64):
            raise ManifestError("rollout 'arm' must be a short string or null",
                                field="rollout.arm")
        percent = _number(data, "percent", None, 0.0, 100.0)
        sample = _number(data, "sample", 1.0, 0.0, 1.0)
        forced = data.get("forced", False)
        if not isinstance(forced, bool):
            raise ManifestError("rollout 'forced' must be true or false", field="rollout.forced")
        companion = data.get("companion")
        parsed = None
        if companion is not None:  # null is allowed for every role: the device serves alone
            parsed = _check_companion(companion, serve, parse)
        assert sample is not None
        return RolloutBlock(rid, str(strategy), str(role), serve, arm,
                            _int(data, "stable"), _int(data, "candidate"),
                            _int(data, "step", low=0), percent, sample, forced, companion,
                            parsed)


def load_failed_body(model: str, version: int | None, rollout: int, code: str,
                     message: str) -> dict[str, Any]:
    """The ``health`` record body a device spools when a rollout's model (served or
    companion) fails to download, verify or load (docs/rollouts.md §4)."""
    return {"format": 1, "model": model, "event": "load_failed", "version": version,
            "rollout": rollout, "error": {"code": code, "message": message}}


def block_of(data: Mapping[str, Any], name: str, version: int,
             parse: Callable[[Any], M] | None = None) -> RolloutBlock[M] | None:
    """The ``rollout`` block of the decoded manifest ``data`` of ``name`` v``version``,
    checked against it (``serve``, the companion's name; ``parse`` validates the companion);
    None when it has none."""
    raw = data.get("rollout")
    if raw is None:
        return None
    block = RolloutBlock.from_json(raw, parse)
    if block.serve != version:
        raise ManifestError(f"the rollout block serves v{block.serve} but the manifest is "
                            f"v{version}", field="rollout.serve")
    if block.companion is not None and block.companion.get("name") != name:
        raise ManifestError(f"the rollout companion is a manifest of "
                            f"{str(block.companion.get('name'))[:64]!r}, not of {name!r}",
                            field="rollout.companion")
    return block


def _check_companion(companion: Any, serve: int, parse: Callable[[Any], M] | None
                     ) -> M | None:
    if not isinstance(companion, Mapping):
        raise ManifestError("rollout 'companion' must be a manifest object or null",
                            field="rollout.companion")
    inner = sorted(k for k in _NOT_IN_COMPANION if k in companion)
    if inner:
        raise ManifestError(f"rollout 'companion' carries its own {inner[0]!r}; the outer "
                            "manifest's signature covers it, so it must have none",
                            field="rollout.companion")
    if companion.get("version") == serve:
        raise ManifestError(f"the rollout companion is v{serve}, the served version itself",
                            field="rollout.companion")
    if parse is None:
        return None
    try:
        return parse(companion)
    except ManifestError as exc:
        raise ManifestError(f"rollout 'companion' is not a valid manifest: {exc.message}",
                            field="rollout.companion") from exc


def _int(data: Mapping[str, Any], field: str, *, required: bool = False, low: int = 1
         ) -> int | None:
    value = data.get(field)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**62:
        raise ManifestError(f"rollout '{field}' must be an integer >= {low}, got "
                            f"{str(value)[:40]!r}", field=f"rollout.{field}")
    return value


def _required(data: Mapping[str, Any], field: str) -> int:
    value = _int(data, field, required=True)
    assert value is not None
    return value


def _number(data: Mapping[str, Any], field: str, default: float | None, low: float,
            high: float) -> float | None:
    value = data.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or not low <= value <= high:
        raise ManifestError(f"rollout '{field}' must be a number in [{low:g}, {high:g}], got "
                            f"{str(value)[:40]!r}", field=f"rollout.{field}")
    return float(value)


__all__ = ["ROLES", "ROLLOUT_FORMAT", "SHADOW_ROLES", "STRATEGIES", "ManifestLike",
           "RolloutBlock", "block_of", "load_failed_body"]
