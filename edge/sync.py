"""Safe model sync: fetch, verify, smoke-test, then activate — or keep what is there.

One sync:

1. conditional manifest fetch (``If-None-Match``): nothing else happens when it is unchanged;
   a new manifest must be signed by a trusted key (:mod:`hybridml.edge.trust`) and be the
   current answer for the alias asked — not a replay, downgrade or expired copy
   (:mod:`hybridml.edge.freshness`) — before anything is fetched; the same model re-signed
   later only refreshes the stored manifest;
2. download only missing artifacts, resuming ``.part`` files with Range requests: from the
   direct URL the manifest names in ``sources`` (docs/storage.md §3; an S3 presigned URL or
   a public base: no token is sent there) when it names one and it has not expired, and on
   any failure of it — refused by the transport rules, unreachable, 403, 404, wrong size or
   sha256 — from the cloud's ``/v1/artifacts/<sha256>`` instead (one log line; a ``.part``
   the direct origin wrote to is dropped, and a corrupt download is never committed);
3. verify each artifact's size and sha256, fsync, rename into place;
4. load the new model and reproduce the manifest's golden rows within tolerance, and open the
   table bound to the model's sha256;
5. a manifest with a ``rollout`` block (docs/rollouts.md §3–4) names a companion, the other
   version this device also runs: its artifacts are fetched and verified the same way (steps
   2–4; their direct URLs are in the outer manifest's ``sources``: the companion, covered by
   the outer signature, carries no delivery keys of its own), then written to
   ``companion.json`` (:meth:`LocalStore.set_companion`); a manifest
   without one removes it. A companion that fails its checks is not fatal: the served version
   is activated alone and :attr:`SyncResult.companion_error` says why (the runtime spools a
   ``health`` record of it, :func:`load_failed`);
6. only then write the pointers (previous first, then active);
7. delete the artifacts no active, previous or companion version references
   (:meth:`LocalStore.gc`).

The same version under another rollout role (or with another companion) is the same model:
only steps 5 and 6 run, and the result is ``changed`` so that a runtime reloads.

Any failure of the served version leaves the active version untouched and raises a typed
error (in a rollout, with ``rollout`` and ``version`` in its details, so the caller can spool
a ``health`` record: :func:`load_failed`) (an ``OSError``
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.shared.clock import from_iso, utc_iso
from hybridml.shared.errors import (
    ArtifactError,
    HybridMLError,
    InferenceError,
    IntegrityError,
    ManifestError,
    ModelLoadError,
    TableError,
)
from hybridml.shared.files import crash_point
from hybridml.shared.manifest import EDGE_ROLES, Artifact, Manifest
from hybridml.shared.rollout import RolloutBlock, load_failed_body
from hybridml.shared.table import Table

from . import budget, compat
from .client import CloudClient
from .freshness import FreshnessSettings, Seen, check_release
from .session import ModelSession
from .store import LocalStore
from .trust import check_manifest
from .wear import should_save

log = logging.getLogger("hybridml.edge.sync")
MAX_ETAG = 512
ETAG_RE = re.compile(r'(W/)?"[\x21\x23-\x7e]*"')  # RFC 9110 entity-tag: quoted visible ASCII
# What a model that does not load or verify raises (a network failure is not one of them:
# it fails the sync, to be retried, and never counts against a rollout).
LOAD_ERRORS = (ModelLoadError, TableError, InferenceError, IntegrityError)


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
    role: str | None = None  # the rollout role of the active manifest, or None
    rollout: int | None = None  # the rollout's id, or None
    companion: int | None = None  # the companion version written to the store, or None
    companion_error: dict[str, Any] | None = None  # why the named companion was not kept
    # Bytes of the artifacts installed, by where they came from (docs/storage.md §3): a
    # direct URL the manifest named, or the cloud's /v1/artifacts route.
    bytes_direct: int = 0
    bytes_cloud: int = 0
    direct_failures: int = 0  # direct URLs that failed: those artifacts came from the cloud
    cloud: str | None = None  # the cloud replica in use at the end of the sync

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``sync --json``."""
        return {"name": self.name, "changed": self.changed, "version": self.version,
                "previous_version": self.previous_version,
                "downloaded": list(self.downloaded), "bytes_downloaded": self.bytes_downloaded,
                "bytes_direct": self.bytes_direct, "bytes_cloud": self.bytes_cloud,
                "direct_failures": self.direct_failures, "cloud": self.cloud,
                "wire_bytes": self.wire_bytes, "seconds": round(self.seconds, 3),
                "role": self.role, "rollout": self.rollout, "companion": self.companion,
                "companion_error": self.companion_error}

    def health(self) -> dict[str, Any] | None:
        """The ``health`` record body of a companion that failed (docs/rollouts.md §4), or
        None."""
        err = self.companion_error
        if err is None or self.rollout is None:
            return None
        return load_failed_body(self.name, err.get("version"), self.rollout,
                                str(err.get("code")), str(err.get("message")))


