"""Where the cloud keeps its state: the backend URLs every command takes (docs/storage.md §1).

``Storage`` holds the metadata database URL and the artifact store URL (with the S3 endpoint
and how devices get direct artifact URLs). ``None`` means the embedded default: SQLite files and
a blob directory under the registry root. The scheme of a URL picks the backend; a backend's
library (psycopg, boto3) is imported only by the code that opens it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

from hybridml.shared.errors import ConfigError

DB_ENV = "HYBRIDML_DB"
ARTIFACTS_ENV = "HYBRIDML_ARTIFACTS"
S3_ENDPOINT_ENV = "HYBRIDML_S3_ENDPOINT"
URLS_ENV = "HYBRIDML_ARTIFACT_URLS"
EXPIRY_ENV = "HYBRIDML_PRESIGN_EXPIRY_S"
DEFAULT_EXPIRY_S = 3600
MAX_EXPIRY_S = 7 * 24 * 3600  # S3's own limit for a SigV4 presigned URL
DB_SCHEMES = ("postgresql", "postgres", "sqlite")
ARTIFACT_SCHEMES = ("s3", "file")
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class Storage:
    """The cloud's backends; ``Storage()`` is the embedded default."""

    db: str | None = None
    artifacts: str | None = None
    s3_endpoint: str | None = None
    artifact_urls: str = "off"  # "off" | "presign" | "public:<base URL>"
    presign_expiry_s: int = DEFAULT_EXPIRY_S

    def __post_init__(self) -> None:
        check_db_url(self.db)
        check_artifacts_url(self.artifacts)
        if self.s3_endpoint is not None:
            ep = urlsplit(self.s3_endpoint)
            if ep.scheme not in ("http", "https") or not ep.hostname:
                raise ConfigError(f"S3 endpoint {self.s3_endpoint!r} must be an http(s) URL, "
                                  "e.g. http://127.0.0.1:8333", field="s3_endpoint")
        mode = self.artifact_urls
        if mode not in ("off", "presign") and not mode.startswith("public:"):
            raise ConfigError(f"artifact URLs {mode!r}: use 'off', 'presign' or "
                              "'public:https://cdn.example.com/models'", field="artifact_urls")
        if mode.startswith("public:"):
            base = urlsplit(mode[len("public:"):])
            if base.scheme not in ("http", "https") or not base.hostname:
                raise ConfigError(f"public artifact base {mode[7:]!r} must be an http(s) URL",
                                  field="artifact_urls")
        if mode == "presign" and not self.on_s3:
            raise ConfigError("presigned artifact URLs need an S3 artifact store: pass "
                              "--artifacts s3://bucket/prefix, or use public:<base URL>",
                              field="artifact_urls")
        if isinstance(self.presign_expiry_s, bool) or not (
                60 <= self.presign_expiry_s <= MAX_EXPIRY_S):
            raise ConfigError(f"presign expiry {self.presign_expiry_s!r}: use 60 to "
                              f"{MAX_EXPIRY_S} seconds", field="presign_expiry_s")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: object) -> Storage:
        """The backends named by ``given`` (flags; None means unset), else the environment."""
        env = os.environ if env is None else env
        expiry = given.get("presign_expiry_s") or env.get(EXPIRY_ENV) or DEFAULT_EXPIRY_S
        try:
            expiry_s = int(str(expiry))
        except ValueError:
            raise ConfigError(f"${EXPIRY_ENV}={expiry!r} is not a whole number of seconds",
                              field="presign_expiry_s") from None
        return cls(db=_given(given, "db", env, DB_ENV),
                   artifacts=_given(given, "artifacts", env, ARTIFACTS_ENV),
                   s3_endpoint=_given(given, "s3_endpoint", env, S3_ENDPOINT_ENV),
                   artifact_urls=_given(given, "artifact_urls", env, URLS_ENV) or "off",
                   presign_expiry_s=expiry_s)

    def with_(self, **changes: object) -> Storage:
        """A copy with some fields changed (checked again)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @property
    def on_postgres(self) -> bool:
        """True when the metadata lives in PostgreSQL."""
        return self.db is not None and urlsplit(self.db).scheme in ("postgresql", "postgres")

    @property
    def on_s3(self) -> bool:
        """True when the artifacts live in S3-compatible storage."""
        return self.artifacts is not None and urlsplit(self.artifacts).scheme == "s3"

    @property
    def embedded(self) -> bool:
        """True for the default: nothing outside the registry root."""
        return not self.on_postgres and not self.on_s3

    def describe(self) -> str:
        """One line for logs and ``status``; never shows a password."""
        db = redact(self.db) if self.on_postgres else "sqlite (registry root)"
        arts = self.artifacts or "<root>/blobs"
        ep = f" via {self.s3_endpoint}" if self.on_s3 and self.s3_endpoint else ""
        return f"metadata {db}; artifacts {arts}{ep}; direct URLs {self.artifact_urls}"


def redact(url: str | None) -> str:
    """``url`` with any password replaced by ``***``."""
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def check_db_url(url: str | None) -> None:
    """ConfigError unless ``url`` is None or a database URL this kit opens."""
    if url is None:
        return
    scheme = urlsplit(url).scheme
    if scheme not in DB_SCHEMES:
        raise ConfigError(f"database URL {redact(url)!r}: use postgresql://user@host/db "
                          "(or leave it unset for SQLite under the registry root)", field="db")


def check_artifacts_url(url: str | None) -> None:
    """ConfigError unless ``url`` is None, ``file:///dir`` or ``s3://bucket[/prefix]``."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ARTIFACT_SCHEMES:
        raise ConfigError(f"artifact store {url!r}: use s3://bucket/prefix or file:///dir "
                          "(or leave it unset for <registry>/blobs)", field="artifacts")
    if parts.scheme == "s3" and not _BUCKET_RE.fullmatch(parts.netloc or ""):
        raise ConfigError(f"artifact store {url!r}: {parts.netloc!r} is not a bucket name "
                          "(3-63 lowercase letters, digits, '.' or '-')", field="artifacts")
    if parts.scheme == "file" and not parts.path.startswith("/"):
        raise ConfigError(f"artifact store {url!r}: a file URL needs an absolute path, "
                          "file:///srv/blobs", field="artifacts")


def _given(given: Mapping[str, object], key: str, env: Mapping[str, str], var: str
           ) -> str | None:
    value = given.get(key)
    if value is None:
        value = env.get(var) or None
    return None if value is None else str(value)
