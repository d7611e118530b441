"""The edge's local store: verified artifacts and the active/previous version pointers.

Layout::

    <store>/artifacts/<sha256>            verified blobs (temp name -> fsync -> rename)
    <store>/artifacts/<sha256>.part       an interrupted download, resumed with a Range request
    <store>/models/<name>/active.json     the active manifest (replaced atomically)
    <store>/models/<name>/previous.json   the one before it, for rollback
    <store>/models/<name>/rollback.json   a committed rollback not yet applied to the two above
    <store>/models/<name>/companion.json  the rollout companion: the other version a device in
                                          a rollout also runs (docs/rollouts.md §4)
    <store>/models/<name>/sync.json       ETag, last sync time, last error
    <store>/models/<name>/.lock           held while syncing or rolling back
    <store>/.store.lock                   shared by syncs; exclusive for garbage collection

Every pointer is written to a temp file, fsynced and renamed over the old one, and the
directory is fsynced; activation writes ``previous.json`` before ``active.json``. A crash
(power loss, SIGKILL) at any instant therefore leaves the store on the old or the new version;
the next sync under the lock removes temp files a crash left behind. A rollback swaps both
pointers, so it commits in one atomic write of ``rollback.json`` (both manifests), which readers
prefer to the pointers until the next change applies it: after a crash the store is on the old
or the rolled-back version, and the way back is kept either way.

The store keeps its disk: after each activation and rollback, :meth:`LocalStore.gc` deletes
the artifacts no active, previous or companion pointer references, so a device holds at most
three versions of each model whatever the number of syncs (two outside a rollout).

``companion.json`` is written like the pointers (atomically) and only ever read beside
``active.json``: the runtime loads the companion only when its version is the one the active
manifest's ``rollout`` block names, so a crash between the two writes never pairs a served
version with the wrong companion.

Test hook: :func:`hybridml.shared.files.crash_point` kills the process with SIGKILL at a
named step when ``$HYBRIDML_TEST_CRASH_AT`` names that step (``mid_download``,
``after_download``, ``after_commit``, ``after_verify``, ``after_previous``,
``before_replace:<file>``, ``after_active``, ``rollback_journal``, ``rollback_between``,
``mid_gc``). It does nothing unless the variable is set; the fault tests use it to prove the
claim above at every step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridml.shared.errors import IntegrityError, ManifestError, NoModelError
from hybridml.shared.files import atomic_write, crash_point, file_sha256, fsync_dir
from hybridml.shared.manifest import EDGE_ROLES, SHA256_RE, Manifest, check_name

log = logging.getLogger("hybridml.edge.store")
JOURNAL = "rollback.json"
COMPANION = "companion.json"
STORE_LOCK = ".store.lock"
PART_MAX_AGE_S = 24 * 3600.0  # a partial download untouched this long is abandoned


@dataclass(frozen=True)
class GcResult:
    """What one :meth:`LocalStore.gc` removed."""

    files: int
    bytes: int


class LocalStore:
    """A directory holding artifacts and per-model version pointers."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        self.artifacts = self.root / "artifacts"
        self.models = self.root / "models"

    def ensure(self) -> LocalStore:
        """Create the directories (idempotent) and return self."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.models.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------------------ artifacts
    def artifact_path(self, sha256: str) -> Path:
        """Path of a verified artifact (it may not exist)."""
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise IntegrityError(f"invalid sha256 {sha256!r}", field="sha256")
        return self.artifacts / sha256

    def part_path(self, sha256: str) -> Path:
        """Path of a partial download of ``sha256``."""
        return self.artifact_path(sha256).with_suffix(".part")

    def has_artifact(self, sha256: str, size: int) -> bool:
        """True if the verified artifact is present with the expected size."""
        p = self.artifact_path(sha256)
        return p.is_file() and p.stat().st_size == size

    def commit_part(self, sha256: str, size: int) -> Path:
        """Verify a finished ``.part`` file and rename it into place; drop it if it is bad."""
        part = self.part_path(sha256)
        actual = part.stat().st_size
        if actual != size:
            part.unlink()
            raise IntegrityError(
                f"artifact {sha256[:12]} has {actual} bytes, the manifest says {size}; "
                "the download was cut or the cloud serves a different file", sha256=sha256)
        digest = file_sha256(part)
        if digest != sha256:
            part.unlink()
            raise IntegrityError(
                f"artifact {sha256[:12]} hashes to {digest[:12]}; it was corrupted in transit "
                "or on the cloud — not installed", sha256=sha256)
        with open(part, "rb+") as fh:
            os.fsync(fh.fileno())
        final = self.artifact_path(sha256)
        os.replace(part, final)
        fsync_dir(self.artifacts)
        return final

    # ------------------------------------------------------------------------------- pointers
    def model_dir(self, name: str) -> Path:
        """Directory of one model's pointers."""
        return self.models / check_name(name)

    def _read_pointer(self, name: str, which: str) -> Manifest | None:
        d = self.model_dir(name)
        journal = self._journal(d)
        if journal is not None:  # a rollback committed but not yet applied: it holds both
            text = journal[which].encode()
        else:
            try:
                text = (d / f"{which}.json").read_bytes()
            except FileNotFoundError:
                return None
        try:
            return Manifest.loads(text)
        except ManifestError as exc:
            raise ManifestError(f"the store's {which} pointer for {name!r} is unreadable "
                                f"({exc.message}); run sync again") from exc

    def active(self, name: str) -> Manifest | None:
        """The active manifest of ``name``, or None."""
        return self._read_pointer(name, "active")

    def previous(self, name: str) -> Manifest | None:
        """The manifest kept for rollback, or None."""
        return self._read_pointer(name, "previous")

    def require_active(self, name: str) -> Manifest:
        """The active manifest, or :class:`NoModelError` saying to run sync."""
        m = self.active(name)
        if m is None:
            raise NoModelError(
                f"no model {name!r} in the store {self.root}; run "
                f"'hybridml-edge sync --cloud URL --name {name} --store {self.root}' first",
                name=name)
        return m

    def activate(self, manifest: Manifest) -> None:
        """Make ``manifest`` active and keep the current one as previous (crash-safe order)."""
        d = self.model_dir(manifest.name)
        d.mkdir(parents=True, exist_ok=True)
        self._apply_journal(d)
        current = d / "active.json"
        if current.exists():
            old = current.read_bytes()
            if Manifest.loads(old).version != manifest.version:
                atomic_write(d / "previous.json", old)
                crash_point("after_previous")
        atomic_write(current, manifest.dumps())
        log.info("activated %s v%s", manifest.name, manifest.version)

    def companion(self, name: str) -> Manifest | None:
        """The rollout companion of ``name`` (the other version it also runs), or None."""
        try:
            text = (self.model_dir(name) / COMPANION).read_bytes()
        except FileNotFoundError:
            return None
        try:
            return Manifest.loads(text)
        except ManifestError as exc:
            raise ManifestError(f"the store's companion pointer for {name!r} is unreadable "
                                f"({exc.message}); run sync again") from exc

    def set_companion(self, name: str, manifest: Manifest | None) -> None:
        """Write (atomically) or, with None, remove the rollout companion of ``name``."""
        d = self.model_dir(name)
        path = d / COMPANION
        if manifest is None:
            if path.exists():
                path.unlink()
                fsync_dir(d)
                log.info("removed the rollout companion of %s", name)
            return
        if manifest.name != name:
            raise ManifestError(f"a companion of {name!r} must be a manifest of {name!r}, "
                                f"not of {manifest.name!r}", field="name")
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(path, manifest.dumps())
        log.info("rollout companion of %s: v%s", name, manifest.version)

    def rollback(self, name: str) -> Manifest:
        """Swap active and previous; raises :class:`NoModelError` when there is no previous."""
        d = self.model_dir(name)
        self._apply_journal(d)
        prev, cur = self.previous(name), self.active(name)
        if prev is None or cur is None or prev.version == cur.version:
            # equal versions: a crash mid-activation or mid-rollback left one pointer twice
            raise NoModelError(f"model {name!r} has no previous version to roll back to",
                               name=name)
        for a in prev.artifacts:
            if a.role in EDGE_ROLES and not self.has_artifact(a.sha256, a.size):
                raise NoModelError(f"previous version v{prev.version} of {name!r} is missing "
                                   f"artifact {a.sha256[:12]}; run sync instead", name=name)
        # Swapping takes two pointer writes; a crash between them would leave one version in
        # both. So the swap is first committed in one atomic journal write holding both
        # pointers: readers take the journal over the pointers, and the next change applies it.
        journal = {"active": prev.dumps().decode(), "previous": cur.dumps().decode()}
        atomic_write(d / JOURNAL, json.dumps(journal).encode())
        crash_point("rollback_journal")
        self._apply_journal(d)
        log.info("rolled %s back from v%s to v%s", name, cur.version, prev.version)
        self.gc()  # the version two back is no longer kept
        return prev

    @staticmethod
    def _journal(d: Path) -> dict[str, str] | None:
        """The committed rollback in ``d`` not yet applied to the pointers, or None."""
        try:
            data = json.loads((d / JOURNAL).read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, RecursionError) as exc:  # written atomically: only tampering
            raise ManifestError(f"the rollback journal {d / JOURNAL} is unreadable ({exc}); "
                                "delete it and run sync") from exc
        if not isinstance(data, dict) or not all(
                isinstance(data.get(k), str) for k in ("active", "previous")):
            raise ManifestError(f"the rollback journal {d / JOURNAL} is malformed; delete it "
                                "and run sync")
        return data

    def _apply_journal(self, d: Path) -> None:
        """Write a committed rollback to the pointers and drop the journal (under the lock).

        Idempotent: a crash at any step leaves the journal, and the next call redoes it all.
        """
        journal = self._journal(d)
        if journal is None:
            return
        atomic_write(d / "previous.json", journal["previous"].encode())
        crash_point("rollback_between")
        atomic_write(d / "active.json", journal["active"].encode())
        (d / JOURNAL).unlink()
        fsync_dir(d)

    def sync_state(self, name: str) -> dict[str, Any]:
        """ETag, last sync and last error recorded for ``name``."""
        try:
            data = json.loads((self.model_dir(name) / "sync.json").read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError, RecursionError):
            return {}  # bookkeeping only: the next sync writes it again

    def save_sync_state(self, name: str, state: dict[str, Any]) -> None:
        """Record sync state (atomically)."""
        d = self.model_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(d / "sync.json", json.dumps(state, sort_keys=True).encode())

    def clean_temp(self, name: str) -> int:
        """Remove temp files a crash left in ``name``'s directory (call under :meth:`lock`)."""
        removed = 0
        d = self.model_dir(name)
        if d.is_dir():
            for p in d.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d temp file(s) a crash left in %s", removed, d)
        return removed

    def model_names(self) -> list[str]:
        """Names of models that have a directory in the store."""
        if not self.models.is_dir():
            return []
        return sorted(p.name for p in self.models.iterdir() if p.is_dir())

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock on ``name`` (one sync or rollback at a time)."""
        d = self.model_dir(name)
        d.mkdir(parents=True, exist_ok=True)
        with open(d / ".lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the store-wide lock shared: while any holder writes artifacts or pointers,
        :meth:`gc` does not run (it needs the lock exclusively and skips when it cannot)."""
        with self._store_lock(fcntl.LOCK_SH) as held:
            assert held
            yield

    @contextlib.contextmanager
    def _store_lock(self, mode: int) -> Iterator[bool]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / STORE_LOCK, "a+") as fh:
            try:
                fcntl.flock(fh.fileno(), mode)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def referenced(self) -> set[str]:
        """sha256 of every artifact an active, previous or companion pointer of any model
        names (a committed rollback journal included)."""
        keep: set[str] = set()
        for name in self.model_names():
            for m in (self.active(name), self.previous(name), self.companion(name)):
                if m is not None:
                    keep.update(a.sha256 for a in m.artifacts)
        return keep

    def gc(self, *, now: float | None = None) -> GcResult | None:
        """Delete the artifacts (models, tables) that no active, previous or companion version
        of any model references, and partial downloads untouched for :data:`PART_MAX_AGE_S`.

        Runs after every activation and rollback. Returns None, doing nothing, while a sync
        or rollback holds the store (:meth:`shared`): the next activation cleans up instead.
        Only unreferenced files are deleted, one unlink each, so a crash mid-way leaves
        every file a kept version needs, and the next run finishes the job.
        """
        with self._store_lock(fcntl.LOCK_EX | fcntl.LOCK_NB) as held:
            if not held or not self.artifacts.is_dir():
                return None
            keep = self.referenced()
            now = time.time() if now is None else now
            files = size = 0
            for p in sorted(self.artifacts.iterdir()):
                sha, _, suffix = p.name.partition(".")
                if sha in keep and not suffix:
                    continue
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                if suffix == "part" and now - st.st_mtime < PART_MAX_AGE_S:
                    continue  # a download that may still resume
                try:
                    p.unlink(missing_ok=True)
                except OSError as exc:  # e.g. a read-only store: keep serving, say so
                    log.warning("store gc could not remove %s: %s", p, exc.strerror or exc)
                    continue
                files += 1
                size += st.st_size
                crash_point("mid_gc")
            if files:
                fsync_dir(self.artifacts)
                log.info("store gc: removed %d file(s), %s bytes", files, f"{size:,}")
            return GcResult(files, size)

    def disk_bytes(self) -> int:
        """Bytes the store's files take (artifacts, partial downloads, pointers)."""
        total = 0
        if self.root.is_dir():
            for p in self.root.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    if p.is_file():
                        total += p.stat().st_size
        return total
