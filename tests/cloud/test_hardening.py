"""The cloud against hostile callers and other users of the machine.

TLS settings of ``serve``; the insecure mode's guard against web pages (cross-site writes,
foreign ``Origin``, DNS rebinding); admin bodies as strict JSON; request paths that try to
forge log lines; one gzip per artifact however many requests ask at once; and registry files
that only their owner can read. Real gunicorn over HTTP where the server is the subject.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import os
import secrets
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from cryptography.hazmat.primitives import serialization

from hybridml.cloud.app import create_app
from hybridml.cloud.auth import AuditLog, loopback_host, loopback_origin
from hybridml.cloud.blobs import BlobStore
from hybridml.cloud.registry import Registry
from hybridml.cloud.serve import url_of
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tls import TLSFiles as ServeTLS
from hybridml.cloud.tls import tls_files
from hybridml.cloud.tokens import TokenStore
from hybridml.shared.errors import ConfigError
from tests.cloud.conftest import IRIS_ROW
from tests.conftest import BIN, CloudServer, start_cloud
from tests.tlskit import TLSFiles, make_tls

PROMOTE = "/v1/models/iris/aliases/stable"
ROLLBACK = "/v1/models/iris/rollback"
JSON = {"Content-Type": "application/json"}


def mode(path: Path) -> int:
    """Permission bits of ``path``."""
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA and a loopback server certificate signed by it."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def served(iris_registry: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[CloudServer]:
    """gunicorn (insecure: loopback, no tokens; INFO logs) over a private iris copy."""
    root = tmp_path_factory.mktemp("hardening") / "reg"
    shutil.copytree(iris_registry, root)
    server = start_cloud(root, "--verbose")
    yield server
    server.stop()


def stable(server: CloudServer) -> int:
    """The version iris's ``stable`` alias points at."""
    models = requests.get(server.url + "/v1/models", timeout=5).json()["models"]
    return int(next(m for m in models if m["name"] == "iris")["aliases"]["stable"])


def error_of(resp: requests.Response) -> dict[str, object]:
    """The JSON error body of a response."""
    assert resp.headers["Content-Type"].startswith("application/json"), resp.text
    body = resp.json()["error"]
    assert isinstance(body, dict)
    return body


# ------------------------------------------------------------------------------------ TLS
def test_tls_needs_both_files_and_names_the_missing_flag(tls: TLSFiles) -> None:
    with pytest.raises(ConfigError, match="--certfile needs --keyfile") as info:
        tls_files(str(tls.cert), None, env={})
    assert info.value.details["field"] == "keyfile"
    with pytest.raises(ConfigError, match="--keyfile needs --certfile") as info:
        tls_files(None, str(tls.key), env={})
    assert info.value.details["field"] == "certfile"
    with pytest.raises(ConfigError, match="HYBRIDML_KEYFILE"):
        tls_files(env={"HYBRIDML_CERTFILE": str(tls.cert)})


def test_tls_files_come_from_the_flags_or_the_environment(tls: TLSFiles,
                                                          tmp_path: Path) -> None:
    assert tls_files(env={}) is None
    env = {"HYBRIDML_CERTFILE": str(tls.cert), "HYBRIDML_KEYFILE": str(tls.key)}
    assert tls_files(env=env) == ServeTLS(str(tls.cert), str(tls.key))
    # a flag wins over its variable
    with pytest.raises(ConfigError, match="--certfile"):
        tls_files(str(tmp_path / "nope.pem"), None, env=env)


