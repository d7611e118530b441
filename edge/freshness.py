"""Freshness on the device: no replay, no downgrade, no expired manifest, and a freeze noticed.

The cloud signs a ``release`` block into every manifest (:mod:`hybridml.shared.release`). Sync
calls :func:`check_release` right after the signature check, before anything is fetched:

* the block must name the model and the alias the device asked for, and the manifest's
  version (a proxy that rewrites ``?alias=stable`` to ``?version=1`` is caught here);
* its ``sequence`` must not be lower than the highest this device has accepted for the model
  (a replayed or downgraded manifest is lower; an operator's rollback is higher);
* it must not have expired, judged by the device's clock only while that clock is plausible:
  not before the newest ``issued`` the device has accepted (nor before this manifest's own).
  A Pi without a real-time clock boots with a clock in the past; it then warns and relies on
  the sequence, instead of refusing every manifest until NTP answers.

What was accepted (:class:`Seen`) is kept in ``sync.json`` and, durably, in the signed
manifests the store holds: the highest sequence is the largest of the three, so a lost or
stale ``sync.json`` never lowers the bar.

A freeze (an attacker answering ``304 Not Modified`` forever, or replaying the same signed
manifest) is noticed by :func:`describe`: the cloud re-signs at least hourly, so a device
that has not accepted a newer ``issued`` for ``stale_after_s`` (default 24 h,
``HYBRIDML_STALE_AFTER_S``) is *stale since* the last time it did. ``status`` shows it and
the agent logs it every interval.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from hybridml.shared.clock import format_duration, utc_iso
from hybridml.shared.errors import FreshnessError, ManifestError
from hybridml.shared.manifest import Manifest
from hybridml.shared.release import parse_time
from hybridml.shared.settings import load_env

log = logging.getLogger("hybridml.edge.freshness")


@dataclass(frozen=True)
class FreshnessSettings:
    """``stale_after_s``: how long without a newer signed manifest before the device calls
    itself stale. ``clock_skew_s``: how far the device clock may be off before a time
    comparison counts (expiry, and the clock's plausibility)."""

    stale_after_s: float = 24 * 3600.0
    clock_skew_s: float = 300.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> FreshnessSettings:
        """``HYBRIDML_STALE_AFTER_S`` and ``HYBRIDML_CLOCK_SKEW_S``."""
        return load_env(cls, env=env)


@dataclass(frozen=True)
class Seen:
    """What a device has accepted for one model: the highest sequence, the newest issued-at,
    and when (by its own clock) that issued-at arrived. None: nothing yet."""

    sequence: int | None = None
    issued: float | None = None
    fresh_at: float | None = None

    @classmethod
    def load(cls, state: Mapping[str, Any], *stored: Manifest | None) -> Seen:
        """From ``sync.json``'s fields and the releases of the manifests the store holds."""
        seqs: list[int] = []
        issued: list[float] = []
        seq = state.get("sequence")
        if isinstance(seq, int) and not isinstance(seq, bool):
            seqs.append(seq)
        with contextlib.suppress(ManifestError):
            issued.append(parse_time(state.get("issued"), "issued"))
        for m in stored:
            try:
                release = m.release if m is not None else None
            except ManifestError:
                release = None
            if release is not None:
                seqs.append(release.sequence)
                issued.append(release.issued)
        fresh_at: float | None = None
        with contextlib.suppress(ManifestError):
            fresh_at = parse_time(state.get("fresh_at"), "fresh_at")
        return cls(max(seqs) if seqs else None, max(issued) if issued else None, fresh_at)

    def save(self, state: MutableMapping[str, Any]) -> None:
        """Write the fields into a ``sync.json`` dict."""
        if self.sequence is not None:
            state["sequence"] = self.sequence
        if self.issued is not None:
            state["issued"] = utc_iso(self.issued)
        if self.fresh_at is not None:
            state["fresh_at"] = utc_iso(self.fresh_at)


def check_release(manifest: Manifest, *, name: str, ref: str, seen: Seen, now: float,
                  required: bool, settings: FreshnessSettings | None = None) -> Seen:
    """Accept ``manifest`` as the current answer for ``name``/``ref``, or raise
    :class:`FreshnessError` (module docstring). Returns what is seen after accepting it.

    ``required``: the manifest's signature was verified, so its release block must be there
    (a signed manifest without one is a replay from before this release, or an older cloud).
    """
    s = settings or FreshnessSettings()
    release = manifest.release
    what = f"manifest {manifest.name!r} v{manifest.version}"
    if release is None:
        if required:
            raise FreshnessError(
                f"{what} carries no signed release block (alias, sequence, expiry), so it "
                "could be a recording of any earlier manifest; the cloud must run hybridml "
                "0.2 or later. Nothing was installed", field="release")
        log.warning("%s has no release block: replay and downgrade checks are off", what)
        return seen
    if release.name != name or release.ref != ref:
        raise FreshnessError(
            f"asked for {name!r} at {ref!r}, the cloud's signed answer is for {release.name!r} "
            f"at {release.ref!r}: the request was rewritten on the way (a downgrade attempt?) "
            "— not installed", field="release.ref")
    if seen.sequence is not None and release.sequence < seen.sequence:
        raise FreshnessError(
            f"{what} has release sequence {release.sequence}, lower than the {seen.sequence} "
            "this device already accepted: it is a replayed or rolled-back manifest, not the "
            "cloud's current one — not installed (an operator's rollback is a higher "
            "sequence)", field="release.sequence", sequence=release.sequence,
            highest=seen.sequence)
    newest = max(release.issued, seen.issued or release.issued)
    if now + s.clock_skew_s < newest:
        log.warning("the device clock (%s) is before the newest manifest issued-at it has seen "
                    "(%s): the clock is wrong, so expiry is not checked; set the clock (NTP)",
                    utc_iso(now), utc_iso(newest))
    elif now > release.expires + s.clock_skew_s:
        raise FreshnessError(
            f"{what} expired at {utc_iso(release.expires)} (issued {utc_iso(release.issued)}); "
            f"the device clock says {utc_iso(now)}: a recorded manifest replayed late, or "
            "this device's clock is ahead — check it (NTP). The active version is kept",
            field="release.expires")
    fresher = seen.issued is None or release.issued > seen.issued
    # The cloud signed ``issued``, so the true time is at least that: a clock in the past
    # does not make a manifest that just arrived look old once the clock is set right.
    arrived = max(now, release.issued)
    return Seen(max(release.sequence, seen.sequence or 0), newest,
                arrived if fresher or seen.fresh_at is None else seen.fresh_at)


def describe(seen: Seen, now: float, settings: FreshnessSettings | None = None
             ) -> dict[str, Any]:
    """Freshness for ``status``: ``state`` is ``fresh``, ``stale`` (no newer signed manifest
    for ``stale_after_s``; ``since`` says from when) or ``unknown`` (none accepted yet)."""
    s = settings or FreshnessSettings()
    out: dict[str, Any] = {"sequence": seen.sequence,
                           "issued": utc_iso(seen.issued) if seen.issued is not None else None,
                           "stale_after_s": s.stale_after_s}
    if seen.fresh_at is None:
        out.update(state="unknown", since=None)
    elif now - seen.fresh_at > s.stale_after_s:
        out.update(state="stale", since=utc_iso(seen.fresh_at))
    else:
        out.update(state="fresh", since=utc_iso(seen.fresh_at))
    if seen.issued is not None and now + s.clock_skew_s < seen.issued:
        out["clock"] = "behind"  # before a time the cloud signed: this device's clock is wrong
    return out


def text(fresh: Mapping[str, Any]) -> str:
    """One line for ``status``."""
    state = fresh.get("state")
    if state == "stale":
        line = (f"STALE since {fresh['since']}: no newer signed manifest for over "
                f"{format_duration(float(fresh.get('stale_after_s') or 0))} (the cloud is "
                "unreachable, or the network is withholding updates)")
    elif state == "fresh":
        line = f"fresh (sequence {fresh['sequence']}, issued {fresh['issued']})"
    else:
        line = "unknown (no signed release accepted yet; run sync)"
    if fresh.get("clock") == "behind":
        line += "; the device clock is behind the cloud's signed time: set it (NTP)"
    return line


__all__ = ["FreshnessSettings", "Seen", "check_release", "describe", "text"]
