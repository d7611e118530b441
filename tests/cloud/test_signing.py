"""Signed manifests: the cloud's key ring and signer, the edge's trust store and verdict."""

from __future__ import annotations

import copy
import json
import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.cli import main as cloud_main
from hybridml.cloud.signing import KeyRing, Signer, signed_payload
from hybridml.edge.trust import TrustStore, check_manifest, describe, verify
from hybridml.shared.errors import ConfigError, ManifestError, NotFoundError, SignatureError
from hybridml.shared.manifest import Manifest

SHA_A, SHA_B = "a" * 64, "b" * 64


def manifest(version: int = 1, sha: str = SHA_A) -> dict[str, Any]:
    """A small valid format-1 manifest."""
    return {"format": 1, "name": "eta", "version": version, "created": "2026-01-01T00:00:00Z",
            "artifacts": [{"role": "model", "sha256": sha, "size": 123,
                           "media_type": "application/onnx"}],
            "schema": [{"name": "x", "kind": "numeric", "dtype": "float32"}],
            "output": {"task": "regression", "outputs": ["value"]},
            "metrics": {"rmse": 0.5, "note": "ünïcode"}}


@pytest.fixture
def ring(tmp_path: Path) -> KeyRing:
    """A key ring under a fresh registry directory."""
    return KeyRing(tmp_path / "reg")


def trust_keys(tmp_path: Path, ring: KeyRing, *key_ids: str) -> TrustStore:
    """An edge store trusting ``key_ids`` from ``ring``."""
    trust = TrustStore(tmp_path / "store")
    for k in key_ids:
        trust.add(ring.info(k).public_path)
    return trust


def test_keys_init_writes_private_key_0600_and_names_it_by_public_key(ring: KeyRing) -> None:
    info = ring.init()
    assert info.active and info.has_private and len(info.key_id) == 16
    key_file = ring.dir / f"{info.key_id}.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(ring.dir.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert b"PUBLIC KEY" in info.public_path.read_bytes()
    store = TrustStore(ring.dir.parent / "edge")
    assert store.add(info.public_path) == info.key_id  # both sides derive the same id


def test_second_key_does_not_sign_until_used(ring: KeyRing) -> None:
    first = ring.init()
    second = ring.init()
    assert not second.active and ring.active_id() == first.key_id
    assert ring.use(second.key_id).active and ring.active_id() == second.key_id
    assert [k.key_id for k in ring.list()] == sorted([first.key_id, second.key_id],
                                                     key=lambda k: (ring.info(k).created, k))
    assert ring.init(activate=True).active


def test_active_key_cannot_be_removed_but_a_retired_one_can(ring: KeyRing) -> None:
    old = ring.init()
    new = ring.init(activate=True)
    with pytest.raises(ConfigError, match="active signing key"):
        ring.remove(new.key_id)
    ring.remove(old.key_id)
    assert [k.key_id for k in ring.list()] == [new.key_id]
    with pytest.raises(NotFoundError, match=new.key_id):
        ring.use("0123456789abcdef")
    with pytest.raises(ConfigError, match="16 hex digits"):
        ring.use("../../etc/passwd")


def test_signature_verifies_and_is_deterministic(tmp_path: Path, ring: KeyRing) -> None:
    key = ring.init()
    signer = Signer(ring.dir.parent)
    signed = signer.sign(manifest())
    assert signed["signature"]["alg"] == "ed25519"
    assert signed["signature"]["key_id"] == key.key_id
    assert signer.sign(manifest()) == signed  # same bytes -> same ETag
    assert signer.sign(signed) == signed  # re-signing replaces, never nests
    trust = trust_keys(tmp_path, ring, key.key_id)
    # What the edge sees went through JSON on the wire.
    assert verify(json.loads(json.dumps(signed)), trust.keys()) == key.key_id
    assert signed_payload(signed) == signed_payload(manifest())


def test_swapped_artifact_hash_breaks_the_signature(tmp_path: Path, ring: KeyRing) -> None:
    key = ring.init()
    signed = Signer(ring.dir.parent).sign(manifest())
    forged = copy.deepcopy(signed)
    forged["artifacts"][0]["sha256"] = SHA_B
    trust = trust_keys(tmp_path, ring, key.key_id)
    with pytest.raises(SignatureError, match="altered after signing") as info:
        verify(forged, trust.keys())
    assert info.value.code == "signature" and isinstance(info.value, ManifestError)
    bumped = copy.deepcopy(signed)
    bumped["version"] = 2
    with pytest.raises(SignatureError):
        verify(bumped, trust.keys())


@pytest.mark.parametrize("signature", [None, "abc", {"alg": "rsa", "key_id": "x"},
                                       {"alg": "ed25519", "key_id": None, "value": "AAAA"}])
def test_unsigned_or_malformed_signature_is_refused_when_keys_are_trusted(
        tmp_path: Path, ring: KeyRing, signature: Any) -> None:
    trust = trust_keys(tmp_path, ring, ring.init().key_id)
    body = manifest()
    if signature is not None:
        body["signature"] = signature
    with pytest.raises(SignatureError):
        verify(body, trust.keys())


