"""The rules of the edge's connection to the cloud: which URLs, which CAs, where the token is.

* The cloud URL is ``https://``, or ``http://`` to this machine's loopback. Plain HTTP across
  a network hands the device token and every answer to whoever sits on the path, so it needs
  ``allow_http`` (``--allow-http``, ``HYBRIDML_ALLOW_HTTP=1``): a deliberate choice for a
  network the operator trusts. Several replicas are given as one comma-separated list
  (``--cloud URL1,URL2``, :func:`cloud_urls`), each checked by the same rule; so is a direct
  artifact URL a manifest names (docs/storage.md §3), which gets no token but whose bytes
  could be withheld or swapped on the path all the same.
* ``ca_bundle`` (``--ca-bundle``, ``HYBRIDML_CA_BUNDLE``) pins the CAs: the cloud's certificate
  is checked against that PEM file only. Without it, requests' default (certifi, or
  ``$REQUESTS_CA_BUNDLE``).
* A token never comes from the command line (``ps`` shows every argument to every user):
  ``$HYBRIDML_TOKEN`` or a file only its owner can read (:func:`read_token_file`).
"""

from __future__ import annotations

import os
import ssl
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from hybridml.shared.errors import CloudUnavailableError, ConfigError
from hybridml.shared.net import is_loopback
from hybridml.shared.settings import env_flag

MAX_TOKEN_FILE = 4096  # a token is ~60 characters; more is not a token file


def check_cloud_url(url: str, allow_http: bool = False, *, what: str = "cloud URL",
                    field: str = "cloud") -> SplitResult:
    """The parts of ``url``; :class:`ConfigError` for another scheme, no host, or ``http://``
    to a host off this machine without ``allow_http`` (or ``HYBRIDML_ALLOW_HTTP=1``).
    ``what`` and ``field`` name the URL in the error (an artifact source, say)."""
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018  # a bad port raises here, not at the first request
    except ValueError as exc:
        raise ConfigError(f"{what} {url[:200]!r} is not a URL ({exc}); use "
                          "https://HOST[:PORT]", field=field) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what} {url[:200]!r}: use https://HOST[:PORT] (or http:// to "
                          "this machine's loopback)", field=field)
    if scheme == "http" and not is_loopback(parts.hostname) and not (
            allow_http or env_flag("HYBRIDML_ALLOW_HTTP")):
        raise ConfigError(
            f"refusing plain http:// to {parts.hostname}: anyone on the network path would "
            "read this device's token and could rewrite the cloud's answers and models. Use "
            f"https://{parts.netloc} (with --ca-bundle PEM if the cloud has its own CA), or "
            "pass --allow-http (HYBRIDML_ALLOW_HTTP=1) on a network you trust",
            field=field)
    return parts


