"""Safe model sync: fetch, verify, smoke-test, then activate — or keep what is there.

One sync:

1. conditional manifest fetch (``If-None-Match``): nothing else happens when it is unchanged;
   a new manifest must be signed by a trusted key (:mod:`hybridml.edge.trust`) and be the
   current answer for the alias asked — not a replay, downgrade or expired copy
   (:mod:`hybridml.edge.freshness`) — before anything is fetched; the same model re-signed
   later only refreshes the stored manifest;
2. download only missing artifacts, resuming ``.part`` files with Range requests;
3. verify each artifact's size and sha256, fsync, rename into place;
4. load the new model and reproduce the manifest's golden rows within tolerance, and open the
   table bound to the model's sha256;
5. only then write the pointers (previous first, then active);
6. delete the artifacts no active or previous version references (:meth:`LocalStore.gc`).

Any failure leaves the active version untouched and raises a typed error (an ``OSError``
such as a full disk becomes :class:`ArtifactError`). What stays in the store after a failure:
a ``.part`` file cut by a broken connection (the next sync resumes it); never a ``.part`` that
failed verification (wrong size or sha256, undecodable, too long) or that a full disk stopped;
and artifacts that passed their sha256 check stay even when the model then fails its golden
rows — they are complete, immutable and content-addressed, so a retry need not fetch them
again. Temp files a SIGKILL left behind are removed by the next sync.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ArtifactError, HybridMLError, ManifestError, ModelLoadError
from hybridml.shared.files import crash_point
from hybridml.shared.manifest import Manifest
from hybridml.shared.table import Table

from .client import CloudClient
from .freshness import FreshnessSettings, Seen, check_release
from .session import ModelSession
from .store import LocalStore
from .trust import check_manifest

log = logging.getLogger("hybridml.edge.sync")
EDGE_ROLES = ("model", "table")
MAX_ETAG = 512
ETAG_RE = re.compile(r'(W/)?"[\x21\x23-\x7e]*"')  # RFC 9110 entity-tag: quoted visible ASCII


@dataclass(frozen=True)
class SyncResult:
    """What a sync did."""

    name: str
    changed: bool
    version: int | None
    previous_version: int | None
    downloaded: tuple[str, ...]
    bytes_downloaded: int
    wire_bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``sync --json``."""
        return {"name": self.name, "changed": self.changed, "version": self.version,
                "previous_version": self.previous_version,
                "downloaded": list(self.downloaded), "bytes_downloaded": self.bytes_downloaded,
                "wire_bytes": self.wire_bytes, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class SyncOptions:
    """How a sync judges what it receives.

    ``alias``: the reference the device follows (signed into the manifest it gets back).
    ``allow_unsigned``: a device that trusts no key accepts unsigned manifests (unsafe off a
    trusted network). ``clock``: POSIX seconds, for expiry and freshness (tests pass one).
    """

    alias: str = "stable"
    allow_unsigned: bool = False
    freshness: FreshnessSettings | None = None
    clock: Callable[[], float] = time.time


def sync(store: LocalStore, client: CloudClient, name: str,
         options: SyncOptions | None = None, *, allow_unsigned: bool | None = None
         ) -> SyncResult:
    """Bring ``name`` in ``store`` up to the cloud's manifest; see the module docstring.

    ``allow_unsigned`` overrides ``options.allow_unsigned`` (a shortcut for scripts).
    """
    opts = options or SyncOptions()
    if allow_unsigned is not None:
        opts = dataclasses.replace(opts, allow_unsigned=allow_unsigned)
    store.ensure()
    t0 = time.perf_counter()
    with store.lock(name):
        store.clean_temp(name)
        state = store.sync_state(name)
        state["last_attempt"] = utc_iso(opts.clock())
        try:
            try:
                with store.shared():  # no store gc while artifacts land and pointers move
                    result = _sync_locked(store, client, name, state, t0, opts)
            except OSError as exc:
                raise _os_error(exc, store) from exc
        except HybridMLError as exc:
            state["last_error"] = f"{exc.code}: {exc.message}"
            try:
                store.save_sync_state(name, state)
            except OSError as save_exc:  # e.g. the disk is still full: report the first error
                log.warning("could not record the sync error for %s: %s", name, save_exc)
            raise
        state.pop("last_error", None)
        state["last_sync"] = utc_iso(opts.clock())
        try:
            store.save_sync_state(name, state)
        except OSError as exc:  # the version is active; only the bookkeeping failed
            log.warning("activated %s but could not record the sync state: %s", name, exc)
        if result.changed:
            store.gc()  # the version two back is no longer kept
    return result


def _os_error(exc: OSError, store: LocalStore) -> ArtifactError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ArtifactError(f"the disk holding the store {store.root} is full "
                             f"({exc.strerror}); free space and sync again", errno=exc.errno)
    return ArtifactError(f"cannot write the store {store.root}: {exc.strerror or exc} "
                         f"({getattr(exc, 'filename', None) or 'no file name'}); check its "
                         "permissions and free space", errno=exc.errno)


def _sync_locked(store: LocalStore, client: CloudClient, name: str, state: dict[str, Any],
                 t0: float, opts: SyncOptions) -> SyncResult:
    active = store.active(name)
    # Only trust the stored ETag if the active pointer still exists.
    etag = state.get("etag") if active is not None else None
    resp = client.manifest(name, etag, alias=opts.alias)
    if resp.body is None:  # 304: unsigned, so it never counts as fresh (a freeze shows)
        return SyncResult(name, False, active.version if active else None, None, (), 0,
                          resp.wire_bytes, time.perf_counter() - t0)
    manifest = Manifest.loads(resp.body)
    if manifest.name != name:
        raise ManifestError(f"asked for {name!r}, the cloud sent a manifest for "
                            f"{manifest.name!r}", field="name")
    # SignatureError / FreshnessError before anything is fetched
    key_id = check_manifest(store.root, manifest, allow_unsigned=opts.allow_unsigned)
    seen = check_release(manifest, name=name, ref=opts.alias, now=opts.clock(),
                         seen=Seen.load(state, active, store.previous(name)),
                         required=key_id is not None, settings=opts.freshness)
    if active is not None and active.content() == manifest.content():
        if active.dumps() != manifest.dumps():
            store.activate(manifest)  # the same version, newer release or signature
        seen.save(state)
        _keep_etag(state, resp.etag)
        return SyncResult(name, False, active.version, None, (), 0, resp.wire_bytes,
                          time.perf_counter() - t0)
    fetched: list[str] = []
    received = 0
    for art in manifest.artifacts:
        if art.role not in EDGE_ROLES or store.has_artifact(art.sha256, art.size):
            continue
        received += client.download(art.sha256, store.part_path(art.sha256), art.size)
        crash_point("after_download")
        store.commit_part(art.sha256, art.size)
        crash_point("after_commit")
        fetched.append(art.role)
        log.info("fetched %s %s (%d bytes)", art.role, art.sha256[:12], art.size)
    verify_model(store, manifest)
    crash_point("after_verify")
    store.activate(manifest)
    crash_point("after_active")
    seen.save(state)
    _keep_etag(state, resp.etag)
    return SyncResult(name, True, manifest.version, active.version if active else None,
                      tuple(fetched), received, resp.wire_bytes + received,
                      time.perf_counter() - t0)


def _keep_etag(state: dict[str, Any], etag: str | None) -> None:
    """Remember ``etag`` for the next conditional request, if it is one a server will take
    back: a hostile ETag (control characters, kilobytes) stored here would be sent on every
    later sync and get each one refused, even on a clean network."""
    if etag is not None and len(etag) <= MAX_ETAG and ETAG_RE.fullmatch(etag):
        state["etag"] = etag
    else:
        state.pop("etag", None)
        if etag is not None:
            log.warning("ignoring a malformed ETag from the cloud (%d characters)", len(etag))


def verify_model(store: LocalStore, manifest: Manifest) -> ModelSession:
    """Load the manifest's model and check it reproduces the golden rows; open its table."""
    model = manifest.artifact("model")
    assert model is not None  # Manifest.from_json guarantees a model artifact
    session = ModelSession(store.artifact_path(model.sha256), manifest.schema, manifest.task)
    check_golden(session, manifest)
    table = manifest.artifact("table")
    if table is not None:
        Table.open(store.artifact_path(table.sha256), model_sha256=model.sha256).close()
    return session


def check_golden(session: ModelSession, manifest: Manifest) -> None:
    """Raise :class:`ModelLoadError` if the model's outputs on the golden rows drift."""
    golden = manifest.golden
    rows = golden.get("rows")
    if not rows:
        return
    out = session.run(manifest.schema.encode(rows))
    tol = float(golden.get("tolerance", 1e-4))
    if out.values is not None:
        expected = np.asarray(golden.get("values", []), dtype=np.float64)
        diff = np.abs(out.values.astype(np.float64) - expected)
        if expected.shape != diff.shape or (diff > tol).any():
            raise ModelLoadError(
                f"model v{manifest.version} does not reproduce its golden rows (largest "
                f"difference {float(diff.max()) if diff.size else 'n/a'} > {tol}); not activated")
        return
    assert out.labels is not None and out.probabilities is not None
    labels = np.asarray(golden.get("labels", []))
    probs = np.asarray(golden.get("probabilities", []), dtype=np.float64)
    if labels.shape != out.labels.shape or not np.array_equal(labels, out.labels):
        raise ModelLoadError(f"model v{manifest.version} predicts other labels on its golden "
                             "rows than the cloud recorded; not activated")
    if probs.shape != out.probabilities.shape or \
            float(np.abs(probs - out.probabilities).max()) > tol:
        raise ModelLoadError(f"model v{manifest.version}'s probabilities on its golden rows "
                             f"differ from the cloud's by more than {tol}; not activated")