def test_unreadable_or_mismatched_tls_files_are_config_errors_naming_the_flag(
        tls: TLSFiles, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match=f"--certfile {missing}: cannot read") as info:
        tls_files(str(missing), str(tls.key), env={})
    assert info.value.details["field"] == "certfile"
    with pytest.raises(ConfigError, match=r"--keyfile .*cannot read") as info:
        tls_files(str(tls.cert), str(tmp_path), env={})  # a directory
    assert info.value.details["field"] == "keyfile"
    stranger = make_tls(tmp_path / "stranger")
    with pytest.raises(ConfigError, match="does not match --certfile") as info:
        tls_files(str(tls.cert), str(stranger.key), env={})
    assert info.value.details["field"] == "keyfile"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="is not a PEM certificate") as info:
        tls_files(str(garbage), str(tls.key), env={})
    assert info.value.details["field"] == "certfile"
    with pytest.raises(ConfigError, match="is not a PEM private key") as info:
        tls_files(str(tls.cert), str(tls.cert), env={})
    assert info.value.details["field"] == "keyfile"
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="is encrypted") as info:  # and prompts nobody
        tls_files(str(tls.cert), str(locked), env={})
    assert info.value.details["field"] == "keyfile"


def test_serve_refuses_bad_tls_settings_before_gunicorn_starts(iris_copy: Path,
                                                               tls: TLSFiles) -> None:
    base = [str(BIN / "hybridml-cloud"), "serve", "--registry", str(iris_copy), "--port", "0",
            "--insecure"]
    half = subprocess.run([*base, "--certfile", str(tls.cert)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert half.returncode == 2 and "--keyfile" in half.stderr
    assert "gunicorn" not in half.stderr  # refused before serving anything
    public = subprocess.run([*base, "--host", "0.0.0.0", "--certfile", str(tls.cert),
                             "--keyfile", str(tls.key)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert public.returncode == 2 and "only binds to loopback" in public.stderr


def test_url_of_names_the_scheme() -> None:
    assert url_of("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert url_of("::1", 8443, "https") == "https://[::1]:8443"


# ----------------------------------------------------- the insecure mode's guard (loopback)
@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST", "localhost.",
                                  "127.0.0.1", "127.0.0.1:1", "127.9.8.7:65535", "[::1]",
                                  "[::1]:8000"])
def test_loopback_host_headers(host: str) -> None:
    assert loopback_host(host)


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.nip.io",
                                  "localhost.evil.example", "[::1].evil.example", "[::1]x",
                                  "127.0.0.1:80@evil.example", "127.0.0.1:x", "0.0.0.0:8000",
                                  "10.0.0.1", "", " localhost", "[::2]:80"])
def test_foreign_host_headers(host: str) -> None:
    assert not loopback_host(host)


@pytest.mark.parametrize("origin", ["http://localhost", "http://localhost:3000",
                                    "https://127.0.0.1", "http://127.3.2.1:9",
                                    "http://[::1]:8080"])
def test_loopback_origins(origin: str) -> None:
    assert loopback_origin(origin)


@pytest.mark.parametrize("origin", ["null", "http://evil.example", "https://evil.example:443",
                                    "http://localhost.evil.example",
                                    "http://localhost@evil.example", "http://127.0.0.1.nip.io",
                                    "file://", "ftp://localhost", "http://localhost:x",
                                    "http://localhost/path", ""])
def test_foreign_origins(origin: str) -> None:
    assert not loopback_origin(origin)


@pytest.mark.parametrize("content_type,body", [
    ("application/x-www-form-urlencoded", b"version=2"),  # an HTML form
    ("text/plain", b'{"version": 2}'),  # fetch(..., {mode: "no-cors"}) with a JSON string
    ("multipart/form-data; boundary=x", b'--x\r\nContent-Disposition: form-data; name="v"'
                                        b'\r\n\r\n2\r\n--x--\r\n'),
    (None, b""),  # a bodiless POST
])
def test_insecure_mode_refuses_writes_that_are_not_json(served: CloudServer,
                                                        content_type: str | None,
                                                        body: bytes) -> None:
    before = stable(served)
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in (PROMOTE, ROLLBACK):
        r = requests.post(served.url + path, data=body, headers=headers, timeout=5)
        err = error_of(r)
        assert r.status_code == 415 and err["code"] == "unsupported_media_type", err
        assert err["details"] == {"field": "Content-Type"}
    assert stable(served) == before


def test_insecure_mode_refuses_a_foreign_host_as_dns_rebinding(served: CloudServer) -> None:
    before = stable(served)
    for host in ("evil.example", f"evil.example:{served.port}", "127.0.0.1.nip.io"):
        for method, path, body in (("GET", "/v1/models", None), ("GET", "/healthz", None),
                                   ("POST", PROMOTE, {"version": 2})):
            r = requests.request(method, served.url + path, json=body, timeout=5,
                                 headers={"Host": host})
            err = error_of(r)
            assert r.status_code == 403 and err["code"] == "forbidden_host", (host, err)
            assert "DNS rebinding" in str(err["message"]) and host in str(err["message"])
    assert stable(served) == before


def test_insecure_mode_answers_loopback_hosts_on_any_port(served: CloudServer) -> None:
    for host in ("localhost", f"localhost:{served.port}", "127.0.0.1", "127.9.8.7:1",
                 "[::1]", f"[::1]:{served.port}"):
        r = requests.get(served.url + "/v1/models", headers={"Host": host}, timeout=5)
        assert r.status_code == 200, (host, r.text)


def test_insecure_mode_refuses_cross_site_origins(served: CloudServer) -> None:
    before = stable(served)
    for origin in ("http://evil.example", "null", "http://localhost.evil.example:8000"):
        for path, body in ((PROMOTE, {"version": 2}), (ROLLBACK, {})):
            r = requests.post(served.url + path, json=body, headers={"Origin": origin},
                              timeout=5)
            err = error_of(r)
            assert r.status_code == 403 and err["code"] == "forbidden_origin", (origin, err)
            assert err["details"] == {"field": "Origin"}
    assert stable(served) == before
    for origin in ("http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080"):
        r = requests.get(served.url + "/v1/models", headers={"Origin": origin}, timeout=5)
        assert r.status_code == 200, (origin, r.text)


def test_insecure_mode_still_takes_json_writes_from_loopback(served: CloudServer) -> None:
    r = requests.post(served.url + PROMOTE, json={"version": 2}, timeout=5,
                      headers={"Origin": f"http://127.0.0.1:{served.port}"})
    assert r.status_code == 200 and stable(served) == 2
    r = requests.post(served.url + ROLLBACK, data=b"", headers=JSON, timeout=5)
    assert r.status_code == 200 and stable(served) == 1


def test_the_guard_is_for_the_insecure_mode_only(iris_copy: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDML_INSECURE", raising=False)
    _, token = TokenStore(iris_copy).create("admin", "ops")
    with create_app(iris_copy).test_client() as c:  # a bearer token is the check here
        r = c.get("/v1/models", headers={"Host": "cloud.example.com",
                                         "Authorization": f"Bearer {token}"})
        assert r.status_code == 200


# --------------------------------------------------------------------------- admin bodies
@pytest.mark.parametrize("body,field,needle", [
    (b"[" * 100_000 + b"]" * 100_000, "body", "too deeply"),
    (b'{"version": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body", "too deeply"),
    (b'{"version": 2', "body", "not valid JSON"),
    (b'\xff{"version": 2}', "body", "UTF-8"),
    (b"[2]", "body", "JSON object"),
    (b'{"version": NaN}', "version", "version number"),
    (b'{"version": 2, "version": 1e400}', "version", "version number"),
], ids=["array 100000 deep", "value 100000 deep", "cut short", "not UTF-8", "a list",
        "NaN", "duplicate key, last wins"])
def test_admin_bodies_are_strict_json_and_a_400_names_the_field(
        served: CloudServer, body: bytes, field: str, needle: str) -> None:
    before = stable(served)
    for path in (PROMOTE, ROLLBACK):
        r = requests.post(served.url + path, data=body, headers=JSON, timeout=10)
        err = error_of(r)
        assert r.status_code == 400 and err["code"] == "bad_input", err
        assert err["details"] == {"field": field} and needle in str(err["message"]), err
    assert stable(served) == before


# ------------------------------------------------------------------------------ log lines
def test_control_characters_in_a_path_stay_escaped_on_its_one_log_line(
        served: CloudServer) -> None:
    marker = f"forged-{secrets.token_hex(4)}"
    # CR LF and a fake request line, an ANSI escape, a UTF-8 NEL (U+0085, a line break to
    # some readers): all percent-encoded, which the server decodes into the path.
    path = (f"/v1/models/x%0d%0aINFO%20hybridml.cloud.app:%20GET%20/{marker}%20200%201.0ms"
            "%1b[2K%c2%85%0b%0c/manifest")
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        conn.request("GET", path)
        assert conn.getresponse().status == 404
    finally:
        conn.close()
    deadline = time.monotonic() + 10
    while marker not in served.log_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # the line is written once the response is on its way
    lines = [line for line in served.log_text().splitlines() if marker in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(r"INFO hybridml.cloud.app: GET /v1/models/x\r\nINFO "), lines
    assert r"\x1b[2K" in lines[0] and r"\x85" in lines[0] and r"\x0b\x0c" in lines[0]
    assert "/manifest 404 " in lines[0]  # the line's own end: status and time


def test_an_unhandled_error_logs_its_path_escaped(iris_copy: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    app = create_app(iris_copy)

    def broken(rest: str) -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/broken/<rest>", "broken", broken)
    with caplog.at_level(logging.ERROR, logger="hybridml.cloud.app"), app.test_client() as c:
        r = c.get("/broken/a%0d%0aERROR%20forged%1b")
    assert r.status_code == 500 and r.get_json()["error"]["code"] == "internal"
    messages = [rec.getMessage() for rec in caplog.records
                if rec.getMessage().startswith("unhandled error")]
    assert messages == [r"unhandled error on GET /broken/a\r\nERROR forged\x1b"]


# ------------------------------------------------------------------------ gzip, made once
def compressible(n_bytes: int, seed: int = 0) -> bytes:
    """Base64 of random bytes: gzip takes it to about 76 % (worth serving compressed)."""
    return base64.b64encode(np.random.default_rng(seed).bytes(n_bytes * 3 // 4))


def test_concurrent_first_requests_compress_a_large_artifact_once(served: CloudServer) -> None:
    data = compressible(8 * 2**20, seed=1)
    reg = Registry(served.registry)
    sha, _ = reg.put_blob(data)
    reg.close()
    n = 12
    start = threading.Barrier(n)

    def fetch(_: int) -> requests.Response:
        with requests.Session() as s:
            start.wait(timeout=10)
            return s.get(f"{served.url}/v1/artifacts/{sha}", timeout=60,
                         headers={"Accept-Encoding": "gzip"})

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(fetch, range(n)))
    for r in answers:
        assert r.status_code == 200 and r.headers["Content-Encoding"] == "gzip"
        assert r.content == data  # decoded by requests
    # Both workers' log lines are written before their answers: all are in the log now.
    made = [line for line in served.log_text().splitlines()
            if f"compressed blob {sha}" in line]
    assert len(made) == 1, made
    gz = served.registry / "cache" / "gzip" / f"{sha}.gz"
    assert gzip.decompress(gz.read_bytes()) == data
    assert mode(gz) == 0o600 and mode(gz.parent) == 0o700 and mode(gz.parent.parent) == 0o700
    plain = requests.get(f"{served.url}/v1/artifacts/{sha}", timeout=60,
                         headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in plain.headers and plain.content == data


def test_threads_asking_at_once_share_one_compression(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = BlobStore(tmp_path / "blobs")
    data = compressible(2 * 2**20, seed=2)
    sha, _ = store.put(data)
    cache = tmp_path / "cache" / "gzip"
    start = threading.Barrier(8)

    def ask(_: int) -> Path | None:
        start.wait(timeout=10)
        return store.gzipped(sha, cache)

    with caplog.at_level(logging.INFO, logger="hybridml.cloud.blobs"), \
            ThreadPoolExecutor(8) as pool:
        got = set(pool.map(ask, range(8)))
    assert got == {cache / f"{sha}.gz"}
    assert sum("compressed blob" in rec.getMessage() for rec in caplog.records) == 1
    assert gzip.decompress((cache / f"{sha}.gz").read_bytes()) == data
    assert sorted(p.name for p in cache.iterdir()) == [f"{sha}.gz", f"{sha}.lock"]


def test_an_incompressible_blob_is_tried_once_and_then_served_as_is(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = BlobStore(tmp_path / "blobs")
    sha, _ = store.put(os.urandom(200_000))
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="hybridml.cloud.blobs"):
        assert store.gzipped(sha, cache) is None
        assert store.gzipped(sha, cache) is None
    assert sum("does not compress" in rec.getMessage() for rec in caplog.records) == 1
    assert (cache / f"{sha}.raw").exists() and not (cache / f"{sha}.gz").exists()
    assert not list(cache.glob("*.tmp"))


# ------------------------------------------------------------------------ owner-only files
@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that takes nothing away: modes come from the code alone."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_a_new_registry_is_private_to_its_owner_whatever_the_umask(
        tmp_path: Path, open_umask: None) -> None:
    root = tmp_path / "reg"
    reg = Registry(root)
    sha, _ = reg.put_blob(compressible(64 * 1024))
    assert reg.blobs.gzipped(sha, root / "cache" / "gzip") is not None
    TokenStore(root).create("device", "edge-1")
    AuditLog(root).append({"action": "test"})
    key = KeyRing(root).init()
    for d in (root, root / "blobs", root / "cache", root / "cache" / "gzip", root / "keys"):
        assert mode(d) == 0o700, d
    for f in (root / "registry.db", root / "tokens.db",  # the audit trail is in registry.db
              root / "cache" / "gzip" / f"{sha}.gz", root / "keys" / f"{key.key_id}.key"):
        assert mode(f) == 0o600, f
    sidecars = sorted(root.glob("registry.db-*"))  # SQLite's, while a connection is open
    assert [f.name for f in sidecars] == ["registry.db-shm", "registry.db-wal"]
    assert all(mode(f) == 0o600 for f in sidecars), sidecars
    assert mode(root / "blobs" / sha) == 0o400  # owner-only, and read-only: immutable
    reg.close()


def test_opening_a_registry_from_the_previous_release_makes_it_private_and_it_still_serves(
        iris_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    TokenStore(iris_copy).create("device", "edge-1")
    AuditLog(iris_copy).append({"action": "test"})
    key = KeyRing(iris_copy).init()
    blobs = {p.name for p in (iris_copy / "blobs").iterdir()}
    # The previous release: the umask's modes (0755 directories, 0644 files, 0444 blobs).
    for p in [iris_copy, *iris_copy.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o444 if p.name in blobs else 0o644)
    reg = Registry(iris_copy)
    for p in [iris_copy, *iris_copy.rglob("*")]:
        assert not mode(p) & 0o077, p
    assert mode(iris_copy) == 0o700 and mode(iris_copy / "blobs") == 0o700
    assert mode(iris_copy / "tokens.db") == 0o600 and mode(iris_copy / "registry.db") == 0o600
    assert mode(iris_copy / "keys") == 0o700
    assert mode(iris_copy / "keys" / f"{key.key_id}.key") == 0o600
    assert all(mode(iris_copy / "blobs" / b) == 0o400 for b in blobs)
    # and it still works: read, write, serve
    assert reg.set_alias("iris", "stable", 2) == 2
    reg.close()
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    with create_app(iris_copy).test_client() as c:
        r = c.post("/v1/models/iris/predict", json={"inputs": [IRIS_ROW]})
        assert r.status_code == 200 and r.get_json()["model_version"] == 2
        sha = c.get("/v1/models/iris/manifest").get_json()["artifacts"][0]["sha256"]
        assert c.get(f"/v1/artifacts/{sha}").status_code == 200
