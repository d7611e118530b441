"""Security end to end: tokens on a real gunicorn, signed manifests, tampering and key rotation."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from hybridml.cloud.signing import KeyInfo, KeyRing, Signer
from hybridml.cloud.tokens import TokenStore
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.edge.trust import TrustStore
from hybridml.shared.errors import AuthError, SignatureError
from tests.conftest import BIN, CloudServer, start_cloud

IRIS_ROW = {"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4,
            "petal_width_cm": 0.2}


@dataclass
class SecureCloud:
    """A token-checking, manifest-signing server over a private registry."""

    server: CloudServer
    registry: Path
    key: KeyInfo
    device: str
    admin: str

    @property
    def url(self) -> str:
        """Base URL."""
        return self.server.url

    def client(self, token: str | None = None) -> CloudClient:
        """An edge client with the device token (or ``token``)."""
        return CloudClient(self.url, token=token or self.device)


def secure_cloud(trained_registry: Path, root: Path) -> SecureCloud:
    """Copy the trained registry, add a key and two tokens, serve it without --insecure."""
    reg = root / "reg"
    shutil.copytree(trained_registry, reg)
    ring = KeyRing(reg)  # the trained registry already signs with a key
    active = ring.active_id()
    key = ring.info(active) if active else ring.init()
    tokens = TokenStore(reg)
    device, admin = tokens.create("device", "edge-1")[1], tokens.create("admin", "ops")[1]
    return SecureCloud(start_cloud(reg, insecure=False), reg, key, device, admin)


@pytest.fixture(scope="module")
def shared_secure(trained_registry: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureCloud]:
    """One secure server for the read-only tests of this module."""
    cloud = secure_cloud(trained_registry, tmp_path_factory.mktemp("secure"))
    yield cloud
    cloud.server.stop()


@pytest.fixture
def own_secure(trained_registry: Path, tmp_path: Path) -> Iterator[SecureCloud]:
    """A private secure server for tests that promote, revoke or rotate keys."""
    cloud = secure_cloud(trained_registry, tmp_path)
    yield cloud
    cloud.server.stop()


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYBRIDML_TOKEN", raising=False)


def provisioned_store(path: Path, *pub_files: Path) -> LocalStore:
    """An edge store trusting ``pub_files``."""
    store = LocalStore(path).ensure()
    for f in pub_files:
        TrustStore(store.root).add(f)
    return store


class FakeCloud:
    """A loopback server answering every manifest request with ``body``; logs each path."""

    def __init__(self, body: bytes) -> None:
        self.body, self.paths = body, []  # type: ignore[var-annotated]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.paths.append(self.path)
                found = "/manifest" in self.path
                data = fake.body if found else b'{"error": {"code": "not_found", "message": "-"}}'
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


def run_edge(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``hybridml-edge`` and return the finished process."""
    return subprocess.run([str(BIN / "hybridml-edge"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


# ---------------------------------------------------------------------------------- tokens
def test_serve_refuses_to_start_without_tokens_or_off_loopback_when_insecure(
        trained_registry: Path) -> None:
    base = [str(BIN / "hybridml-cloud"), "serve", "--registry", str(trained_registry),
            "--port", "0"]  # refused before binding; 0 could bind anyway
    plain = subprocess.run(base, capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == 2 and "no API tokens" in plain.stderr
    public = subprocess.run([*base, "--insecure", "--host", "0.0.0.0"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert public.returncode == 2 and "only binds to loopback" in public.stderr


def test_tokens_gate_the_api_by_role(shared_secure: SecureCloud) -> None:
    url = shared_secure.url
    assert requests.get(url + "/healthz", timeout=5).status_code == 200
    anon = requests.get(url + "/v1/models/iris/manifest", timeout=5)
    assert anon.status_code == 401 and anon.json()["error"]["code"] == "unauthorized"
    assert anon.headers["WWW-Authenticate"].startswith("Bearer")
    dev = {"Authorization": f"Bearer {shared_secure.device}"}
    man = requests.get(url + "/v1/models/iris/manifest", headers=dev, timeout=5)
    assert man.status_code == 200 and man.json()["signature"]["key_id"] == \
        shared_secure.key.key_id
    pred = requests.post(url + "/v1/models/iris/predict", json={"inputs": [IRIS_ROW]},
                         headers=dev, timeout=10)
    assert pred.status_code == 200 and pred.json()["predictions"] == ["setosa"]
    promote = requests.post(url + "/v1/models/iris/aliases/canary", json={"version": 1},
                            headers=dev, timeout=5)
    assert promote.status_code == 403 and promote.json()["error"]["code"] == "forbidden"
    rollback = requests.post(url + "/v1/models/iris/rollback", headers=dev, timeout=5)
    assert rollback.status_code == 403
    assert "needs an admin token" in rollback.json()["error"]["message"]


def test_edge_without_a_valid_token_gets_unauthorized_and_keeps_nothing(
        shared_secure: SecureCloud, tmp_path: Path) -> None:
    store = provisioned_store(tmp_path / "s", shared_secure.key.public_path)
    for token in (None, "hml_000000000000_" + "x" * 43):
        client = CloudClient(shared_secure.url, token=token)
        with pytest.raises(AuthError, match=r"Bearer|unknown or revoked") as info:
            sync(store, client, "iris")
        assert info.value.code == "unauthorized"
    assert store.active("iris") is None
    assert "unauthorized" in store.sync_state("iris")["last_error"]


def test_admin_promotes_and_rolls_back_and_revocation_is_immediate(
        own_secure: SecureCloud) -> None:
    url = own_secure.url
    adm = {"Authorization": f"Bearer {own_secure.admin}"}
    r = requests.post(url + "/v1/models/eta/aliases/canary", json={"version": 1},
                      headers=adm, timeout=5)
    assert r.status_code == 200 and r.json()["version"] == 1
    r = requests.post(url + "/v1/models/eta/rollback", json={"alias": "canary"}, headers=adm,
                      timeout=5)
    assert r.status_code == 404 and "no earlier 'canary'" in r.json()["error"]["message"]
    TokenStore(own_secure.registry).revoke("ops")
    # Both gunicorn workers read the token table per request: no restart, no grace period.
    for _ in range(4):
        r = requests.post(url + "/v1/models/eta/aliases/canary", json={"version": 1},
                          headers=adm, timeout=5)
        assert r.status_code == 401


# ------------------------------------------------------------------------ signed manifests
def test_edge_cli_syncs_with_token_and_trust_and_status_says_verified(
        shared_secure: SecureCloud, tmp_path: Path) -> None:
    store = str(tmp_path / "edge")
    token_file = tmp_path / "token"
    token_file.write_text(shared_secure.device + "\n")
    token_file.chmod(0o600)  # --token-file refuses a file others may read
    r = run_edge("sync", "--cloud", shared_secure.url, "--name", "iris", "--store", store,
                 "--token-file", str(token_file), "--trust",
                 str(shared_secure.key.public_path))
    assert r.returncode == 0, r.stderr
    assert "activated v1" in r.stdout
    st = run_edge("status", "--store", store, "--json")
    model = json.loads(st.stdout)["models"][0]
    assert model["signature"]["state"] == "verified"
    assert model["signature"]["key_id"] == shared_secure.key.key_id
    text = run_edge("status", "--store", store).stdout
    assert f"signature: verified (key {shared_secure.key.key_id})" in text
    listed = run_edge("trust", "list", "--store", store, "--json")
    assert json.loads(listed.stdout) == {"trusted": [shared_secure.key.key_id]}


def forge(cloud: SecureCloud, tamper: str, evil_registry: Path) -> dict[str, Any]:
    """The genuine iris manifest with exactly one alteration."""
    genuine = cloud.client().manifest("iris").body
    other = cloud.client().manifest("eta").body
    assert genuine is not None and other is not None
    forged: dict[str, Any] = json.loads(genuine)
    if tamper == "swap_artifact":
        # A different, real model's hash and size: the file itself would pass the sha check.
        swap = json.loads(other)["artifacts"][0]
        forged["artifacts"][0].update(sha256=swap["sha256"], size=swap["size"])
    elif tamper == "strip_signature":
        forged.pop("signature")
    else:  # signed properly, but by a key the device never trusted
        KeyRing(evil_registry).init()
        forged = Signer(evil_registry).sign(forged)
    return forged


@pytest.mark.parametrize("tamper", ["swap_artifact", "strip_signature", "foreign_key"])
def test_tampered_manifest_is_refused_before_any_download(
        shared_secure: SecureCloud, tmp_path: Path, tamper: str) -> None:
    store = provisioned_store(tmp_path / "s", shared_secure.key.public_path)
    sync(store, shared_secure.client(), "iris")
    fake = FakeCloud(json.dumps(forge(shared_secure, tamper, tmp_path / "evil")).encode())
    try:
        with pytest.raises(SignatureError) as info:
            sync(store, CloudClient(fake.url), "iris")
    finally:
        fake.close()
    assert info.value.code == "signature"
    assert {"swap_artifact": "altered after signing", "strip_signature": "not signed",
            "foreign_key": "does not trust"}[tamper] in info.value.message
    assert fake.paths and all("/manifest" in p for p in fake.paths)  # no artifact requested
    active = store.active("iris")
    assert active is not None and active.raw["signature"] == \
        json.loads(shared_secure.client().manifest("iris").body or b"{}")["signature"]
    assert not list(store.artifacts.glob("*.part"))


def test_unsigned_cloud_is_refused_unless_the_device_allows_unsigned(
        registry_copy: Path, shared_secure: SecureCloud, tmp_path: Path) -> None:
    shutil.rmtree(registry_copy / "keys")  # a cloud without a signing key: unsigned manifests
    cloud = start_cloud(registry_copy)
    try:
        strict = provisioned_store(tmp_path / "strict", shared_secure.key.public_path)
        with pytest.raises(SignatureError, match="not signed"):
            sync(strict, CloudClient(cloud.url), "iris")
        assert strict.active("iris") is None
        # A device that trusts no key refuses too (fail-closed), and says what to do...
        open_store = str(tmp_path / "open")
        r = run_edge("sync", "--cloud", cloud.url, "--name", "iris", "--store", open_store)
        assert r.returncode == 2 and "trusts no signing key" in r.stderr
        assert "trust add" in r.stderr and "--allow-unsigned" in r.stderr
        assert LocalStore(open_store).active("iris") is None
        # ...unless told to accept unsigned manifests, as on a lab network.
        r = run_edge("sync", "--cloud", cloud.url, "--name", "iris", "--store", open_store,
                     "--allow-unsigned")
        assert r.returncode == 0 and "without a signature check" in r.stderr
        st = run_edge("status", "--store", open_store)
        assert "signature: unsigned (this device trusts no key)" in st.stdout
        # Trusting a key later turns the checks on for good, flag or not.
        run_edge("trust", "add", str(shared_secure.key.public_path), "--store", open_store)
        r = run_edge("sync", "--cloud", cloud.url, "--name", "iris", "--store", open_store,
                     "--allow-unsigned")
        assert r.returncode == 2 and "not signed" in r.stderr
    finally:
        cloud.stop()


def test_key_rotation_with_two_trusted_keys(own_secure: SecureCloud, tmp_path: Path) -> None:
    ring = KeyRing(own_secure.registry)
    old = own_secure.key
    store = provisioned_store(tmp_path / "edge", old.public_path)
    client = own_secure.client()
    assert sync(store, client, "iris").version == 1

    # 1. The cloud makes a new key; it does not sign yet, so devices keep working.
    new = ring.init()
    assert not new.active
    # 2. Devices trust old + new (the CLI clears the stored ETag so the next sync re-checks).
    r = run_edge("trust", "add", str(new.public_path), "--store", str(store.root))
    assert r.returncode == 0 and new.key_id in r.stdout
    assert sync(store, client, "iris").changed is False
    # 3. The cloud switches keys while running; devices accept the re-signed manifest.
    ring.use(new.key_id)
    sync(store, client, "iris")
    active = store.active("iris")
    assert active is not None and active.raw["signature"]["key_id"] == new.key_id
    assert store.previous("iris") is None  # same version re-signed: rollback target untouched
    ring.use(old.key_id)
    sync(store, client, "iris")  # old still trusted: accepted
    ring.use(new.key_id)
    sync(store, client, "iris")
    # 4. Devices drop the old key; 5. the cloud retires it.
    r = run_edge("trust", "remove", old.key_id, "--store", str(store.root))
    assert r.returncode == 0 and f"trusted: {new.key_id}" in r.stdout
    assert sync(store, client, "iris").version == 1
    # Someone signing with the old key (a stale mirror, a leaked key) is now refused.
    ring.use(old.key_id)
    with pytest.raises(SignatureError, match=f"{old.key_id}.*does not trust"):
        sync(store, client, "iris")
    active = store.active("iris")
    assert active is not None and active.raw["signature"]["key_id"] == new.key_id
    ring.use(new.key_id)
    ring.remove(old.key_id)
    assert [k.key_id for k in ring.list()] == [new.key_id]
    assert sync(store, client, "iris").version == 1
