"""The TLS identity ``hybridml-cloud serve`` answers HTTPS with, checked before serving.

``serve --certfile FILE --keyfile FILE`` (or ``$HYBRIDML_CERTFILE`` and ``$HYBRIDML_KEYFILE``;
a flag wins over its variable) hands both files to gunicorn's TLS. gunicorn reads them only
when a worker wraps its first connection, and would prompt for the passphrase of an
encrypted key on a terminal nobody watches; so :func:`tls_files` reads and checks them first
and a mistake is a :class:`ConfigError` naming the flag, before anything listens.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from hybridml.shared.errors import ConfigError

CERTFILE_ENV = "HYBRIDML_CERTFILE"
KEYFILE_ENV = "HYBRIDML_KEYFILE"


@dataclass(frozen=True)
class TLSFiles:
    """The PEM certificate (chain) and private key gunicorn serves HTTPS with."""

    certfile: str
    keyfile: str


def tls_files(certfile: str | None = None, keyfile: str | None = None,
              env: Mapping[str, str] | None = None) -> TLSFiles | None:
    """The TLS files from the flags, else ``$HYBRIDML_CERTFILE`` / ``$HYBRIDML_KEYFILE``.

    None when neither is given (plain HTTP). Both or neither, else :class:`ConfigError`;
    each file must be readable and the pair must load as a certificate and its key, else a
    :class:`ConfigError` naming the flag — so a typo stops ``serve`` before gunicorn starts,
    not in every worker at the first connection.
    """
    env = os.environ if env is None else env
    cert = certfile or env.get(CERTFILE_ENV) or None
    key = keyfile or env.get(KEYFILE_ENV) or None
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--keyfile", "--certfile") if cert is None else \
            ("--certfile", "--keyfile")
        env_name = CERTFILE_ENV if cert is None else KEYFILE_ENV
        raise ConfigError(f"{given} needs {missing} too (or ${env_name}): pass both to serve "
                          "HTTPS, or neither to serve HTTP", field=missing[2:])
    data = {}
    for flag, path in (("--certfile", cert), ("--keyfile", key)):
        try:
            data[flag] = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror}); check the path "
                              "and that this user may read it", field=flag[2:]) from None
    try:
        x509.load_pem_x509_certificates(data["--certfile"])
    except ValueError:
        raise ConfigError(f"--certfile {cert} is not a PEM certificate (chain): pass the "
                          "server's certificate, then any intermediates, as PEM",
                          field="certfile") from None
    try:
        serialization.load_pem_private_key(data["--keyfile"], password=None)
    except TypeError:  # gunicorn would prompt for the passphrase in every worker
        raise ConfigError(f"--keyfile {key} is encrypted; pass an unencrypted PEM key "
                          "readable by this user only", field="keyfile") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--keyfile {key} is not a PEM private key", field="keyfile") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"--keyfile {key} does not match --certfile {cert} "
                          f"({exc.reason or exc}); pass the key the certificate was made for",
                          field="keyfile") from None
    return TLSFiles(cert, key)
