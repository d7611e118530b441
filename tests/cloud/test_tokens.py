"""API tokens: hashed storage, roles, the bearer check, admin routes and serve's refusal rules."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from hybridml.cloud.app import create_app
from hybridml.cloud.auth import AuditLog, promote, rollback
from hybridml.cloud.cli import main as cloud_main
from hybridml.cloud.registry import Registry
from hybridml.cloud.serve import check_security
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tokens import TokenStore, hash_token
from hybridml.shared.errors import ConfigError, NotFoundError
from hybridml.shared.net import is_loopback
from tests.cloud.conftest import IRIS_ROW as ROW


@pytest.fixture
def tokens(iris_copy: Path) -> dict[str, str]:
    """One device and one admin token in ``iris_copy``."""
    store = TokenStore(iris_copy)
    return {"device": store.create("device", "edge-1")[1],
            "admin": store.create("admin", "ops")[1]}


@pytest.fixture
def client(iris_copy: Path, tokens: dict[str, str],
           monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    """A test client of the secure app (tokens checked)."""
    monkeypatch.delenv("HYBRIDML_INSECURE", raising=False)
    app = create_app(iris_copy)
    with app.test_client() as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    """The Authorization header for ``token``."""
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------ the store
def test_tokens_are_stored_only_as_hashes_in_a_private_file(iris_copy: Path) -> None:
    store = TokenStore(iris_copy)
    info, token = store.create("device", "edge-1")
    assert token.startswith(f"hml_{info.id}_") and len(token) > 50
    raw = (iris_copy / "tokens.db").read_bytes()
    assert token.encode() not in raw and token.split("_", 2)[2].encode() not in raw
    assert hash_token(token).encode() in raw
    assert stat.S_IMODE((iris_copy / "tokens.db").stat().st_mode) == 0o600
    assert store.authenticate(token) == info


def test_unknown_malformed_and_revoked_tokens_do_not_authenticate(iris_copy: Path) -> None:
    store = TokenStore(iris_copy)
    info, token = store.create("admin", "ops")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for bad in ("", "hml_", "nope", forged, token + "x", f"hml_{'0' * 12}_{'x' * 43}"):
        assert store.authenticate(bad) is None
    assert store.revoke(info.id).revoked is not None
    assert store.authenticate(token) is None
    assert store.count_active() == 0 and len(store.list()) == 1


def test_revoke_by_name_needs_a_unique_active_name(iris_copy: Path) -> None:
    store = TokenStore(iris_copy)
    store.create("device", "edge-1")
    store.create("device", "edge-1")
    with pytest.raises(ConfigError, match="revoke by id"):
        store.revoke("edge-1")
    with pytest.raises(NotFoundError, match="tokens list"):
        store.revoke("nobody")


def test_bad_role_or_label_is_a_config_error(iris_copy: Path) -> None:
    with pytest.raises(ConfigError, match="role 'root'"):
        TokenStore(iris_copy).create("root", "x")
    with pytest.raises(ConfigError, match="token name"):
        TokenStore(iris_copy).create("device", "")


def test_empty_registry_has_no_tokens_and_no_file(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "reg")
    assert store.list() == [] and store.authenticate("hml_x") is None
    assert not (tmp_path / "reg" / "tokens.db").exists()


# -------------------------------------------------------------------------------- the API
def test_healthz_is_open_and_the_rest_needs_a_token(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    for path in ("/v1/models", "/v1/models/iris/manifest", "/v1/artifacts/" + "a" * 64,
                 "/v1/nothing-here"):
        r = client.get(path)
        assert r.status_code == 401, path
        assert r.get_json()["error"]["code"] == "unauthorized"
        assert "Authorization: Bearer" in r.get_json()["error"]["message"]
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.get("/v1/models", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401
    r = client.get("/v1/models", headers=bearer("hml_000000000000_" + "x" * 43))
    assert r.status_code == 401 and "unknown or revoked" in r.get_json()["error"]["message"]


def test_device_token_reads_and_predicts_but_cannot_promote(client: FlaskClient,
                                                            tokens: dict[str, str]) -> None:
    dev = bearer(tokens["device"])
    assert client.get("/v1/models", headers=dev).status_code == 200
    man = client.get("/v1/models/iris/manifest", headers=dev)
    assert man.status_code == 200 and "signature" not in man.get_json()  # no key in this registry
    sha = man.get_json()["artifacts"][0]["sha256"]
    assert client.get(f"/v1/artifacts/{sha}", headers=dev).status_code == 200
    r = client.post("/v1/models/iris/predict", json={"inputs": [ROW]}, headers=dev)
    assert r.status_code == 200 and r.get_json()["model_version"] == 1
    for path, body in (("/v1/models/iris/aliases/stable", {"version": 2}),
                       ("/v1/models/iris/rollback", {})):
        r = client.post(path, json=body, headers=dev)
        assert r.status_code == 403 and r.get_json()["error"]["code"] == "forbidden"
        assert "needs an admin token" in r.get_json()["error"]["message"]
    assert client.get("/v1/nothing-here", headers=dev).status_code == 404


def test_admin_promotes_and_rolls_back_stable(client: FlaskClient, tokens: dict[str, str],
                                              iris_copy: Path) -> None:
    adm = bearer(tokens["admin"])
    r = client.post("/v1/models/iris/aliases/stable", json={"version": 2}, headers=adm)
    assert r.status_code == 200 and r.get_json() == {"name": "iris", "alias": "stable",
                                               "version": 2, "previous": 1}
    assert Registry(iris_copy).aliases("iris") == {"stable": 2}  # no helper aliases
    r = client.post("/v1/models/iris/rollback", headers=adm)
    assert r.status_code == 200 and r.get_json()["version"] == 1 and r.get_json()["previous"] == 2
    r = client.post("/v1/models/iris/rollback", headers=adm)  # a second rollback undoes it
    assert r.get_json()["version"] == 2
    r = client.post("/v1/models/iris/rollback", json={"version": 1}, headers=adm)
    assert r.get_json()["version"] == 1
    r = client.post("/v1/models/iris/aliases/canary", json={"version": "latest"}, headers=adm)
    assert r.get_json()["version"] == 2 and r.get_json()["previous"] is None
    admin_id = TokenStore(iris_copy).list()[1].id
    log = AuditLog(iris_copy).entries("iris")
    assert [(e["action"], e["alias"], e["from"], e["to"]) for e in log] == [
        ("promote", "stable", 1, 2), ("rollback", "stable", 2, 1), ("rollback", "stable", 1, 2),
        ("rollback", "stable", 2, 1), ("promote", "canary", None, 2)]
    assert all(e["by"] == f"token {admin_id} (ops)" and e["time"] for e in log)


def test_rollback_refuses_when_the_alias_moved_without_a_record(iris_copy: Path) -> None:
    reg = Registry(iris_copy)
    promote(reg, "iris", "stable", 2)
    reg.set_alias("iris", "stable", 1)  # moved behind the audit log's back
    with pytest.raises(NotFoundError, match="pass the version"):
        rollback(reg, "iris")
    assert rollback(reg, "iris", ref=2) == (2, 1)


def test_admin_calls_with_bad_input_are_4xx_json(client: FlaskClient,
                                                 tokens: dict[str, str]) -> None:
    adm = bearer(tokens["admin"])
    cases = [("/v1/models/iris/aliases/stable", {}, 400),
             ("/v1/models/iris/aliases/stable", {"version": True}, 400),
             ("/v1/models/iris/aliases/stable", {"version": 9}, 404),
             ("/v1/models/iris/aliases/Bad-Alias", {"version": 1}, 400),
             ("/v1/models/nope/aliases/stable", {"version": 1}, 404),
             ("/v1/models/iris/rollback", {}, 404),  # nothing promoted yet: no history
             ("/v1/models/iris/rollback", {"alias": 3}, 400)]
    for path, body, status in cases:
        r = client.post(path, json=body, headers=adm)
        assert r.status_code == status, (path, body, r.get_json())
        assert r.get_json()["error"]["message"]
    r = client.post("/v1/models/iris/aliases/stable", data="[1", headers=adm)
    assert r.status_code == 400 and r.get_json()["error"]["details"]["field"] == "body"


def test_revocation_is_immediate(client: FlaskClient, tokens: dict[str, str],
                                 iris_copy: Path) -> None:
    dev = bearer(tokens["device"])
    assert client.get("/v1/models", headers=dev).status_code == 200
    TokenStore(iris_copy).revoke("edge-1")
    assert client.get("/v1/models", headers=dev).status_code == 401


def test_insecure_mode_checks_nothing(iris_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYBRIDML_INSECURE", "1")
    with create_app(iris_copy).test_client() as c:
        assert c.get("/v1/models").status_code == 200
        r = c.post("/v1/models/iris/aliases/stable", json={"version": 2})
        assert r.status_code == 200 and r.get_json()["version"] == 2


# ----------------------------------------------------------------------- serve and the CLI
@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost",
                                  "LOCALHOST"])
def test_loopback_hosts(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.1", "example.com", "", "127.0.0"])
def test_non_loopback_hosts(host: str) -> None:
    assert not is_loopback(host)


def test_serve_refuses_without_tokens_or_key_unless_insecure_on_loopback(iris_copy: Path) -> None:
    reg = str(iris_copy)
    with pytest.raises(ConfigError, match=r"no API tokens.*--insecure"):
        check_security(reg, "0.0.0.0", insecure=False)
    TokenStore(iris_copy).create("device", "edge-1")
    with pytest.raises(ConfigError, match=r"no signing key.*keys init"):
        check_security(reg, "0.0.0.0", insecure=False)
    KeyRing(iris_copy).init()
    check_security(reg, "0.0.0.0", insecure=False)
    check_security(reg, "127.0.0.1", insecure=True)
    with pytest.raises(ConfigError, match="only binds to loopback"):
        check_security(reg, "0.0.0.0", insecure=True)


def test_serve_cli_refuses_insecure_on_a_public_address(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cloud_main(["serve", "--registry", str(iris_copy), "--host", "0.0.0.0",
                       "--insecure"]) == 2
    assert "only binds to loopback" in capsys.readouterr().err
    assert cloud_main(["serve", "--registry", str(iris_copy), "--host", "127.0.0.1"]) == 2
    assert "no API tokens" in capsys.readouterr().err


def test_tokens_cli_prints_the_token_once_and_lists_without_secrets(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(iris_copy)
    assert cloud_main(["tokens", "create", "--role", "device", "--name", "edge-7",
                       "--registry", reg]) == 0
    out, err = capsys.readouterr()
    token = out.strip()
    assert token.startswith("hml_") and "shown only once" in err
    assert TokenStore(iris_copy).authenticate(token) is not None
    assert cloud_main(["tokens", "list", "--registry", reg]) == 0
    listing = capsys.readouterr().out
    assert "edge-7" in listing and token not in listing and token.split("_")[1] in listing
    assert cloud_main(["tokens", "revoke", "edge-7", "--registry", reg, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["revoked"]
    assert TokenStore(iris_copy).authenticate(token) is None
    with pytest.raises(SystemExit):  # argparse: --role must be device or admin
        cloud_main(["tokens", "create", "--role", "root", "--name", "x", "--registry", reg])


def test_cli_promote_records_history_for_cli_rollback(
        iris_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(iris_copy)
    assert cloud_main(["promote", "iris", "2", "--registry", reg]) == 0
    assert cloud_main(["rollback", "iris", "--registry", reg]) == 0
    assert "stable -> v1 (was v2)" in capsys.readouterr().out
    assert Registry(iris_copy).aliases("iris")["stable"] == 1
