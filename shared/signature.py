"""The manifest-signature contract both sides share: algorithm, key ids, signed bytes.

A served manifest carries::

    "signature": {"alg": "ed25519", "key_id": "3f2a...", "value": "<base64 of 64 bytes>"}

over :func:`signed_payload` (the canonical JSON of the manifest without ``signature``). A key
names itself: its id is the first 16 hex digits of the sha256 of the raw 32-byte public key
(:func:`key_id_of`), so the cloud's ``keys list`` and the edge's ``trust list`` show the same
id and a device picks the right trusted key without trying them all.

Signing lives in :mod:`hybridml.cloud.signing`, verification in :mod:`hybridml.edge.trust`;
this module holds only what both must agree on, without cryptography.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .manifest import canonical_json

ALG = "ed25519"
KEY_ID_RE = re.compile(r"^[0-9a-f]{16}$")


def key_id_of(public_raw: bytes) -> str:
    """The key id of a raw 32-byte ed25519 public key: 16 hex digits of its sha256."""
    import hashlib  # here: it loads OpenSSL (~3.5 MB RSS), which predicting never needs

    return hashlib.sha256(public_raw).hexdigest()[:16]


def signed_payload(manifest: Mapping[str, Any]) -> bytes:
    """The bytes a signature covers: the canonical JSON of the manifest minus ``signature``."""
    return canonical_json({k: v for k, v in manifest.items() if k != "signature"})


__all__ = ["ALG", "KEY_ID_RE", "key_id_of", "signed_payload"]
