"""The registry's blob store: immutable, content-addressed files in one directory.

Each blob lives at ``<dir>/<sha256>``. A write goes to a temp file in the same directory
(``.tmp-<pid>-<random>``), is fsynced, made read-only, hard-linked to its final name (which
never overwrites an existing blob) and the directory is fsynced; so a reader sees either no
blob or the whole blob, and a crash leaves at most a temp file behind, which :meth:`sweep`
removes later. Putting the same bytes twice is a no-op; a file that carries a blob's name but
not its content is reported as a :class:`ConflictError`, never silently replaced.

Names are checked against ``[0-9a-f]{64}`` with ``fullmatch`` before any path is built, so no
caller-supplied string can point outside the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

from hybridml.shared.errors import ConflictError, NotFoundError, RegistryError
from hybridml.shared.files import CHUNK, file_sha256, fsync_dir
from hybridml.shared.manifest import SHA256_RE

log = logging.getLogger("hybridml.cloud.blobs")

TEMP_PREFIX = ".tmp-"

BlobSource = bytes | bytearray | memoryview | os.PathLike[str]


def check_sha(sha256: object) -> str:
    """Return ``sha256`` if it is 64 lowercase hex characters, else raise NotFoundError.

    NotFound (404), because a malformed name can never exist in the store.
    """
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise NotFoundError(
            f"invalid blob name {sha256!r}: a blob is named by its sha256, 64 lowercase hex "
            "characters", field="sha256")
    return sha256


class BlobStore:
    """Immutable content-addressed files under one directory (the registry's default storage)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.dir)!r})"

    def path(self, sha256: str) -> Path:
        """Return the path of blob ``sha256``; NotFoundError if malformed or absent."""
        p = self.dir / check_sha(sha256)
        if not p.is_file():
            raise NotFoundError(f"no blob {sha256} in {self.dir}", field="sha256")
        return p

    def has(self, sha256: str) -> bool:
        """Return True if blob ``sha256`` exists (False for malformed names: nothing is read)."""
        return (isinstance(sha256, str) and bool(SHA256_RE.fullmatch(sha256))
                and (self.dir / sha256).is_file())

    def put(self, data: BlobSource) -> tuple[str, int]:
        """Store bytes, or stream the file at a path; return ``(sha256, size)``."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            sha = hashlib.sha256(raw).hexdigest()
            if (self.dir / sha).exists():
                return self._existing(sha, len(raw))
            return self._commit(self._write_temp([raw]), sha, len(raw))
        if isinstance(data, os.PathLike):
            return self._put_file(Path(data))
        raise RegistryError(
            f"put_blob takes bytes or a pathlib.Path, got {type(data).__name__}; wrap a file "
            "name in Path(...) (a str is ambiguous between content and a path)", field="data")

    def _put_file(self, src: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0

        def chunks() -> Iterator[bytes]:
            nonlocal size
            try:
                f = open(src, "rb")  # noqa: SIM115 - closed below, inside the generator
            except OSError as exc:
                raise RegistryError(f"cannot read blob source {src}: {exc}",
                                    field="data") from exc
            with f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk

        # One pass: hash while copying, then decide whether the blob was already there.
        tmp = self._write_temp(chunks())
        return self._commit(tmp, digest.hexdigest(), size)

    def _write_temp(self, chunks: Iterator[bytes] | list[bytes]) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            with open(tmp, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o444)  # blobs are immutable; make accidental edits fail loudly
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

    def _commit(self, tmp: Path, sha: str, size: int) -> tuple[str, int]:
        final = self.dir / sha
        try:
            try:
                # link() never replaces an existing file, unlike rename(): a corrupt blob
                # already under this name is detected below instead of being papered over.
                os.link(tmp, final)
            except FileExistsError:
                return self._existing(sha, size)
            except OSError:
                # Filesystems without hard links: rename; the content is identical by
                # construction if a concurrent writer won the race.
                if final.exists():
                    return self._existing(sha, size)
                os.replace(tmp, final)
            fsync_dir(self.dir)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        log.debug("stored blob %s (%d bytes)", sha, size)
        return sha, size

    def _existing(self, sha: str, size: int) -> tuple[str, int]:
        """Verify the blob already stored under ``sha`` and refresh its age for :meth:`sweep`."""
        path = self.dir / sha
        on_disk = file_sha256(path)
        if on_disk != sha:
            raise ConflictError(
                f"blob {sha} already exists with different content (its bytes hash to "
                f"{on_disk}): the store is damaged; move {path} away and put the blob again",
                field="sha256")
        with contextlib.suppress(OSError):
            os.utime(path)  # a re-put blob counts as fresh, so gc's grace period protects it
        return sha, size

    def entries(self) -> Iterator[tuple[str, float]]:
        """Yield ``(sha256, mtime)`` for every blob (temp and foreign files are skipped)."""
        if not self.dir.is_dir():
            return
        with os.scandir(self.dir) as it:
            for entry in it:
                if SHA256_RE.fullmatch(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        yield entry.name, entry.stat().st_mtime

    def delete(self, shas: list[str]) -> int:
        """Delete the given blobs; return how many were removed."""
        removed = 0
        for sha in shas:
            try:
                (self.dir / check_sha(sha)).unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if removed:
            fsync_dir(self.dir)
        return removed

    def sweep(self, min_age_seconds: float) -> int:
        """Remove temp files left by crashed writers that are older than ``min_age_seconds``."""
        if not self.dir.is_dir():
            return 0
        cutoff = time.time() - min_age_seconds
        removed = 0
        with os.scandir(self.dir) as it:
            for entry in it:
                if not entry.name.startswith(TEMP_PREFIX):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed
