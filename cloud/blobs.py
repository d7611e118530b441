"""The registry's artifact store: immutable, content-addressed blobs (docs/storage.md §3).

:class:`BlobBackend` is the interface the registry and the API use; :func:`open_blobs` picks the
backend from :class:`~hybridml.cloud.storage.Storage`: :class:`BlobStore`, a local directory
(the default, ``<root>/blobs``, or ``file:///dir``), or ``S3Blobs`` on S3-compatible storage
(:mod:`hybridml.cloud.blobs_s3`, imported, with boto3, only when an ``s3://`` URL is chosen).
The S3 backend reads through a :class:`BlobStore` under ``<root>/cache/blobs``: a download is
stored with :meth:`BlobStore.fill`, which checks its sha256 before the file gets its name, and
gzip copies of both backends are made by the same :meth:`BlobStore.gzipped`.

Each local blob lives at ``<dir>/<sha256>``. A write goes to a temp file in the same directory
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
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from hybridml.shared.errors import ConfigError, ConflictError, NotFoundError, RegistryError
from hybridml.shared.files import CHUNK, file_sha256, fsync_dir
from hybridml.shared.manifest import SHA256_RE

from .private import FILE_MODE, private_dir, private_file
from .storage import Storage

log = logging.getLogger("hybridml.cloud.blobs")

TEMP_PREFIX = ".tmp-"
LOCK_PREFIX = ".lock-"  # BlobStore.fill: one download per blob at a time
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


class BlobBackend(Protocol):
    """Where artifacts live: immutable blobs named by their sha256 (docs/storage.md §3).

    Every method takes the 64-hex-character name; a malformed one is a NotFoundError (it can
    never exist) and ``has`` answers False for it.
    """

    def put(self, data: BlobSource) -> tuple[str, int]:
        """Store bytes, or stream the file at a path; return ``(sha256, size)``. Putting
        content that exists is a no-op; a stored blob whose content differs is a
        ConflictError."""
        ...

    def has(self, sha256: str) -> bool:
        """True if blob ``sha256`` is stored."""
        ...

    def size(self, sha256: str) -> int:
        """The size of blob ``sha256`` in bytes; NotFoundError if absent."""
        ...

    def path(self, sha256: str) -> Path:
        """A local file holding blob ``sha256``, its content verified; NotFoundError if
        absent."""
        ...

    def entries(self) -> Iterator[tuple[str, float]]:
        """``(sha256, mtime)`` of every stored blob (what gc chooses from)."""
        ...

    def delete(self, shas: list[str]) -> int:
        """Delete the given blobs; return how many were removed."""
        ...

    def sweep(self, min_age_seconds: float) -> int:
        """Remove what crashed writers left behind, older than ``min_age_seconds``."""
        ...

    def gzipped(self, sha256: str, cache: str | os.PathLike[str]) -> Path | None:
        """The gzip copy of blob ``sha256`` in ``cache`` (made once), or None when gzip
        does not pay."""
        ...

    def presign(self, sha256: str, expiry_s: int) -> str:
        """A URL that downloads blob ``sha256`` without credentials for ``expiry_s`` seconds;
        ConfigError on a backend that has none."""
        ...

    def describe(self) -> str:
        """One line for logs and ``status``: where the blobs are."""
        ...


def open_blobs(storage: Storage, root: str | os.PathLike[str]) -> BlobBackend:
    """The artifact store ``storage`` names, with ``root`` (the registry root) for caches.

    ``artifacts`` unset: ``<root>/blobs``; ``file:///dir``: that directory; ``s3://bucket/prefix``:
    :class:`~hybridml.cloud.blobs_s3.S3Blobs` at ``storage.s3_endpoint`` (AWS when unset),
    reading through a verified cache in ``<root>/cache/blobs``. A local directory is created
    (``0700``) or made private here; S3 is not contacted.
    """
    url = storage.artifacts
    if url is None:
        return BlobStore(private_dir(Path(root) / "blobs"))
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"artifact store {url!r}: a file URL names a local directory, "
                              "file:///srv/blobs (no host)", field="artifacts")
        return BlobStore(private_dir(Path(unquote(parts.path))))
    if parts.scheme == "s3":
        from .blobs_s3 import S3Blobs  # boto3 is imported only when S3 is chosen

        return S3Blobs.from_url(url, BlobStore(Path(root) / "cache" / "blobs"),
                                endpoint=storage.s3_endpoint)
    raise ConfigError(f"artifact store {url!r}: use s3://bucket/prefix or file:///dir",
                      field="artifacts")


class BlobStore:
    """Immutable content-addressed files under one directory: the default :class:`BlobBackend`,
    and the verified local cache the S3 backend reads through."""

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

    def size(self, sha256: str) -> int:
        """The size of blob ``sha256`` in bytes; NotFoundError if malformed or absent."""
        return self.path(sha256).stat().st_size

    def presign(self, sha256: str, expiry_s: int) -> str:
        """Always a ConfigError: a local directory has no URL a device could fetch."""
        raise ConfigError(
            f"the artifact store {self.dir} is a local directory, which has no direct URLs: "
            "use --artifact-urls public:<base URL> (a web server over that directory), or "
            "--artifacts s3://bucket/prefix with --artifact-urls presign", field="artifact_urls")

    def describe(self) -> str:
        """One line for logs and ``status``."""
        return f"local directory {self.dir}"

    def fill(self, sha256: str, fetch: Callable[[], Iterable[bytes]], source: str) -> Path:
        """The path of blob ``sha256``, stored first from the chunks ``fetch()`` yields (a
        download) if absent; ``source`` names where they come from, for errors.

        The chunks are hashed as they are written to a temp file; only content that hashes to
        ``sha256`` is given the blob's name (a ConflictError otherwise: the temp file is
        deleted, nothing is served). One caller fetches at a time per blob, across threads and
        processes (an ``flock`` on ``.lock-<sha256>``); the others then find the blob stored.
        The lock only saves work: concurrent fetches would still each be verified, and the
        name is taken by a hard link, never by overwriting.
        """
        sha = check_sha(sha256)
        final = self.dir / sha
        if final.is_file():
            return final
        private_dir(self.dir)
        with _locked(self.dir / f"{LOCK_PREFIX}{sha}"):
            if final.is_file():  # fetched by another thread or process while we waited
                return final
            digest = hashlib.sha256()
            size = 0

            def hashed() -> Iterator[bytes]:
                nonlocal size
                for chunk in fetch():
                    digest.update(chunk)
                    size += len(chunk)
                    yield chunk

            tmp = self._write_temp(hashed())
            if digest.hexdigest() != sha:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise ConflictError(
                    f"blob {sha} from {source} is damaged: its {size} bytes hash to "
                    f"{digest.hexdigest()}; it was not stored or served. If this happens again, "
                    "the stored object is corrupt: delete it and put the blob again",
                    field="sha256")
            self._commit(tmp, sha, size)
        return final

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
        with _locked(folder / f"{sha256}.lock"):
            if gz.exists():  # another thread or process made it while we waited
                return gz
            if raw.exists():
                return None
            return _compress(src, gz, raw)

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
        """Remove temp files left by crashed writers (and fetch locks) older than
        ``min_age_seconds``; return how many."""
        if not self.dir.is_dir():
            return 0
        cutoff = time.time() - min_age_seconds
        removed = 0
        with os.scandir(self.dir) as it:
            for entry in it:
                if not entry.name.startswith((TEMP_PREFIX, LOCK_PREFIX)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if entry.stat().st_mtime <= cutoff:
                        os.unlink(entry.path)
                        removed += 1
        return removed


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created ``0600`` if missing)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes
        yield
    finally:
        os.close(fd)


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
