"""Manifest signing: the registry's ed25519 keys and the signer the API serves manifests with.

Layout under the registry root::

    <registry>/keys/<key_id>.key    private key, PEM (PKCS#8), mode 0600
    <registry>/keys/<key_id>.pub    public key, PEM (SubjectPublicKeyInfo): give this to devices
    <registry>/keys/active          the key_id that signs (written atomically)

``key_id`` is the first 16 hex digits of the sha256 of the raw 32-byte public key, so a key
names itself and the edge can pick the right trusted key without trying them all.

A served manifest carries its signature in the body::

    "signature": {"alg": "ed25519", "key_id": "3f2a...", "value": "<base64 of 64 bytes>"}

over ``canonical_json(manifest without "signature")`` (the key id, the algorithm and the
signed bytes are defined once, in :mod:`hybridml.shared.signature`, which the edge also uses).
The manifest lists every artifact's sha256 and size, so the signature also pins the
artifacts: swapping one breaks either the signature or the edge's hash check. The signature
lives in the body, not in a header, so it is stored with the manifest on the device
(``active.json``) and can be re-checked offline, and it survives proxies and copies that drop
headers. ed25519 is deterministic: the same manifest and
key give the same bytes, so ETags stay stable until the manifest or the signing key changes.

Rotation: ``keys init`` (a new key, not yet signing) -> devices ``trust add`` the new ``.pub``
-> ``keys use NEW`` -> devices ``trust remove OLD`` -> ``keys remove OLD``.

On a fleet (``--db postgresql://...``, docs/storage.md §5) nobody copies key files to each
replica: the keys live in the registry's ``signing_keys`` table, the private half as PKCS#8
encrypted (``BestAvailableEncryption``) under ``$HYBRIDML_KEY_PASSPHRASE``, which each replica
gets from its secret store and which the database never holds. A dump of the database alone
reveals no key. ``keys use`` on one replica is seen by every other at its next manifest
(the registry's change stamp); ``.pub`` files are still written under ``<registry>/keys`` for
``trust add``.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError, NotFoundError
from hybridml.shared.files import atomic_write
from hybridml.shared.signature import ALG, KEY_ID_RE, key_id_of, signed_payload

log = logging.getLogger("hybridml.cloud.signing")

KEYS_DIR = "keys"
PASSPHRASE_ENV = "HYBRIDML_KEY_PASSPHRASE"
ACTIVE_FILE = "active"


@dataclass(frozen=True)
class KeyInfo:
    """One key pair of the registry."""

    key_id: str
    public_path: Path
    has_private: bool
    active: bool
    created: str

    def to_json(self) -> dict[str, Any]:
        """JSON form for ``keys list --json``."""
        return {"key_id": self.key_id, "public_key": str(self.public_path),
                "has_private": self.has_private, "active": self.active,
                "created": self.created}


class KeyRing:
    """The signing keys kept under ``<registry>/keys``, or in the registry's database when it
    is PostgreSQL (pass the :class:`~hybridml.cloud.registry.Registry` then)."""

    def __init__(self, registry_root: str | os.PathLike[str]) -> None:
        self.dir = Path(registry_root).expanduser().resolve() / KEYS_DIR
        storage = getattr(registry_root, "storage", None)
        self._db: Any = registry_root if storage is not None and storage.on_postgres else None

    @property
    def in_database(self) -> bool:
        """True when the keys live in the registry's PostgreSQL database."""
        return self._db is not None

    def init(self, *, activate: bool = False) -> KeyInfo:
        """Create a key pair; it signs at once if ``activate`` or if no key is active yet.

        A new key does not replace an active one by default: devices must trust it first.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        private = Ed25519PrivateKey.generate()
        public_raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                       serialization.PublicFormat.Raw)
        key_id = key_id_of(public_raw)
        public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if self._db is not None:
            self.adopt(private)
            if activate or self.active_id() is None:
                self.use(key_id)
            log.info("created signing key %s (in the database, encrypted)", key_id)
            return self.info(key_id)
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # O_EXCL + 0600 at creation: the private key is never readable by others, not even
        # for the instant between create and chmod.
        fd = os.open(self.dir / f"{key_id}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write(self.dir / f"{key_id}.pub", public_pem, 0o644)
        if activate or self.active_id() is None:
            self.use(key_id)
        log.info("created signing key %s", key_id)
        return self.info(key_id)

    def adopt(self, private: Ed25519PrivateKey, *, created: str | None = None) -> KeyInfo:
        """Seal an existing key into the database (``migrate``); a no-op if it is there."""
        if self._db is None:
            raise ConfigError("adopt() moves keys into a PostgreSQL registry; this one keeps "
                              "its keys as files", field="db")
        public_pem = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        key_id = key_id_of(private.public_key().public_bytes(serialization.Encoding.Raw,
                                                             serialization.PublicFormat.Raw))
        sealed = private.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(_passphrase()))
        with self._db.transaction(write=True) as c:
            c.execute("INSERT INTO signing_keys (key_id, public_pem, private_pem, created, "
                      "active) VALUES (?, ?, ?, ?, 0) ON CONFLICT (key_id) DO NOTHING",
                      (key_id, public_pem.decode(), sealed.decode(), created or utc_iso()))
        self._cache_public(key_id, public_pem)
        return self.info(key_id)

    def active_id(self) -> str | None:
        """The key id that signs, or None when no key is active."""
        if self._db is not None:
            with self._db.transaction(write=False) as c:
                row = c.execute("SELECT key_id FROM signing_keys WHERE active = 1").fetchone()
            return None if row is None else str(row[0])
        try:
            text = (self.dir / ACTIVE_FILE).read_text().strip()
        except FileNotFoundError:
            return None
        return text if KEY_ID_RE.fullmatch(text) else None

    def use(self, key_id: str) -> KeyInfo:
        """Make ``key_id`` the signing key (running servers pick it up on the next request)."""
        self.info(key_id)  # NotFoundError listing the keys there are
        self.private_key(key_id)  # raises if the private half is missing or unreadable
        if self._db is not None:
            with self._db.transaction(write=True) as c:  # every replica's stamp moves
                c.execute("UPDATE signing_keys SET active = CASE WHEN key_id = ? THEN 1 "
                          "ELSE 0 END", (key_id,))
            log.info("signing key is now %s", key_id)
            return self.info(key_id)
        atomic_write(self.dir / ACTIVE_FILE, (key_id + "\n").encode(), 0o600)
        log.info("signing key is now %s", key_id)
        return self.info(key_id)

    def remove(self, key_id: str) -> None:
        """Delete a retired key pair; the active key cannot be removed."""
        self._check_id(key_id)
        if key_id == self.active_id():
            raise ConfigError(f"key {key_id} is the active signing key; run 'hybridml-cloud "
                              "keys use OTHER_ID' first", field="key_id")
        self.info(key_id)
        if self._db is not None:
            with self._db.transaction(write=True) as c:
                c.execute("DELETE FROM signing_keys WHERE key_id = ?", (key_id,))
        for suffix in (".key", ".pub"):
            (self.dir / f"{key_id}{suffix}").unlink(missing_ok=True)
        log.info("removed signing key %s", key_id)

    def list(self) -> list[KeyInfo]:
        """Every key pair, oldest first."""
        if self._db is not None:
            with self._db.transaction(write=False) as c:
                ids = [r[0] for r in c.execute("SELECT key_id FROM signing_keys")]
            return sorted((self.info(k) for k in ids), key=lambda k: (k.created, k.key_id))
        if not self.dir.is_dir():
            return []
        infos = [self.info(p.stem) for p in self.dir.glob("*.pub") if KEY_ID_RE.fullmatch(p.stem)]
        return sorted(infos, key=lambda k: (k.created, k.key_id))

    def info(self, key_id: str) -> KeyInfo:
        """Describe one key; :class:`NotFoundError` lists the keys that exist."""
        self._check_id(key_id)
        if self._db is not None:
            with self._db.transaction(write=False) as c:
                row = c.execute("SELECT public_pem, private_pem IS NOT NULL, created, active "
                                "FROM signing_keys WHERE key_id = ?", (key_id,)).fetchone()
                known = [r[0] for r in c.execute("SELECT key_id FROM signing_keys "
                                                 "ORDER BY key_id")]
            if row is None:
                raise NotFoundError(f"no signing key {key_id!r} in the database; keys: "
                                    f"{', '.join(known) or 'none (run hybridml-cloud keys init)'}",
                                    field="key_id")
            pub = self._cache_public(key_id, str(row[0]).encode())
            return KeyInfo(key_id, pub, bool(row[1]), bool(row[3]), str(row[2]))
        pub = self.dir / f"{key_id}.pub"
        if not pub.is_file():
            known = sorted(p.stem for p in self.dir.glob("*.pub")) if self.dir.is_dir() else []
            raise NotFoundError(f"no signing key {key_id!r} in {self.dir}; keys: "
                                f"{', '.join(known) or 'none (run hybridml-cloud keys init)'}",
                                field="key_id")
        return KeyInfo(key_id, pub, (self.dir / f"{key_id}.key").is_file(),
                       key_id == self.active_id(), utc_iso(pub.stat().st_mtime))

    def private_key(self, key_id: str) -> Ed25519PrivateKey:
        """Load the private key ``key_id``."""
        self._check_id(key_id)
        if self._db is not None:
            return self._sealed_key(key_id)
        path = self.dir / f"{key_id}.key"
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise NotFoundError(f"no private key {path}; run 'hybridml-cloud keys list' to see "
                                "the keys this registry can sign with", field="key_id") from None
        except ValueError as exc:
            raise ConfigError(f"{path} is not a PEM private key: {exc}", field="key_id") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an ed25519 key", field="key_id")
        return key

    def _sealed_key(self, key_id: str) -> Ed25519PrivateKey:
        with self._db.transaction(write=False) as c:
            row = c.execute("SELECT private_pem FROM signing_keys WHERE key_id = ?",
                            (key_id,)).fetchone()
        if row is None or row[0] is None:
            raise NotFoundError(f"no private key {key_id} in the database; run 'hybridml-cloud "
                                "keys list' to see the keys it can sign with", field="key_id")
        try:
            key = serialization.load_pem_private_key(str(row[0]).encode(),
                                                     password=_passphrase())
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot decrypt signing key {key_id}: ${PASSPHRASE_ENV} is not "
                              "the passphrase it was sealed with", field="key_id") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {key_id} is not an ed25519 key", field="key_id")
        return key

    def _cache_public(self, key_id: str, pem: bytes) -> Path:
        """The ``.pub`` file of a database key (written once: devices ``trust add`` it)."""
        path = self.dir / f"{key_id}.pub"
        if not path.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            atomic_write(path, pem, 0o644)
        return path

    @staticmethod
    def _check_id(key_id: str) -> None:
        if not isinstance(key_id, str) or not KEY_ID_RE.fullmatch(key_id):
            raise ConfigError(f"invalid key id {key_id!r}: use the 16 hex digits shown by "
                              "'hybridml-cloud keys list'", field="key_id")


def _passphrase() -> bytes:
    """The passphrase that seals database keys; ConfigError naming the variable if unset."""
    value = os.environ.get(PASSPHRASE_ENV, "")
    if len(value) < 12:
        raise ConfigError(f"${PASSPHRASE_ENV} must hold the passphrase (12+ characters) that "
                          "seals the signing keys in the database; give every replica the same "
                          "one from your secret store", field=PASSPHRASE_ENV)
    return value.encode("utf-8")


class Signer:
    """Signs manifests with the registry's active key; follows ``keys use`` without a restart.

    Each call stats ``keys/active`` (microseconds) and reloads the key only when that file
    changed, so every gunicorn worker switches keys on its next request.
    """

    def __init__(self, registry_root: str | os.PathLike[str]) -> None:
        self.keys = KeyRing(registry_root)
        self._registry: Any = registry_root if self.keys.in_database else None
        self._lock = threading.Lock()
        self._stamp: object = None
        self._current: tuple[str, Ed25519PrivateKey] | None = None
        self._unsealed: dict[str, Ed25519PrivateKey] = {}  # decrypting costs ~0.1 s: once
        self._warned = False

    def _seen(self) -> object:
        """What changes when the active key may have: the ``active`` file's identity, or
        (database keys) the registry's change stamp — a fresh object when it is unknown."""
        if self._registry is not None:
            return self._registry.stamp() or object()
        try:
            st = (self.keys.dir / ACTIVE_FILE).stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns)

    def current(self) -> tuple[str, Ed25519PrivateKey] | None:
        """The active ``(key_id, private key)``, or None when the registry has no key."""
        stamp = self._seen()
        with self._lock:
            if stamp != self._stamp:
                key_id = self.keys.active_id() if stamp is not None else None
                if key_id and key_id not in self._unsealed:
                    self._unsealed[key_id] = self.keys.private_key(key_id)
                before = self._current[0] if self._current else None
                self._current = (key_id, self._unsealed[key_id]) if key_id else None
                self._stamp = stamp
                if key_id and key_id != before:
                    log.info("signing manifests with key %s", key_id)
            if self._current is None and not self._warned:
                log.warning("no signing key in %s: serving unsigned manifests; run "
                            "'hybridml-cloud keys init'", self.keys.dir)
                self._warned = True
            return self._current

    @property
    def key_id(self) -> str | None:
        """The id of the signing key, or None."""
        cur = self.current()
        return cur[0] if cur else None

    def sign(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Return a copy of ``manifest`` with a ``signature`` (unchanged when there is no key)."""
        body = {k: v for k, v in manifest.items() if k != "signature"}
        cur = self.current()
        if cur is None:
            return body
        key_id, key = cur
        value = key.sign(signed_payload(body))
        body["signature"] = {"alg": ALG, "key_id": key_id,
                             "value": base64.b64encode(value).decode("ascii")}
        return body

    def etag(self, manifest_etag: str) -> str:
        """The ETag of the signed manifest: the manifest's own ETag plus the key id.

        Signatures are deterministic, so (manifest, key) fixes the served bytes; a key change
        makes devices fetch the manifest again and store the new signature.
        """
        key_id = self.key_id
        return f"{manifest_etag}.{key_id}" if key_id else manifest_etag

