"""Blobs in S3-compatible storage (AWS S3, SeaweedFS, MinIO, Ceph): ``s3://bucket/prefix``.

Imported by :func:`hybridml.cloud.blobs.open_blobs` only when an ``s3://`` artifact store is
chosen; it is the only module that imports boto3. Every boto/botocore error is converted here,
at the boundary, to our tree: a missing object is a NotFoundError, a missing bucket, refused
credentials or no credentials a ConfigError saying how to fix it, content that does not match
its name a ConflictError, anything else (the endpoint down, a timeout after retries) a
RegistryError naming the bucket and key.

Layout and client
    A blob is the object ``<prefix>/<sha256>`` (``<sha256>`` with no prefix), stored with
    ``Content-Type: application/octet-stream``, ``Cache-Control: public, max-age=31536000,
    immutable`` and the metadata ``sha256``. Credentials come from boto3's own chain
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile, an instance role); the region
    from ``AWS_REGION`` or the profile, else ``us-east-1``. With an endpoint, path-style
    addressing (``http://host:port/bucket/key``), which every S3-compatible server accepts.
    Timeouts: connect 5 s, read 30 s; retries: botocore's "standard" mode, 3 attempts.
    Signatures are SigV4 (also for presigned URLs).

Integrity of an upload
    The sha256 is computed before the upload (a file is hashed in a first pass, streaming: the
    key is the hash) and sent as ``ChecksumSHA256``: the server recomputes it and refuses the
    object when the bytes it received differ (``BadDigest``), so neither a flipped bit in
    transit nor a file changed between the hash and the upload can store wrong content under a
    name. SeaweedFS 4.48 checks it (measured: a wrong ``ChecksumSHA256`` is refused with
    BadDigest, the right one is echoed back and returned by ``HEAD`` with
    ``ChecksumMode=ENABLED``), as AWS does. A server that ignores the header (one that does
    not echo it back) gets a follow-up ``HEAD`` that checks the stored size.
    Files larger than :attr:`S3Blobs.multipart_threshold` go up in parts, one at a time, each
    with its own ``ChecksumSHA256``; the whole file is hashed again while its parts are read,
    and the upload is aborted, not completed, if that hash is not the name.
    Putting existing content is a ``HEAD``: same size (and same ``sha256`` metadata, when
    present) means stored; a different one is a ConflictError. An existing object older than
    :data:`REFRESH_AFTER_S` is copied onto itself so its ``LastModified`` is fresh: ``gc``
    spares blobs younger than its grace period, and a training run that has just re-put an
    old, unreferenced blob must not lose it before registering its version (the local store's
    ``utime``).

Reads
    :meth:`S3Blobs.path` reads through a verified local cache (a
    :class:`~hybridml.cloud.blobs.BlobStore` under ``<root>/cache/blobs``): the object is
    downloaded into a temp file there while its sha256 is computed, and only content that
    hashes to its name is renamed into place (``0400`` in a ``0700`` directory); a mismatch
    deletes the temp file and raises ConflictError, it is never served. One thread or process
    downloads a blob at a time; the others wait and find it. A cached copy is trusted, as a
    local blob is: it was verified when written and is read-only; it is not hashed again on
    every read (delete it and the next read downloads and verifies it again).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Protocol
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from hybridml.shared.errors import ConfigError, ConflictError, NotFoundError, RegistryError
from hybridml.shared.files import CHUNK, file_sha256
from hybridml.shared.manifest import SHA256_RE

log = logging.getLogger("hybridml.cloud.blobs_s3")

DEFAULT_REGION = "us-east-1"
CONTENT_TYPE = "application/octet-stream"
CACHE_CONTROL = "public, max-age=31536000, immutable"  # content-addressed: never changes
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
MULTIPART_THRESHOLD = 256 << 20
PART_SIZE = 16 << 20  # one part is in memory at a time
MIN_PART_SIZE = 5 << 20  # S3's minimum for every part but the last
MAX_PARTS = 10_000
MAX_COPY_SIZE = 5 << 30  # CopyObject's limit: larger objects are not refreshed
REFRESH_AFTER_S = 600.0
CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 30,
                 "retries": {"max_attempts": 3, "mode": "standard"}}
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken"}
_BAD_DIGEST = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}


class LocalCache(Protocol):
    """The verified local copies :class:`S3Blobs` reads through (a ``BlobStore``)."""

    def has(self, sha256: str) -> bool: ...
    def path(self, sha256: str) -> Path: ...
    def fill(self, sha256: str, fetch: Callable[[], Iterable[bytes]], source: str
             ) -> Path: ...
    def gzipped(self, sha256: str, cache: str | os.PathLike[str]) -> Path | None: ...
    def delete(self, shas: list[str]) -> int: ...
    def sweep(self, min_age_seconds: float) -> int: ...


class S3Blobs:
    """Content-addressed blobs under ``s3://bucket/prefix``, read through a local cache.

    A :class:`~hybridml.cloud.blobs.BlobBackend`. Nothing is contacted when it is made; the
    bucket is checked (once) by the first operation, and a missing one is a ConfigError that
    says how to create it (:meth:`create_bucket` does, explicitly: never as a side effect).
    """

    multipart_threshold: int = MULTIPART_THRESHOLD
    part_size: int = PART_SIZE

    def __init__(self, bucket: str, prefix: str, cache: LocalCache, *,
                 endpoint: str | None = None, region: str | None = None,
                 session: Any = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = cache
        self.endpoint = endpoint
        session = session or boto3.session.Session()
        self.region = (region or session.region_name or os.environ.get("AWS_REGION")
                       or DEFAULT_REGION)
        config = Config(signature_version="s3v4",
                        s3={"addressing_style": "path" if endpoint else "auto"},
                        # Checksums only where an operation needs one (and ours, explicit):
                        # servers that predate S3's default CRC trailers refuse them.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", **CLIENT_CONFIG)
        self.client = session.client("s3", endpoint_url=endpoint, region_name=self.region,
                                     config=config)
        self._bucket_checked = False
        self.clock: Callable[[], float] = time.time  # ages of uploads and objects; tests set it

    @classmethod
    def from_url(cls, url: str, cache: LocalCache, *, endpoint: str | None = None) -> S3Blobs:
        """The store at ``s3://bucket/prefix``, through ``endpoint`` (AWS when None)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ConfigError(f"artifact store {url!r}: use s3://bucket/prefix",
                              field="artifacts")
        return cls(parts.netloc, parts.path, cache, endpoint=endpoint)

    def __repr__(self) -> str:
        return f"S3Blobs({self.url!r}, endpoint={self.endpoint!r})"

    @property
    def url(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def describe(self) -> str:
        """One line for logs and ``status``."""
        where = self.endpoint or f"AWS {self.region}"
        return f"{self.url} at {where} (verified cache: {getattr(self.cache, 'dir', '?')})"

    def key(self, sha256: str) -> str:
        """The object key of blob ``sha256``; NotFoundError for a malformed name."""
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            raise NotFoundError(f"invalid blob name {sha256!r}: a blob is named by its sha256, "
                                "64 lowercase hex characters", field="sha256")
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    # ------------------------------------------------------------------------------ writes

    def put(self, data: bytes | bytearray | memoryview | os.PathLike[str]) -> tuple[str, int]:
        """Store bytes, or stream the file at a path; return ``(sha256, size)``."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            raw = bytes(data)
            sha, size = hashlib.sha256(raw).hexdigest(), len(raw)
            return self._upload(sha, size, lambda: io.BytesIO(raw), "bytes")
        if isinstance(data, os.PathLike):
            src = Path(data)
            try:
                size = src.stat().st_size  # a change after this is refused by the server
                sha = file_sha256(src)
            except OSError as exc:
                raise RegistryError(f"cannot read blob source {src}: {exc}",
                                    field="data") from exc
            return self._upload(sha, size, lambda: open(src, "rb"), str(src))
        raise RegistryError(
            f"put_blob takes bytes or a pathlib.Path, got {type(data).__name__}; wrap a file "
            "name in Path(...) (a str is ambiguous between content and a path)", field="data")

    def _upload(self, sha: str, size: int, opener: Callable[[], BinaryIO],
                source: str) -> tuple[str, int]:
        key = self.key(sha)
        head = self._head(key)
        if head is not None:
            return self._existing(sha, size, key, head)
        extra = {"ContentType": CONTENT_TYPE, "CacheControl": CACHE_CONTROL,
                 "Metadata": {"sha256": sha}}
        with opener() as body:
            if size > self.multipart_threshold:
                self._multipart(sha, size, key, body, extra)
            else:
                with self._errors("upload", key):
                    resp = self.client.put_object(
                        Bucket=self.bucket, Key=key, Body=body, ContentLength=size,
                        ChecksumSHA256=_b64(sha), **extra)
                echoed = resp.get("ChecksumSHA256")
                if echoed is None:  # a server that ignores checksums: check what it stored
                    stored = self._head(key)
                    if stored is None or stored["ContentLength"] != size:
                        raise RegistryError(f"the upload of {source} to s3://{self.bucket}/"
                                            f"{key} did not store {size} bytes; put it again",
                                            field="sha256")
                elif echoed != _b64(sha):
                    raise ConflictError(f"S3 stored s3://{self.bucket}/{key} with checksum "
                                        f"{echoed}, not {_b64(sha)}; put the blob again",
                                        field="sha256")
        log.debug("uploaded blob %s (%d bytes) to %s", sha, size, self.url)
        return sha, size

    def _multipart(self, sha: str, size: int, key: str, body: BinaryIO,
                   extra: dict[str, Any]) -> None:
        """Upload ``body`` in parts (each checksummed by the server), hashing it again on
        the way; aborted unless the whole hashes to ``sha``."""
        part_size = max(self.part_size, MIN_PART_SIZE, -(-size // MAX_PARTS))
        with self._errors("upload", key):
            upload_id = self.client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256", **extra)["UploadId"]
        try:
            digest = hashlib.sha256()
            parts: list[dict[str, Any]] = []
            while chunk := body.read(part_size):
                digest.update(chunk)
                number = len(parts) + 1
                part_sum = base64.b64encode(hashlib.sha256(chunk).digest()).decode()
                with self._errors("upload", key):
                    resp = self.client.upload_part(
                        Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                        Body=chunk, ChecksumSHA256=part_sum)
                parts.append({"PartNumber": number, "ETag": resp["ETag"],
                              "ChecksumSHA256": part_sum})
            if digest.hexdigest() != sha:
                raise ConflictError(f"the content of blob {sha} changed while it was uploaded "
                                    f"(it now hashes to {digest.hexdigest()}); put it again",
                                    field="sha256")
            with self._errors("upload", key):
                self.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(ClientError, BotoCoreError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id)
            raise

    def _existing(self, sha: str, size: int, key: str, head: dict[str, Any]) -> tuple[str, int]:
        """Check the object already stored under ``key``; refresh its age for ``gc``."""
        stored_sha = head.get("Metadata", {}).get("sha256")
        if head["ContentLength"] != size or stored_sha not in (None, sha):
            raise ConflictError(
                f"blob {sha} already exists as s3://{self.bucket}/{key} with different content "
                f"({head['ContentLength']} bytes, sha256 metadata {stored_sha}): the store is "
                "damaged; delete that object and put the blob again", field="sha256")
        age = self.clock() - head["LastModified"].timestamp()
        if age > REFRESH_AFTER_S and size <= MAX_COPY_SIZE:
            with self._errors("refresh", key):
                self.client.copy_object(
                    Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": key},
                    MetadataDirective="REPLACE", ContentType=CONTENT_TYPE,
                    CacheControl=CACHE_CONTROL, Metadata={"sha256": sha})
        return sha, size

    def create_bucket(self) -> bool:
        """Create the bucket (for ``hybridml-cloud migrate`` and tests); False if it existed."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != DEFAULT_REGION and self.endpoint is None:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                self._bucket_checked = True
                return False
            raise self._convert(exc, "create bucket", None) from exc
        except BotoCoreError as exc:
            raise self._convert(exc, "create bucket", None) from exc
        self._bucket_checked = True
        log.info("created bucket %s at %s", self.bucket, self.endpoint or "AWS")
        return True

    def delete(self, shas: list[str]) -> int:
        """Delete the given blobs and their cached copies; return how many objects S3
        reports deleted (S3 reports a key that was already gone as deleted too)."""
        keys = [self.key(sha) for sha in shas]
        removed = 0
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start:start + DELETE_BATCH]
            with self._errors("delete", batch[0]):
                resp = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": False})
            if resp.get("Errors"):
                err = resp["Errors"][0]
                raise RegistryError(f"S3 did not delete s3://{self.bucket}/{err.get('Key')}: "
                                    f"{err.get('Code')}: {err.get('Message')}", field="sha256")
            removed += len(resp.get("Deleted", []))
        self.cache.delete(shas)
        return removed

    def sweep(self, min_age_seconds: float) -> int:
        """Remove stale temp files of the local cache and abort multipart uploads under the
        prefix started more than ``min_age_seconds`` ago; return how many."""
        removed = self.cache.sweep(min_age_seconds)
        cutoff = self.clock() - min_age_seconds
        prefix = f"{self.prefix}/" if self.prefix else ""
        with self._errors("list uploads", prefix):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=prefix)
            stale = [(u["Key"], u["UploadId"]) for page in pages
                     for u in page.get("Uploads", []) if u["Initiated"].timestamp() <= cutoff]
        for key, upload_id in stale:
            with self._errors("abort upload", key):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key,
                                                   UploadId=upload_id)
            removed += 1
        if stale:
            log.info("aborted %d incomplete uploads under %s", len(stale), self.url)
        return removed

    # ------------------------------------------------------------------------------- reads

    def has(self, sha256: str) -> bool:
        """True if blob ``sha256`` is in the bucket (False for malformed names)."""
        if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
            return False
        return self._head(self.key(sha256)) is not None

    def size(self, sha256: str) -> int:
        """The size of blob ``sha256``; NotFoundError if it is not in the bucket."""
        key = self.key(sha256)
        head = self._head(key)
        if head is None:
            raise NotFoundError(f"no blob {sha256} in {self.url} (s3://{self.bucket}/{key})",
                                field="sha256")
        return int(head["ContentLength"])

    def path(self, sha256: str) -> Path:
        """The verified local copy of blob ``sha256``, downloaded on first use."""
        key = self.key(sha256)
        if self.cache.has(sha256):
            return self.cache.path(sha256)
        return self.cache.fill(sha256, lambda: self._download(key),
                               f"s3://{self.bucket}/{key}")

    def _download(self, key: str) -> Iterator[bytes]:
        with self._errors("download", key):
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

    def gzipped(self, sha256: str, cache: str | os.PathLike[str]) -> Path | None:
        """The gzip copy of the cached blob (made once; see ``BlobStore.gzipped``)."""
        self.path(sha256)
        return self.cache.gzipped(sha256, cache)

    def entries(self) -> Iterator[tuple[str, float]]:
        """``(sha256, LastModified)`` of every blob under the prefix (others are skipped)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        self._check_bucket()
        with self._errors("list", prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for obj in page.get("Contents", []):
                    name = obj["Key"][len(prefix):]
                    if SHA256_RE.fullmatch(name):
                        yield name, obj["LastModified"].timestamp()

    def presign(self, sha256: str, expiry_s: int) -> str:
        """A SigV4 URL that GETs blob ``sha256`` without credentials for ``expiry_s``
        seconds (signed locally: nothing is contacted, the object is not checked)."""
        key = self.key(sha256)
        with self._errors("presign", key):
            return str(self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key},
                ExpiresIn=int(expiry_s)))

    # --------------------------------------------------------------------------- plumbing

    def _head(self, key: str) -> dict[str, Any] | None:
        """HEAD ``key``: its headers, or None if there is no such object."""
        self._check_bucket()
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                return None
            raise self._convert(exc, "check", key) from exc
        except BotoCoreError as exc:
            raise self._convert(exc, "check", key) from exc

    def _check_bucket(self) -> None:
        """ConfigError, saying how to fix it, unless the bucket exists and we may use it."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND | {"NoSuchBucket"}:
                raise self._missing_bucket() from exc
            raise self._convert(exc, "open", None) from exc
        except BotoCoreError as exc:
            raise self._convert(exc, "open", None) from exc
        self._bucket_checked = True

    def _missing_bucket(self) -> ConfigError:
        where = f"at {self.endpoint}" if self.endpoint else f"in AWS region {self.region}"
        return ConfigError(
            f"the artifact bucket {self.bucket!r} does not exist {where}: create it with "
            f"`hybridml-cloud migrate` or `aws s3 mb s3://{self.bucket}`"
            + (f" --endpoint-url {self.endpoint}" if self.endpoint else "")
            + ", or fix --artifacts", field="artifacts")

    @contextlib.contextmanager
    def _errors(self, action: str, key: str | None) -> Iterator[None]:
        try:
            yield
        except ClientError as exc:
            raise self._convert(exc, action, key) from exc
        except BotoCoreError as exc:
            raise self._convert(exc, action, key) from exc

    def _convert(self, exc: Exception, action: str, key: str | None) -> Exception:
        """Our error for a boto/botocore one (``action`` of ``key`` failed)."""
        target = f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"
        where = self.endpoint or f"AWS ({self.region})"
        if isinstance(exc, NoCredentialsError):
            return ConfigError(f"no S3 credentials to {action} {target}: set AWS_ACCESS_KEY_ID "
                               "and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)", field="artifacts")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
            return RegistryError(f"cannot {action} {target}: S3 at {where} did not answer "
                                 f"({exc}); is it up, and is --s3-endpoint right?",
                                 field="artifacts")
        if not isinstance(exc, ClientError):
            return RegistryError(f"cannot {action} {target} at {where}: {exc}",
                                 field="artifacts")
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if code == "NoSuchBucket":
            self._bucket_checked = False
            return self._missing_bucket()
        if code in _NOT_FOUND:
            return NotFoundError(f"no object {target} ({action}): the blob is not in "
                                 f"{self.url}", field="sha256")
        if code in _DENIED:
            return ConfigError(f"S3 at {where} refused to {action} {target} ({code}): check "
                               "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and that they may read "
                               f"and write the bucket {self.bucket!r}", field="artifacts")
        if code in _BAD_DIGEST:
            return ConflictError(f"S3 refused {target}: the bytes it received do not hash to "
                                 "the blob's name (the source changed during the upload, or "
                                 "was damaged in transit); put it again", field="sha256")
        return RegistryError(f"cannot {action} {target} at {where}: {code}: {message}",
                             field="artifacts")


def _b64(sha: str) -> str:
    return base64.b64encode(bytes.fromhex(sha)).decode()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