@dataclass(frozen=True)
class SyncOptions:
    """How a sync judges what it receives.

    ``alias``: the reference the device follows (signed into the manifest it gets back).
    ``allow_unsigned``: a device that trusts no key accepts unsigned manifests (unsafe off a
    trusted network). ``clock``: POSIX seconds, for expiry and freshness (tests pass one).
    ``cancel``: set (by the agent's SIGTERM) to abandon a download in progress between two
    blocks; its ``.part`` stays for the resume and nothing is activated.
    ``memory_budget_mb``: refuse a version whose estimated memory exceeds it, before it is
    downloaded (:mod:`hybridml.edge.budget`; None: ``$HYBRIDML_MEMORY_BUDGET_MB``, if set).
    """

    alias: str = "stable"
    allow_unsigned: bool = False
    freshness: FreshnessSettings | None = None
    clock: Callable[[], float] = time.time
    cancel: threading.Event | None = None
    memory_budget_mb: float | None = None


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
    if client.store_id is None:  # the cloud's unit for rollout cohorts without a token
        client.store_id = _store_id(store)
    t0 = time.perf_counter()
    with store.lock(name):
        store.clean_temp(name)
        state = store.sync_state(name)
        before = dict(state)  # an unchanged sync rewrites sync.json only hourly (wear.py)
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
                if should_save(store.root, name, before, state):
                    store.save_sync_state(name, state)
            except OSError as save_exc:  # e.g. the disk is still full: report the first error
                log.warning("could not record the sync error for %s: %s", name, save_exc)
            raise
        state.pop("last_error", None)
        state["last_sync"] = utc_iso(opts.clock())
        try:
            if should_save(store.root, name, before, state):
                store.save_sync_state(name, state)
        except OSError as exc:  # the version is active; only the bookkeeping failed
            log.warning("activated %s but could not record the sync state: %s", name, exc)
        if result.changed:
            store.gc()  # the version two back is no longer kept
    return result


def _store_id(store: LocalStore) -> str | None:
    from .identity import store_id

    try:
        return store_id(store.root)
    except (OSError, HybridMLError) as exc:  # the sync itself reports an unwritable store
        log.warning("no store id to send the cloud: %s", getattr(exc, "message", exc))
        return None


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
                          resp.wire_bytes, time.perf_counter() - t0, cloud=client.base_url)
    manifest = Manifest.loads(resp.body)
    if manifest.name != name:
        raise ManifestError(f"asked for {name!r}, the cloud sent a manifest for "
                            f"{manifest.name!r}", field="name")
    # SignatureError / FreshnessError before anything is fetched
    key_id = check_manifest(store.root, manifest, allow_unsigned=opts.allow_unsigned)
    seen = check_release(manifest, name=name, ref=opts.alias, now=opts.clock(),
                         seen=Seen.load(state, active, store.previous(name)),
                         required=key_id is not None, settings=opts.freshness)
    block = RolloutBlock.of(manifest)
    same = active is not None and active.content() == manifest.content()
    fetched: list[str] = []
    received = 0
    origins = _Origins(direct_sources(manifest, opts.clock()), cancel=opts.cancel)
    if not same:
        budget.check(manifest, opts.memory_budget_mb)  # ResourceError: nothing fetched
        try:
            compat.check(manifest)  # an onnxruntime too old for the model: nothing fetched
            received += _fetch(store, client, manifest, fetched, origins)
            verify_model(store, manifest)
        except LOAD_ERRORS as exc:
            if block is not None:  # the rollout's analysis counts load failures
                exc.details.update(rollout=block.id, version=manifest.version)
            raise
        crash_point("after_verify")
    companion, error, got = _companion(store, client, name, block, fetched, origins)
    received += got
    old_block = None if active is None else RolloutBlock.of(active)
    old_companion = store.companion(name)
    changed = not same or _role(old_block) != _role(block) or \
        _content(old_companion) != _content(companion)
    store.set_companion(name, companion)
    if active is None or active.dumps() != manifest.dumps():
        store.activate(manifest)  # a new version; or the same one, re-signed or a new role
    if not same:
        crash_point("after_active")
    seen.save(state)
    if error is None:
        _keep_etag(state, resp.etag)
    else:  # no ETag: the next sync gets the manifest again and retries the companion
        state.pop("etag", None)
    return SyncResult(name, changed, manifest.version,
                      None if same or active is None else active.version,
                      tuple(fetched), received, resp.wire_bytes + received,
                      time.perf_counter() - t0, None if block is None else block.role,
                      None if block is None else block.id,
                      None if companion is None else companion.version, error,
                      origins.direct, origins.cloud, origins.failures, client.base_url)


@dataclass
class _Origins:
    """Where a sync's artifacts come from: the direct ``urls`` the manifest names (for its
    own artifacts and its companion's), and the bytes taken from each origin; ``cancel``
    (:attr:`SyncOptions.cancel`) goes with every download."""

    urls: dict[str, str]
    direct: int = 0
    cloud: int = 0
    failures: int = 0
    cancel: threading.Event | None = None


