"""The signed release block: which alias a manifest answers, how current it is, until when.

A signature alone says a manifest once came from the cloud, not that it is the answer to
*this* request *now*. So every manifest the cloud serves carries a ``release`` object inside
the signed bytes (TUF's timestamp role, folded into the one document a device fetches)::

    "release": {"format": 1, "name": "eta", "ref": "stable", "version": 3,
                "sequence": 17, "issued": "2026-12-01T16:00:00Z",
                "expires": "2026-12-02T16:00:00Z"}

* ``name`` and ``ref``: the model and the alias (or version number, as digits) the device
  asked for. A proxy that rewrites ``?alias=stable`` to ``?version=1`` gets a manifest whose
  ``ref`` is ``"1"``, which the device refuses.
* ``sequence``: per model, kept in the registry, raised by every change of what the model's
  references resolve to (a new version, a promote, a rollback, an alias removed, an artifact
  attached). It never goes down, so an operator's rollback is a *higher* sequence that
  devices follow, while a replayed or downgraded manifest is a lower one that they refuse.
* ``issued`` and ``expires``: the cloud re-signs on a fixed grid (every
  :data:`REFRESH_S` seconds, at most a quarter of the lifetime), so every worker and replica
  serves the same bytes within a period and ETags keep working; ``expires`` is ``issued``
  plus the lifetime (:data:`DEFAULT_LIFETIME_S`, 24 hours, ``HYBRIDML_MANIFEST_LIFETIME_S``).

The block has its own ``format``; the manifest around it keeps ``"format": 1``, so a device
of the previous release still reads (and verifies) the manifests of this one.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .clock import FORMAT as TIME_FORMAT
from .clock import utc_iso
from .errors import ManifestError

RELEASE_FORMAT = 1
DEFAULT_LIFETIME_S = 24 * 3600
REFRESH_S = 3600
MAX_SEQUENCE = 2**62
_FIELDS = ("format", "name", "ref", "version", "sequence", "issued", "expires")


def parse_time(text: object, field: str) -> float:
    """POSIX seconds of a ``YYYY-MM-DDTHH:MM:SSZ`` timestamp; :class:`ManifestError` otherwise."""
    if isinstance(text, str) and len(text) == 20:
        try:
            return float(calendar.timegm(time.strptime(text, TIME_FORMAT)))
        except ValueError:
            pass
    raise ManifestError(f"release '{field}' {str(text)[:40]!r} is not a UTC time like "
                        "2026-12-01T16:00:00Z", field=f"release.{field}")


def issue_window(now: float, lifetime_s: int) -> tuple[float, float]:
    """``(issued, expires)`` for a release signed at ``now``: issued on the refresh grid."""
    refresh = max(1, min(REFRESH_S, lifetime_s // 4))
    issued = float(int(now) // refresh * refresh)
    return issued, issued + lifetime_s


@dataclass(frozen=True)
class Release:
    """A parsed ``release`` block (see the module docstring)."""

    name: str
    ref: str
    version: int
    sequence: int
    issued: float
    expires: float

    def to_json(self) -> dict[str, Any]:
        """The block as it goes into a manifest."""
        return {"format": RELEASE_FORMAT, "name": self.name, "ref": self.ref,
                "version": self.version, "sequence": self.sequence,
                "issued": utc_iso(self.issued), "expires": utc_iso(self.expires)}

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Release | None:
        """The release block of a decoded manifest; None when it has none."""
        data = manifest.get("release")
        return None if data is None else cls.from_json(data)

    @classmethod
    def from_json(cls, data: Any) -> Release:
        """Validate a decoded block; :class:`ManifestError` names the field."""
        if not isinstance(data, Mapping):
            raise ManifestError("manifest 'release' must be an object", field="release")
        if data.get("format") != RELEASE_FORMAT:
            raise ManifestError(f"release format {str(data.get('format'))[:20]!r} is not "
                                f"supported (this kit reads {RELEASE_FORMAT}); upgrade hybridml "
                                "on this device", field="release.format")
        unknown = sorted(k for k in data if k not in _FIELDS)
        if unknown:
            raise ManifestError(f"release has unknown field {unknown[0][:40]!r}",
                                field="release")
        name, ref = data.get("name"), data.get("ref")
        if not isinstance(name, str) or not isinstance(ref, str) or not ref or len(ref) > 64:
            raise ManifestError("release 'name' and 'ref' must be strings", field="release.ref")
        version, sequence = data.get("version"), data.get("sequence")
        for field, value, low in (("version", version, 1), ("sequence", sequence, 0)):
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not low <= value <= MAX_SEQUENCE:
                raise ManifestError(f"release '{field}' must be an integer >= {low}, got "
                                    f"{str(value)[:40]!r}", field=f"release.{field}")
        issued = parse_time(data.get("issued"), "issued")
        expires = parse_time(data.get("expires"), "expires")
        if expires <= issued:
            raise ManifestError("release 'expires' is not after 'issued'",
                                field="release.expires")
        assert isinstance(version, int) and isinstance(sequence, int)
        return cls(name, ref, version, sequence, issued, expires)


__all__ = ["DEFAULT_LIFETIME_S", "REFRESH_S", "RELEASE_FORMAT", "Release", "issue_window",
           "parse_time"]