def cloud_urls(urls: str | Sequence[str], allow_http: bool = False) -> tuple[str, ...]:
    """The cloud replicas in ``urls`` (a comma-separated string, or a sequence of URLs), in
    order, without duplicates or trailing slashes; each checked by :func:`check_cloud_url`.
    :class:`ConfigError` when none is given."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for item in items:
        url = str(item).strip().rstrip("/")
        if url and url not in out:
            check_cloud_url(url, allow_http)
            out.append(url)
    if not out:
        raise ConfigError(f"no cloud URL in {str(urls)[:200]!r}: give --cloud "
                          "https://HOST[:PORT] (several replicas: URL1,URL2)", field="cloud")
    return tuple(out)


def resolve_ca_bundle(ca_bundle: str | os.PathLike[str] | None) -> str | None:
    """The CA bundle to pin (the argument, else ``$HYBRIDML_CA_BUNDLE``), checked to be a
    readable PEM file with at least one certificate; None for requests' default."""
    flag = "--ca-bundle"
    if ca_bundle is None or str(ca_bundle) == "":
        ca_bundle = os.environ.get("HYBRIDML_CA_BUNDLE") or None
        flag = "$HYBRIDML_CA_BUNDLE"
    if ca_bundle is None:
        return None
    path = Path(ca_bundle).expanduser()
    try:
        with open(path, "rb"):
            pass
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:  # an OSError too: first
        raise ConfigError(f"{flag} {path} holds no PEM certificate ({exc.reason or exc}); give "
                          "the PEM file of the CA that signed the cloud's certificate",
                          field="ca_bundle") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc.strerror or exc}); give the "
                          "PEM file of the CA that signed the cloud's certificate",
                          field="ca_bundle") from None
    return str(path)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path``: a regular file that only its owner may read or write (mode
    ``& 0o077 == 0``), one line; surrounding whitespace is stripped. :class:`ConfigError`
    saying how to fix anything else."""
    p = Path(path).expanduser()
    try:
        # Read-only (flags 0) and non-blocking: a FIFO in place of the file must not hang
        # the device before fstat below tells it is no regular file.
        fd = os.open(p, getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ConfigError(f"--token-file {p}: cannot open it ({exc.strerror or exc})",
                          field="token_file") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--token-file {p} is not a regular file; put the token alone "
                              f"in a file and run 'chmod 600 {p}'", field="token_file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"--token-file {p} may be read or written by other users (mode "
                f"{stat.S_IMODE(st.st_mode):o}); run 'chmod 600 {p}'", field="token_file")
        data = b""
        while len(data) <= MAX_TOKEN_FILE and (more := os.read(fd, MAX_TOKEN_FILE + 1)):
            data += more
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise ConfigError(f"--token-file {p} is over {MAX_TOKEN_FILE} bytes: not a token file",
                          field="token_file")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {p} is not text", field="token_file") from None
    if not token:
        raise ConfigError(f"--token-file {p} is empty; write the device token into it",
                          field="token_file")
    return check_token(token, f"--token-file {p}")


def check_token(token: str, source: str) -> str:
    """``token`` if it can go in an HTTP header (one word of printable ASCII), else
    :class:`ConfigError` naming ``source``."""
    if not all(33 <= ord(c) < 127 for c in token):
        raise ConfigError(f"the token from {source} holds spaces, line breaks or non-ASCII "
                          "characters; a device token is one word (hml_...)", field="token")
    return token


def tls_failure(exc: BaseException, host: str, ca_bundle: str | None) -> CloudUnavailableError:
    """The error for a TLS failure talking to ``host``: what failed and what to do."""
    verify, reason = _ssl_reason(exc)
    if verify:
        against = ca_bundle or "the system CAs (certifi or $REQUESTS_CA_BUNDLE)"
        return CloudUnavailableError(
            f"TLS certificate of {host} could not be verified against {against}: {reason}; "
            "pass --ca-bundle PEM_FILE (or $HYBRIDML_CA_BUNDLE) with the CA that signed the "
            "cloud's certificate, or fix the cloud's certificate", host=host)
    return CloudUnavailableError(f"TLS connection to {host} failed: {reason}; check that the "
                                 "cloud serves https on that port", host=host)


def _ssl_reason(exc: BaseException) -> tuple[bool, str]:
    """(a certificate check failed?, why) from the chain requests and urllib3 wrap it in."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    found: ssl.SSLError | None = None
    while todo and len(seen) < 32:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return True, str(e.verify_message or e.reason or e).rstrip(".")
        if isinstance(e, ssl.SSLError) and found is None:
            found = e
        nested = [*e.args, e.__cause__, e.__context__, getattr(e, "reason", None)]
        todo.extend(n for n in nested if isinstance(n, BaseException))
    if found is not None:
        return False, str(found.reason or found)
    return False, str(exc)[:200] or type(exc).__name__


__all__ = ["check_cloud_url", "check_token", "cloud_urls", "read_token_file", "resolve_ca_bundle",
           "tls_failure"]
