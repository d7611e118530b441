"""Direct artifact URLs for devices: the ``sources`` of a served manifest (docs/storage.md §3).

With ``--artifact-urls public:BASE`` an artifact's URL is ``BASE/<sha256>``; with ``presign``
the artifact store signs one (:meth:`BlobBackend.presign`) that lives
``presign_expiry_s`` seconds. Presigning costs a signature per artifact per request, so
:class:`DirectSources` keeps each URL while more than half its life is left: a manifest
served from the cache still gives a device at least half the lifetime to start its download,
and ``sources_expire`` is the earliest expiry among the URLs it names. A URL the store cannot
make is logged and left out: the device takes that artifact from ``/v1/artifacts/<sha>``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError, HybridMLError
from hybridml.shared.manifest import EDGE_ROLES

from .storage import Storage

log = logging.getLogger("hybridml.cloud.sources")
MAX_CACHED = 4096  # presigned URLs kept; far more than the artifacts a fleet is served


class DirectSources:
    """The ``sources`` (and ``sources_expire``) a served manifest carries, for ``storage``'s
    artifact-URL mode over the blob backend ``blobs``; ``clock`` is POSIX seconds."""

    def __init__(self, blobs: Any, storage: Storage,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = storage.artifact_urls
        self.expiry_s = storage.presign_expiry_s
        self.blobs = blobs
        self.clock = clock
        self._base = self.mode[len("public:"):].rstrip("/") if self.on_public else ""
        self._cache: dict[str, tuple[str, float, float]] = {}  # sha -> (url, made, expires)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when the mode is ``off``: manifests name no source."""
        return self.mode != "off"

    @property
    def on_public(self) -> bool:
        """True for ``public:BASE``: URLs that never expire."""
        return self.mode.startswith("public:")

    def add(self, doc: dict[str, Any], *manifests: Mapping[str, Any] | None) -> None:
        """Put ``sources`` (and ``sources_expire``) for the edge artifacts of ``manifests``
        (the served one and its rollout companion) into the served document ``doc``."""
        shas = [a["sha256"] for m in manifests if m is not None
                for a in m.get("artifacts", ()) if a.get("role") in EDGE_ROLES]
        urls, expires = self.urls(shas)
        if urls:
            doc["sources"] = urls
            if expires is not None:
                doc["sources_expire"] = utc_iso(expires)

    def urls(self, shas: Iterable[str]) -> tuple[dict[str, str], float | None]:
        """The URL of each of ``shas`` that has one, and the earliest expiry (None: never)."""
        if self.on_public:
            return {sha: f"{self._base}/{sha}" for sha in shas}, None
        out: dict[str, str] = {}
        earliest: float | None = None
        for sha in shas:
            got = self._presigned(sha)
            if got is not None:
                out[sha] = got[0]
                earliest = got[1] if earliest is None else min(earliest, got[1])
        return out, earliest

    def _presigned(self, sha: str) -> tuple[str, float] | None:
        now = self.clock()
        with self._lock:
            hit = self._cache.get(sha)
        if hit is not None and now < hit[1] + self.expiry_s / 2:
            return hit[0], hit[2]
        presign = getattr(self.blobs, "presign", None)
        try:
            if presign is None:
                raise ConfigError(f"the artifact store {self.blobs!r} cannot presign URLs; use "
                                  "--artifact-urls public:<base URL> or off",
                                  field="artifact_urls")
            url = str(presign(sha, self.expiry_s))
        except HybridMLError as exc:  # the device takes this artifact from the cloud instead
            log.error("no direct URL for artifact %s: %s", sha[:12], exc.message)
            return None
        with self._lock:
            if len(self._cache) >= MAX_CACHED:
                self._cache = {k: v for k, v in self._cache.items() if v[2] > now}
                if len(self._cache) >= MAX_CACHED:
                    self._cache.clear()
            self._cache[sha] = (url, now, now + self.expiry_s)
        return url, now + self.expiry_s


__all__ = ["DirectSources"]
