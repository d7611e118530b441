"""Manifest signature checks on the device: which cloud keys it trusts, and the verdict.

Trusted public keys live in ``<store>/trusted/<key_id>.pub`` (PEM, as ``hybridml-cloud keys
init`` writes them); ``hybridml-edge trust add FILE`` installs one. A manifest's signature
covers ``canonical_json(manifest without "signature")``, so it pins every artifact's sha256
(see :mod:`hybridml.cloud.signing` for the format).

Policy (:func:`check_manifest`, called by sync right after parsing a manifest):

* the store trusts one or more keys: the manifest must be signed by one of them with a valid
  signature, else :class:`SignatureError` and nothing is downloaded or activated;
* the store trusts no key: the manifest is refused (fail-closed: such a device cannot tell
  the cloud's manifests from an attacker's), unless the caller passes ``allow_unsigned``
  (``--allow-unsigned``, for a lab or a test on a trusted network); then it is accepted with
  a warning and ``status`` reports it as not verified. A device that trusts a key never
  accepts an unsigned manifest, whatever the flag.

Pure: cryptography + stdlib + :mod:`hybridml.shared` (the key id and signed bytes are
:mod:`hybridml.shared.signature`'s).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from hybridml.shared.errors import ConfigError, NotFoundError, SignatureError
from hybridml.shared.files import atomic_write
from hybridml.shared.manifest import Manifest
from hybridml.shared.signature import ALG, KEY_ID_RE, key_id_of, signed_payload

log = logging.getLogger("hybridml.edge.trust")

TRUST_DIR = "trusted"


def _key_id(key: Ed25519PublicKey) -> str:
    """The id the cloud gives ``key`` (:func:`hybridml.shared.signature.key_id_of`)."""
    return key_id_of(key.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw))


def load_public_key(data: bytes, source: str = "key") -> Ed25519PublicKey:
    """Parse a PEM ed25519 public key; :class:`ConfigError` names ``source`` when it is not one."""
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{source} is not a PEM public key ({exc}); use the .pub file that "
                          "'hybridml-cloud keys init' printed", field="key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source} is not an ed25519 public key", field="key")
    return key


def verify(manifest: Mapping[str, Any], keys: Mapping[str, Ed25519PublicKey]) -> str:
    """Check ``manifest``'s signature against ``keys`` (by key id); returns the key id.

    Raises :class:`SignatureError` when it is unsigned, malformed, by an untrusted key, or
    does not match the manifest's bytes.
    """
    what = f"manifest {manifest.get('name')!r} v{manifest.get('version')}"
    sig = manifest.get("signature")
    if sig is None:
        raise SignatureError(f"{what} is not signed, and this device only accepts manifests "
                             f"signed by {_names(keys)}; run 'hybridml-cloud keys init' on "
                             "the cloud", field="signature")
    if not isinstance(sig, Mapping) or sig.get("alg") != ALG:
        raise SignatureError(f"{what} has a malformed signature (need alg {ALG!r}, key_id, "
                             "value)", field="signature")
    key_id, value = sig.get("key_id"), sig.get("value")
    key = keys.get(key_id) if isinstance(key_id, str) else None
    if key is None or not isinstance(key_id, str):
        raise SignatureError(f"{what} is signed by key {key_id!r}, which this device does not "
                             f"trust (it trusts {_names(keys)}); if the cloud rotated keys, run "
                             "'hybridml-edge trust add NEW.pub'", field="signature",
                             key_id=str(key_id))
    try:
        raw = base64.b64decode(str(value), validate=True)
        key.verify(raw, signed_payload(manifest))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureError(f"{what} does not match its signature by key {key_id}: it was "
                             "altered after signing (or an artifact hash was swapped); not "
                             "installed", field="signature", key_id=key_id) from None
    return key_id


def _names(keys: Mapping[str, Any]) -> str:
    return ", ".join(sorted(keys)) or "no key"


class TrustStore:
    """The public keys a device trusts, in ``<store>/trusted``."""

    def __init__(self, store_root: str | os.PathLike[str]) -> None:
        self.dir = Path(store_root).expanduser() / TRUST_DIR

    def keys(self) -> dict[str, Ed25519PublicKey]:
        """``{key_id: key}`` of every trusted key (an unreadable file is a ConfigError)."""
        if not self.dir.is_dir():
            return {}
        out: dict[str, Ed25519PublicKey] = {}
        for p in sorted(self.dir.glob("*.pub")):
            key = load_public_key(p.read_bytes(), str(p))
            out[_key_id(key)] = key
        return out

    def add(self, path: str | os.PathLike[str]) -> str:
        """Trust the public key in ``path``; returns its key id (idempotent)."""
        src = Path(path).expanduser()
        try:
            data = src.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read key file {src}: {exc.strerror}", field="key") from exc
        key = load_public_key(data, str(src))
        key_id = _key_id(key)
        self.dir.mkdir(parents=True, exist_ok=True)
        pem = key.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
        atomic_write(self.dir / f"{key_id}.pub", pem, 0o644)
        log.info("trusting key %s from %s", key_id, src)
        return key_id

    def remove(self, key_id: str) -> None:
        """Stop trusting ``key_id``; :class:`NotFoundError` lists the trusted keys."""
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"invalid key id {key_id!r}: use the 16 hex digits shown by "
                              "'hybridml-edge trust list'", field="key_id")
        keys = self.keys()
        if key_id not in keys:
            raise NotFoundError(f"key {key_id} is not trusted here; trusted: {_names(keys)}",
                                field="key_id")
        for p in self.dir.glob("*.pub"):
            if _key_id(load_public_key(p.read_bytes(), str(p))) == key_id:
                p.unlink()
        log.info("no longer trusting key %s", key_id)


def check_manifest(store_root: str | os.PathLike[str], manifest: Manifest, *,
                   allow_unsigned: bool = False) -> str | None:
    """Apply the device's policy (module docstring); returns the verifying key id, or None
    when ``allow_unsigned`` let a device that trusts no key accept it unchecked."""
    keys = TrustStore(store_root).keys()
    if keys:
        return verify(manifest.raw, keys)
    where = Path(store_root).expanduser() / TRUST_DIR
    if not allow_unsigned:
        raise SignatureError(
            f"this device trusts no signing key ({where} is empty), so it cannot tell the "
            f"cloud's manifest {manifest.name!r} from an attacker's; not installed. Copy the "
            ".pub file 'hybridml-cloud keys init' wrote and run 'hybridml-edge trust add "
            "KEY.pub' (or sync with --trust KEY.pub); --allow-unsigned skips the check on a "
            "network you trust", field="signature")
    log.warning("no trusted keys in %s: %s v%d accepted without a signature check "
                "(--allow-unsigned); provision one with 'hybridml-edge trust add KEY.pub'",
                where, manifest.name, manifest.version)
    return None


def describe(store_root: str | os.PathLike[str], manifest: Manifest) -> dict[str, Any]:
    """The signature state of a stored manifest for ``status``.

    ``state`` is ``verified`` (a trusted key signed it), ``unverified`` (signed, but the device
    trusts no key), ``unsigned``, ``untrusted`` (signed by a key no longer trusted) or
    ``invalid``.
    """
    sig = manifest.raw.get("signature")
    key_id = sig.get("key_id") if isinstance(sig, Mapping) else None
    try:
        keys = TrustStore(store_root).keys()
    except ConfigError:
        keys = {}
    if sig is None:
        state = "unsigned"
    elif not keys:
        state = "unverified"
    elif key_id not in keys:
        state = "untrusted"
    else:
        try:
            verify(manifest.raw, keys)
            state = "verified"
        except SignatureError:
            state = "invalid"
    return {"state": state, "key_id": key_id, "trusted_keys": sorted(keys)}
