"""The registry's blob store: immutable, content-addressed files in one directory.

Each blob lives at ``<dir>/<sha256>``. A write goes to a temp file in the same directory
(``.tmp-<pid>-<random>``), is fsynced, made read-only, hard-linked to its final name (which
never overwrites an existing blob) and the directory is fsynced; so a reader sees either no
blob or the whole blob, and a crash leaves at most a temp file behind, which :meth:`sweep`
removes later. Putting the same bytes twice is a no-op; a file that carries a blob's name but
not its content is reported as a :class:`ConflictError`, never silently replaced.

Names are checked against ``[0-9a-f]{64}`` with ``fullmatch`` before any path is built, so no
caller-supplied string can point outside the directory.

Blobs are ``0400`` (owner-only, read-only) in a ``0700`` directory (:mod:`hybridml.cloud.private`).

:meth:`BlobStore.gzipped` keeps a gzip copy of a blob in a cache directory for the API to
serve with ``Content-Encoding: gzip``. It is made once, whatever the number of threads and
processes asking at the same time: the first compresses, streaming, under an exclusive
``flock`` on ``<cache>/<sha256>.lock``; the others wait for that lock and find the result.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
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

from .private import FILE_MODE, private_dir, private_file

log = logging.getLogger("hybridml.cloud.blobs")

TEMP_PREFIX = ".tmp-"
BLOB_MODE = 0o400  # owner-only, and read-only: blobs are immutable
GZIP_LEVEL = 6
GZIP_MAX_RATIO = 0.9  # a gzip copy must save 10% to be worth serving

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
        private_dir(self.dir)
        tmp = self.dir / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        try:
            # Created owner-only: never readable by others, not even before the chmod.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, BLOB_MODE)  # blobs are immutable; make accidental edits fail loudly
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

    def gzipped(self, sha256: str, cache: str | os.PathLike[str]) -> Path | None:
        """The gzip copy of blob ``sha256`` in ``cache``, made on first use; None when gzip
        would not make the blob at least 10% smaller (remembered by a ``.raw`` marker).

        Made once across threads and processes (see the module docstring); the blob is read
        in chunks, never whole. NotFoundError if the blob does not exist.
        """
        src = self.path(sha256)
        folder = Path(cache)
        gz, raw = folder / f"{sha256}.gz", folder / f"{sha256}.raw"
        if gz.exists():
            return gz
        if raw.exists():
            return None
        private_dir(folder)
        lock = os.open(folder / f"{sha256}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                       FILE_MODE)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the descriptor closes
            if gz.exists():  # another thread or process made it while we waited
                return gz
            if raw.exists():
                return None
            return _compress(src, gz, raw)
        finally:
            os.close(lock)

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


def _compress(src: Path, gz: Path, raw: Path) -> Path | None:
    """Stream ``src`` through gzip into ``gz`` (via a temp file); ``raw`` marks "not worth it".

    Called with the blob's lock held, so the temp file's fixed name is this caller's alone;
    one a crash left behind is overwritten.
    """
    tmp = gz.with_name(gz.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as out:
            with open(src, "rb") as f, gzip.GzipFile(filename="", mode="wb", fileobj=out,
                                                     compresslevel=GZIP_LEVEL, mtime=0) as z:
                while chunk := f.read(CHUNK):
                    z.write(chunk)
            out.flush()
            os.fsync(out.fileno())
            packed = out.tell()
        size = src.stat().st_size
        if packed > GZIP_MAX_RATIO * size:
            private_file(raw)
            tmp.unlink()
            log.info("blob %s does not compress (%d -> %d bytes): served as is", src.name,
                     size, packed)
            return None
        os.replace(tmp, gz)
        fsync_dir(gz.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    log.info("compressed blob %s for gzip responses: %d -> %d bytes", src.name, size, packed)
    return gz