def direct_sources(manifest: Manifest, now: float) -> dict[str, str]:
    """The direct URLs of ``manifest`` (signed with it); none once ``sources_expire`` is
    past: those would only answer 403."""
    sources = dict(manifest.sources)
    expire = manifest.raw.get("sources_expire")
    if sources and isinstance(expire, str):
        try:
            if from_iso(expire) <= now:
                log.info("the direct artifact URLs expired at %s; using the cloud", expire)
                return {}
        except ValueError:
            log.warning("ignoring a malformed sources_expire %r", expire[:40])
    return sources


def _fetch(store: LocalStore, client: CloudClient, manifest: Manifest, fetched: list[str],
           origins: _Origins) -> int:
    """Download the edge artifacts of ``manifest`` the store lacks (verified, committed);
    appends their roles to ``fetched``; returns the bytes received."""
    received = 0
    for art in manifest.artifacts:
        if art.role not in EDGE_ROLES or store.has_artifact(art.sha256, art.size):
            continue
        received += _fetch_one(store, client, art, origins)
        crash_point("after_commit")
        fetched.append(art.role)
        log.info("fetched %s %s (%d bytes)", art.role, art.sha256[:12], art.size)
    return received


def _fetch_one(store: LocalStore, client: CloudClient, art: Artifact, origins: _Origins
               ) -> int:
    """Download and commit one artifact: from its direct URL if it has one, else (or when
    that fails in any way) from the cloud. Returns the bytes received."""
    part = store.part_path(art.sha256)
    url = origins.urls.get(art.sha256)
    if url is not None:
        before = _size(part)
        try:
            got = client.download(art.sha256, part, art.size, source=url,
                                  cancel=origins.cancel)
            crash_point("after_download")
            store.commit_part(art.sha256, art.size)  # size and sha256, as from the cloud
        except HybridMLError as exc:
            if exc.details.get("stopped"):  # the agent is stopping: the origin did no wrong
                raise
            if _size(part) != before:  # bytes from a failing origin are suspect: start over
                part.unlink(missing_ok=True)
            origins.failures += 1
            log.warning("direct download of %s %s failed (%s); taking it from the cloud",
                        art.role, art.sha256[:12], exc.message)
        else:
            origins.direct += got
            return got
    got = client.download(art.sha256, part, art.size, cancel=origins.cancel)
    crash_point("after_download")
    store.commit_part(art.sha256, art.size)
    origins.cloud += got
    return got


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _companion(store: LocalStore, client: CloudClient, name: str, block: RolloutBlock | None,
               fetched: list[str], origins: _Origins
               ) -> tuple[Manifest | None, dict[str, Any] | None, int]:
    """Fetch and verify the rollout companion ``block`` names: ``(companion, None, bytes)``,
    or ``(None, error, bytes)`` when it fails its checks (a network or disk failure raises:
    the sync is retried, and it says nothing about the model)."""
    companion = None if block is None else block.companion_manifest()
    if companion is None:
        return None, None, 0
    kept = store.companion(name)
    if kept is not None and kept.content() == companion.content() and all(
            store.has_artifact(a.sha256, a.size) for a in companion.artifacts
            if a.role in EDGE_ROLES):
        return companion, None, 0  # verified when it was written
    got: list[str] = []
    received = 0
    try:
        received = _fetch(store, client, companion, got, origins)
        verify_model(store, companion)
    except LOAD_ERRORS as exc:
        log.warning("rollout %s: companion %s v%s failed its checks, serving v%s alone: %s",
                    block.id if block else None, name, companion.version,
                    block.serve if block else None, exc.message)
        return None, {"version": companion.version, "code": exc.code,
                      "message": exc.message}, received
    fetched.extend(f"companion.{role}" for role in got)
    return companion, None, received


def _role(block: RolloutBlock | None) -> tuple[Any, ...] | None:
    return None if block is None else (block.id, block.role, block.sample)


def _content(m: Manifest | None) -> bytes | None:
    return None if m is None else m.content()


def health_of(name: str, outcome: SyncResult | HybridMLError) -> dict[str, Any] | None:
    """The ``health`` record body a sync's outcome calls for (a rollout's companion or
    served version that failed its checks), or None."""
    if isinstance(outcome, SyncResult):
        return outcome.health()
    return load_failed(name, outcome)


def load_failed(name: str, exc: HybridMLError) -> dict[str, Any] | None:
    """The ``health`` record body (docs/rollouts.md §4) of a sync that failed because the
    served version of a rollout did not load or verify; None for any other failure."""
    rollout, version = exc.details.get("rollout"), exc.details.get("version")
    if not isinstance(exc, LOAD_ERRORS) or not isinstance(rollout, int):
        return None
    return load_failed_body(name, version, rollout, exc.code, exc.message)


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