def test_bad_base64_or_short_signature_is_refused(tmp_path: Path, ring: KeyRing) -> None:
    key = ring.init()
    trust = trust_keys(tmp_path, ring, key.key_id)
    for value in ("not base64!!", "AAAA"):
        body = dict(manifest(), signature={"alg": "ed25519", "key_id": key.key_id,
                                           "value": value})
        with pytest.raises(SignatureError, match=key.key_id):
            verify(body, trust.keys())


def test_signature_by_untrusted_key_names_it_and_how_to_fix(tmp_path: Path,
                                                             ring: KeyRing) -> None:
    trusted = ring.init()
    other = KeyRing(tmp_path / "other-reg").init()
    signed = Signer(tmp_path / "other-reg").sign(manifest())
    trust = trust_keys(tmp_path, ring, trusted.key_id)
    with pytest.raises(SignatureError, match=f"key '{other.key_id}'.*trust add") as info:
        verify(signed, trust.keys())
    assert info.value.details["key_id"] == other.key_id


def test_no_trusted_keys_refuses_unless_unsigned_is_allowed_and_status_says_so(
        tmp_path: Path, ring: KeyRing, caplog: pytest.LogCaptureFixture) -> None:
    store = tmp_path / "store"
    unsigned = Manifest.from_json(manifest())
    with pytest.raises(SignatureError, match=r"trusts no signing key.*trust add"):
        check_manifest(store, unsigned)  # fail-closed by default
    with caplog.at_level(logging.WARNING, "hybridml.edge.trust"):
        assert check_manifest(store, unsigned, allow_unsigned=True) is None
    assert "without a signature check" in caplog.text
    assert describe(store, unsigned)["state"] == "unsigned"
    ring.init()
    signed = Manifest.from_json(Signer(ring.dir.parent).sign(manifest()))
    assert describe(store, signed)["state"] == "unverified"


def test_rotation_two_trusted_keys_accept_both_and_removal_refuses_the_old(
        tmp_path: Path, ring: KeyRing) -> None:
    old = ring.init()
    signer = Signer(ring.dir.parent)
    old_signed = Manifest.from_json(signer.sign(manifest()))
    etag_old = signer.etag("e")
    new = ring.init()
    trust = trust_keys(tmp_path, ring, old.key_id, new.key_id)
    ring.use(new.key_id)  # the running signer follows without a restart
    new_signed = Manifest.from_json(signer.sign(manifest()))
    assert new_signed.raw["signature"]["key_id"] == new.key_id
    assert signer.etag("e") != etag_old  # devices re-fetch and store the new signature
    store = tmp_path / "store"
    assert check_manifest(store, old_signed) == old.key_id
    assert check_manifest(store, new_signed) == new.key_id
    trust.remove(old.key_id)
    assert sorted(trust.keys()) == [new.key_id]
    assert check_manifest(store, new_signed) == new.key_id
    with pytest.raises(SignatureError, match="does not trust"):
        check_manifest(store, old_signed)
    assert describe(store, old_signed)["state"] == "untrusted"
    assert describe(store, new_signed)["state"] == "verified"


def test_trust_add_rejects_files_that_are_not_ed25519_public_keys(tmp_path: Path,
                                                                   ring: KeyRing) -> None:
    trust = TrustStore(tmp_path / "store")
    junk = tmp_path / "junk.pub"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="not a PEM public key"):
        trust.add(junk)
    key = ring.init()
    with pytest.raises(ConfigError, match="not a PEM public key"):
        trust.add(ring.dir / f"{key.key_id}.key")  # a private key is not a trust anchor
    with pytest.raises(ConfigError, match="cannot read"):
        trust.add(tmp_path / "missing.pub")
    with pytest.raises(NotFoundError, match="not trusted"):
        trust.remove(key.key_id)


def test_unsigned_when_registry_has_no_key(tmp_path: Path) -> None:
    signer = Signer(tmp_path / "reg")
    assert "signature" not in signer.sign(manifest())
    assert signer.etag("abc") == "abc"


def test_keys_cli_init_list_use_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    assert cloud_main(["keys", "init", "--registry", reg, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cloud_main(["keys", "init", "--registry", reg]) == 0
    out = capsys.readouterr().out
    second = out.split()[1].rstrip(":")
    assert "not signing yet" in out and f"keys use {second}" in out
    assert cloud_main(["keys", "use", second, "--registry", reg]) == 0
    assert f"signed with key {second}" in capsys.readouterr().out
    assert cloud_main(["keys", "list", "--registry", reg, "--json"]) == 0
    listed = {k["key_id"]: k["active"] for k in json.loads(capsys.readouterr().out)}
    assert listed == {first["key_id"]: False, second: True}
    assert cloud_main(["keys", "remove", second, "--registry", reg]) == 2
    assert "active signing key" in capsys.readouterr().err
    assert cloud_main(["keys", "remove", first["key_id"], "--registry", reg]) == 0
