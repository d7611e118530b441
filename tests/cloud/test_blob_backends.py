"""One suite for both artifact stores (docs/storage.md §3): a local directory and S3
(SeaweedFS, started by the tests), both built by ``open_blobs`` from a ``Storage``."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import requests

from hybridml.cloud.blobs import BlobBackend, BlobStore, open_blobs
from hybridml.cloud.storage import Storage
from hybridml.shared.errors import ConfigError, ConflictError, NotFoundError
from tests.servers import SeaweedFS

DATA = b"an onnx model, say\n" * 4096  # 77 KB: gzip pays


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    """The artifact store under test."""
    if request.param == "local":
        return Storage()
    server: SeaweedFS = request.getfixturevalue("s3_server")
    return Storage(artifacts=request.getfixturevalue("s3_bucket"), s3_endpoint=server.endpoint)


@pytest.fixture
def blobs(storage: Storage, tmp_path: Path) -> BlobBackend:
    """The backend ``storage`` names, over a registry root in ``tmp_path``."""
    return open_blobs(storage, tmp_path / "reg")


def _raw_key(blobs: BlobBackend, sha: str) -> tuple[object, str, str]:
    """(boto3 client, bucket, key) of a blob in the S3 store: to act behind its back."""
    from hybridml.cloud.blobs_s3 import S3Blobs

    assert isinstance(blobs, S3Blobs)
    return blobs.client, blobs.bucket, blobs.key(sha)


def test_put_returns_sha_and_size_for_bytes_and_files(blobs: BlobBackend,
                                                      tmp_path: Path) -> None:
    sha, size = blobs.put(DATA)
    assert (sha, size) == (hashlib.sha256(DATA).hexdigest(), len(DATA))
    src = tmp_path / "model.onnx"
    src.write_bytes(b"another model")
    assert blobs.put(src) == (hashlib.sha256(b"another model").hexdigest(), 13)
    assert blobs.has(sha) and blobs.size(sha) == len(DATA)
    assert blobs.path(sha).read_bytes() == DATA
    assert oct(blobs.path(sha).stat().st_mode & 0o777) == oct(0o400)


def test_putting_the_same_content_twice_is_a_no_op(blobs: BlobBackend) -> None:
    first = blobs.put(DATA)
    assert blobs.put(bytearray(DATA)) == first
    assert [sha for sha, _ in blobs.entries()] == [first[0]]


def test_absent_and_malformed_names_are_not_found(blobs: BlobBackend) -> None:
    assert not blobs.has("0" * 64) and not blobs.has("../etc/passwd")
    for call in (blobs.size, blobs.path):
        with pytest.raises(NotFoundError):
            call("0" * 64)
        with pytest.raises(NotFoundError, match="64 lowercase hex"):
            call("../../etc/passwd")


def test_entries_delete_and_sweep(blobs: BlobBackend) -> None:
    a, _ = blobs.put(b"a" * 100)
    b, _ = blobs.put(b"b" * 100)
    seen = dict(blobs.entries())
    assert set(seen) == {a, b}
    assert all(abs(mtime - time.time()) < 300 for mtime in seen.values())
    blobs.path(a)  # cached, for the S3 store: dropped with the blob
    assert blobs.delete([a]) == 1
    assert not blobs.has(a) and blobs.has(b)
    with pytest.raises(NotFoundError):
        blobs.path(a)
    assert [sha for sha, _ in blobs.entries()] == [b]
    assert blobs.sweep(3600) == 0


def test_gzipped_copy_is_made_once_from_the_verified_blob(blobs: BlobBackend,
                                                          tmp_path: Path) -> None:
    import gzip

    sha, _ = blobs.put(DATA)
    gz = blobs.gzipped(sha, tmp_path / "gz")
    assert gz is not None and gzip.decompress(gz.read_bytes()) == DATA
    assert blobs.gzipped(sha, tmp_path / "gz") == gz
    noise, _ = blobs.put(os.urandom(4096))
    assert blobs.gzipped(noise, tmp_path / "gz") is None  # does not compress


def test_a_large_file_is_streamed_not_held_in_memory(blobs: BlobBackend,
                                                     tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with src.open("wb") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    tracemalloc.start()
    try:
        sha, size = blobs.put(src)
        put_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        path = blobs.path(sha)
        path_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (sha, size) == (want, 20 << 20)
    assert path.stat().st_size == 20 << 20
    assert put_peak < 8 << 20 and path_peak < 8 << 20, (put_peak, path_peak)


def test_concurrent_reads_make_one_good_copy(blobs: BlobBackend) -> None:
    sha, _ = blobs.put(DATA)
    paths: list[Path] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            paths.append(blobs.path(sha))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    assert paths[0].read_bytes() == DATA
    leftovers = [p.name for p in paths[0].parent.iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers


def test_presign_gives_a_url_that_downloads_the_blob(blobs: BlobBackend,
                                                     storage: Storage) -> None:
    sha, _ = blobs.put(DATA)
    if not storage.on_s3:
        with pytest.raises(ConfigError, match="no direct URLs") as err:
            blobs.presign(sha, 3600)
        assert err.value.code == "config"
        return
    url = blobs.presign(sha, 600)
    resp = requests.get(url, timeout=10)
    assert resp.status_code == 200 and resp.content == DATA
    assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    part = requests.get(url, headers={"Range": "bytes=0-4"}, timeout=10)
    assert part.status_code == 206 and part.content == DATA[:5]
    forged = url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    assert requests.get(forged, timeout=10).status_code == 403


def test_describe_names_where_the_blobs_are(blobs: BlobBackend, storage: Storage) -> None:
    where = blobs.describe()
    assert (storage.artifacts or "blobs") in where


# ----------------------------------------------------------------------------- S3 only

@pytest.fixture
def s3blobs(s3_server: SeaweedFS, s3_bucket: str, tmp_path: Path) -> BlobBackend:
    """The S3 store alone."""
    return open_blobs(Storage(artifacts=s3_bucket, s3_endpoint=s3_server.endpoint),
                      tmp_path / "reg")


def test_s3_object_corrupted_behind_the_stores_back_is_never_served(
        s3blobs: BlobBackend, tmp_path: Path) -> None:
    sha, _ = s3blobs.put(DATA)
    client, bucket, key = _raw_key(s3blobs, sha)
    client.put_object(Bucket=bucket, Key=key, Body=b"evil" + DATA[4:])  # type: ignore[attr-defined]
    with pytest.raises(ConflictError, match=f"{sha} from s3://{bucket}/{key} is damaged") as err:
        s3blobs.path(sha)
    assert err.value.code == "conflict"
    cache = tmp_path / "reg" / "cache" / "blobs"
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(".lock-")) == []
    # Putting the right bytes again is refused too: the object is damaged, not replaced.
    client.put_object(Bucket=bucket, Key=key, Body=b"short")  # type: ignore[attr-defined]
    with pytest.raises(ConflictError, match="delete that object"):
        s3blobs.put(DATA)


def test_s3_cached_copy_is_trusted_and_a_removed_one_is_verified_again(
        s3blobs: BlobBackend) -> None:
    # Decision (blobs_s3 docstring): a cached copy was verified when written and is 0400, as
    # a local blob is; it is not hashed on every read. Removing it makes the next read
    # download and verify again.
    sha, _ = s3blobs.put(DATA)
    cached = s3blobs.path(sha)
    client, bucket, key = _raw_key(s3blobs, sha)
    client.put_object(Bucket=bucket, Key=key, Body=b"x" * len(DATA))  # type: ignore[attr-defined]
    assert s3blobs.path(sha).read_bytes() == DATA  # served from the verified cache
    cached.unlink()
    with pytest.raises(ConflictError):
        s3blobs.path(sha)


def test_s3_upload_sends_sha256_so_the_server_refuses_changed_bytes(
        s3blobs: BlobBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The file changes between the hash (the key) and the upload: the server's check of
    # ChecksumSHA256 refuses it, and nothing is stored under the name.
    src = tmp_path / "model.onnx"
    src.write_bytes(DATA)
    sha = hashlib.sha256(DATA).hexdigest()
    import hybridml.cloud.blobs_s3 as mod

    real = mod.file_sha256

    def hash_then_change(path: Path) -> str:
        out = real(path)
        path.write_bytes(b"X" * len(DATA))
        return out

    monkeypatch.setattr(mod, "file_sha256", hash_then_change)
    with pytest.raises(ConflictError, match="do not hash to the blob's name"):
        s3blobs.put(src)
    assert not s3blobs.has(sha)


def test_s3_multipart_upload_checks_every_part_and_the_whole(
        s3blobs: BlobBackend, tmp_path: Path) -> None:
    s3blobs.multipart_threshold = 8 << 20  # type: ignore[attr-defined]
    s3blobs.part_size = 5 << 20  # type: ignore[attr-defined]
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(12 << 20))
    sha, size = s3blobs.put(src)
    assert sha == hashlib.sha256(src.read_bytes()).hexdigest() and size == 12 << 20
    assert s3blobs.path(sha).read_bytes() == src.read_bytes()
    client, bucket, _ = _raw_key(s3blobs, sha)
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []  # type: ignore[attr-defined]


def test_s3_sweep_aborts_stale_multipart_uploads(s3blobs: BlobBackend) -> None:
    client, bucket, key = _raw_key(s3blobs, "1" * 64)
    client.create_multipart_upload(Bucket=bucket, Key=key)  # type: ignore[attr-defined]
    assert s3blobs.sweep(3600) == 0  # young: a training run may be uploading
    s3blobs.clock = lambda: time.time() + 7200  # type: ignore[attr-defined]
    assert s3blobs.sweep(3600) == 1
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])  # type: ignore[attr-defined]
    assert left == []


def test_s3_re_put_of_an_old_object_refreshes_its_age_for_gc(s3blobs: BlobBackend) -> None:
    sha, _ = s3blobs.put(DATA)
    client, _, _ = _raw_key(s3blobs, sha)
    copies: list[dict[str, object]] = []
    real_copy = client.copy_object  # type: ignore[attr-defined]

    def spy(**kwargs: object) -> object:
        copies.append(kwargs)
        return real_copy(**kwargs)

    client.copy_object = spy  # type: ignore[attr-defined]
    s3blobs.put(DATA)
    assert copies == []  # young: nothing to do
    s3blobs.clock = lambda: time.time() + 3600  # type: ignore[attr-defined]
    s3blobs.put(DATA)
    assert len(copies) == 1 and copies[0]["MetadataDirective"] == "REPLACE"
    assert s3blobs.path(sha).read_bytes() == DATA  # still the same content


def test_s3_missing_bucket_is_a_config_error_that_says_how_to_create_it(
        s3_server: SeaweedFS, s3_bucket: str, tmp_path: Path) -> None:
    store = open_blobs(Storage(artifacts="s3://no-such-bucket-here/blobs",
                               s3_endpoint=s3_server.endpoint), tmp_path)
    with pytest.raises(ConfigError, match="'no-such-bucket-here' does not exist") as err:
        store.put(DATA)
    assert "hybridml-cloud migrate" in err.value.message
    assert store.create_bucket() is True  # type: ignore[attr-defined]
    assert store.create_bucket() is False  # type: ignore[attr-defined]
    assert store.put(DATA)[1] == len(DATA)


def test_s3_bad_credentials_and_a_dead_endpoint_are_our_errors(
        s3_server: SeaweedFS, s3_bucket: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from hybridml.shared.errors import RegistryError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    store = open_blobs(Storage(artifacts=s3_bucket, s3_endpoint=s3_server.endpoint), tmp_path)
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID"):
        store.has("0" * 64)
    dead = open_blobs(Storage(artifacts=s3_bucket, s3_endpoint="http://127.0.0.1:9"),
                      tmp_path)
    with pytest.raises(RegistryError, match="did not answer") as err:
        dead.size("0" * 64)
    assert "127.0.0.1:9" in err.value.message and "no_such" not in err.value.message


def test_local_store_has_no_s3_and_file_urls_name_a_directory(tmp_path: Path) -> None:
    store = open_blobs(Storage(artifacts=f"file://{tmp_path}/elsewhere"), tmp_path / "reg")
    assert isinstance(store, BlobStore) and store.dir == tmp_path / "elsewhere"
    assert oct(store.dir.stat().st_mode & 0o777) == oct(0o700)
    assert isinstance(open_blobs(Storage(), tmp_path / "reg"), BlobStore)


def test_importing_the_registry_does_not_import_boto3() -> None:
    code = ("import sys, hybridml.cloud.registry, hybridml.cloud.blobs; "
            "print('boto3' in sys.modules, 'botocore' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]
