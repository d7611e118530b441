"""The edge's local store: verified artifacts and the active/previous version pointers.

Layout::

    <store>/artifacts/<sha256>            verified blobs (temp name -> fsync -> rename)
    <store>/artifacts/<sha256>.part       an interrupted download, resumed with a Range request
    <store>/models/<name>/active.json     the active manifest (replaced atomically)
    <store>/models/<name>/previous.json   the one before it, for rollback
    <store>/models/<name>/rollback.json   a committed rollback not yet applied to the two above
    <store>/models/<name>/sync.json       ETag, last sync time, last error
    <store>/models/<name>/.lock           held while syncing or rolling back

Every pointer is written to a temp file, fsynced and renamed over the old one, and the
directory is fsynced; activation writes ``previous.json`` before ``active.json``. A crash
(power loss, SIGKILL) at any instant therefore leaves the store on the old or the new version;
the next sync under the lock removes temp files a crash left behind. A rollback swaps both
pointers, so it commits in one atomic write of ``rollback.json`` (both manifests), which readers
prefer to the pointers until the next change applies it: after a crash the store is on the old
or the rolled-back version, and the way back is kept either way.

Test hook: :func:`crash_point` kills the process with SIGKILL at a named step when
``$HYBRIDML_TEST_CRASH_AT`` names that step (``mid_download``, ``after_download``,
``after_commit``, ``after_verify``, ``after_previous``, ``before_replace:<file>``,
``after_active``, ``rollback_journal``, ``rollback_between``). It does nothing unless the
variable is set; the fault tests use it to prove the claim above at every step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hybridml.shared.errors import IntegrityError, ManifestError, NoModelError
from hybridml.shared.manifest import SHA256_RE, Manifest, check_name

log = logging.getLogger("hybridml.edge.store")
CRASH_ENV = "HYBRIDML_TEST_CRASH_AT"
JOURNAL = "rollback.json"


def crash_point(point: str) -> None:
    """Test hook: SIGKILL this process here if ``$HYBRIDML_TEST_CRASH_AT`` equals ``point``."""
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.

    ``mode`` sets the file's permissions before it becomes visible.
    """
    import tempfile  # here, not at the top: a process that only predicts never writes

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        crash_point(f"before_replace:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


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
            if a.role in ("model", "table") and not self.has_artifact(a.sha256, a.size):
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
        return prev

    @staticmethod
    def _journal(d: Path) -> dict[str, str] | None:
        """The committed rollback in ``d`` not yet applied to the pointers, or None."""
        try:
            data = json.loads((d / JOURNAL).read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # written atomically, so only tampering gets here
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
        except (FileNotFoundError, ValueError):
            return {}

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

    def gc(self) -> int:
        """Delete artifacts no model's active or previous manifest references; return count."""
        keep: set[str] = set()
        for name in self.model_names():
            for m in (self.active(name), self.previous(name)):
                if m is not None:
                    keep.update(a.sha256 for a in m.artifacts)
        removed = 0
        if self.artifacts.is_dir():
            for p in self.artifacts.iterdir():
                sha = p.name.split(".")[0]
                if sha not in keep or p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)
                    removed += 1
        return removed


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib  # here: it loads OpenSSL (~3.5 MB RSS), which predicting never needs

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
