"""HTTP client for the cloud API v1, as the edge uses it.

Connection problems become :class:`CloudUnavailableError`, time-outs :class:`CloudTimeoutError`,
and JSON error bodies are rebuilt into the error class the cloud raised.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import requests
import urllib3

from hybridml.shared.errors import (
    ArtifactError,
    CloudTimeoutError,
    CloudUnavailableError,
    HybridMLError,
    InputError,
    IntegrityError,
    RemoteError,
)
from hybridml.shared.files import crash_point

log = logging.getLogger("hybridml.edge.client")

CHUNK = 1 << 16
DEFAULT_TIMEOUT = (3.05, 30.0)
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
T = TypeVar("T")


@dataclass(frozen=True)
class ManifestResponse:
    """A manifest fetch: ``body`` is None when the cloud answered 304 Not Modified."""

    body: bytes | None
    etag: str | None
    wire_bytes: int


class CloudClient:
    """Talks to one cloud endpoint; keeps a connection pool across calls."""

    def __init__(self, base_url: str, token: str | None = None,
                 device: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.device = device or os.environ.get("HYBRIDML_DEVICE_ID")
        self._http = requests.Session()
        self._http.headers["User-Agent"] = "hybridml-edge/0.1"
        token = token or os.environ.get("HYBRIDML_TOKEN")
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()

    def _request(self, method: str, path: str, *, timeout: Any = DEFAULT_TIMEOUT,
                 **kwargs: Any) -> requests.Response:
        url = self.base_url + path
        try:
            resp = self._http.request(method, url, timeout=timeout, **kwargs)
        except requests.Timeout as exc:
            raise CloudTimeoutError(f"the cloud at {self.base_url} did not answer in time "
                                    f"({method} {path})") from exc
        except requests.RequestException as exc:
            raise CloudUnavailableError(f"cannot reach the cloud at {self.base_url}: "
                                        f"{type(exc).__name__}") from exc
        if resp.status_code >= 400 and resp.status_code != 416:
            try:
                payload = resp.json()
            except ValueError:
                payload = None
            err = HybridMLError.from_json(payload, resp.status_code)
            if resp.status_code >= 500 and isinstance(err, RemoteError):
                raise CloudUnavailableError(
                    f"the cloud answered HTTP {resp.status_code} to {method} {path}: "
                    f"{err.message}")
            raise err
        return resp

    def manifest(self, name: str, etag: str | None = None) -> ManifestResponse:
        """GET the manifest of ``name``; conditional on ``etag``."""
        headers = {"If-None-Match": etag} if etag else {}
        params = {"device": self.device} if self.device else None
        resp = self._request("GET", f"/v1/models/{name}/manifest", headers=headers,
                             params=params)
        wire = len(resp.content) + sum(len(k) + len(v) + 4 for k, v in resp.headers.items())
        if resp.status_code == 304:
            return ManifestResponse(None, etag, wire)
        return ManifestResponse(resp.content, resp.headers.get("ETag"), wire)

    def download(self, sha256: str, dest: Path, size: int) -> int:
        """Fetch an artifact into ``dest`` (a ``.part`` file), resuming what is there.

        A fresh download accepts gzip (the cloud compresses large artifacts; the body is
        decoded as it arrives, so ``dest`` always holds the artifact's own bytes). A resumed
        download asks for ``Range: bytes=N-`` with ``Accept-Encoding: identity``, so the range
        counts those same bytes. A connection cut keeps ``dest`` for the next resume; bytes that do
        not fit the manifest (too long, an undecodable stream, a wrong ``Content-Range``) and
        a full disk remove it. Returns the number of body bytes received.
        """
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return 0
        headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {}
        resp = self._request("GET", f"/v1/artifacts/{sha256}", headers=headers, stream=True)
        with resp:
            if resp.status_code == 416:  # our part is stale or complete: start over
                dest.unlink(missing_ok=True)
                return self.download(sha256, dest, size)
            if have and resp.status_code == 206:
                _check_content_range(resp, sha256, have, size, dest)
            elif have:
                have = 0  # the server ignored the Range header: rewrite from the start
            return self._write_body(resp, sha256, dest, have, size)

    def _write_body(self, resp: requests.Response, sha256: str, dest: Path, have: int,
                    size: int) -> int:
        received = 0
        try:
            with open(dest, "ab" if have else "wb") as fh:
                for block in _body_blocks(resp):
                    if have + received + len(block) > size:
                        raise IntegrityError(
                            f"artifact {sha256[:12]} is longer than the manifest's {size} "
                            "bytes; the cloud serves a different file — not installed",
                            sha256=sha256)
                    fh.write(block)
                    received += len(block)
                    crash_point("mid_download")
                fh.flush()
                os.fsync(fh.fileno())
        except IntegrityError:
            dest.unlink(missing_ok=True)
            raise
        except (requests.exceptions.ContentDecodingError, urllib3.exceptions.DecodeError) as exc:
            dest.unlink(missing_ok=True)  # decoded bytes before the damage are suspect too
            raise IntegrityError(
                f"artifact {sha256[:12]} arrived as a corrupted gzip stream; dropped the "
                "partial file, the next sync fetches it again", sha256=sha256) from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise CloudUnavailableError(
                f"download of {sha256[:12]} broke off after {have + received} of {size} "
                "bytes; the next sync resumes it") from exc
        except OSError as exc:
            dest.unlink(missing_ok=True)  # a partial file on a full disk only blocks others
            what = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                else f"cannot write it ({exc.strerror})"
            raise ArtifactError(
                f"download of {sha256[:12]} ({size:,} bytes) failed: {what} at "
                f"{dest.parent}; check that store's free space and permissions, then sync "
                "again", sha256=sha256,
                errno=exc.errno) from exc
        return received

    def predict(self, name: str, rows: Sequence[Mapping[str, Any] | Sequence[Any]],
                timeout_s: float) -> dict[str, Any]:
        """POST rows (objects by column name, or lists in schema order) for prediction.

        The whole call — DNS, connect, a server that trickles its answer — ends within
        ``timeout_s`` (:class:`CloudTimeoutError`); ``requests`` alone only bounds each
        socket read, so a slow-dripping cloud could otherwise hold a prediction for minutes.
        """
        try:
            body = json.dumps({"inputs": [
                {k: _json_safe(v) for k, v in r.items()} if isinstance(r, Mapping)
                else [_json_safe(v) for v in r] for r in rows]})
        except (TypeError, ValueError) as exc:  # bytes, sets...: nothing the cloud could read
            raise InputError(f"a row holds a value JSON cannot carry ({exc}); send numbers, "
                             "strings or null", field="inputs") from None
        deadline = time.monotonic() + timeout_s

        def call() -> dict[str, Any]:
            resp = self._request("POST", f"/v1/models/{name}/predict", data=body,
                                 headers={"Content-Type": "application/json"},
                                 timeout=(timeout_s, timeout_s), stream=True)
            with resp:
                raw = _read_before(resp, deadline, f"POST /v1/models/{name}/predict")
            try:
                data = json.loads(raw)
            except ValueError as exc:
                raise RemoteError("the cloud's prediction answer is not JSON") from exc
            if not isinstance(data, dict) or "predictions" not in data:
                raise RemoteError("the cloud's prediction answer has no 'predictions'")
            return data

        return _within(call, timeout_s, f"the cloud at {self.base_url} did not answer the "
                                        f"prediction within {timeout_s:g} s")

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True if ``/healthz`` answers 200 within ``timeout_s``."""
        try:
            return _within(lambda: self._request("GET", "/healthz", timeout=timeout_s),
                           timeout_s, "health check timed out").status_code == 200
        except HybridMLError:
            return False


def _within(fn: Callable[[], T], timeout_s: float, message: str) -> T:
    """Run ``fn`` in a daemon thread; raise :class:`CloudTimeoutError` after ``timeout_s``.

    A call still blocked at the deadline is abandoned: its thread ends at the next socket
    time-out and its answer is dropped. Daemon threads never hold up process exit.
    """
    box: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            box.append((True, fn()))
        except BaseException as exc:  # handed to the caller below
            box.append((False, exc))

    worker = threading.Thread(target=run, name="hybridml-cloud-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not box:
        raise CloudTimeoutError(message)
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _read_before(resp: requests.Response, deadline: float, what: str) -> bytes:
    """Read a streamed body, giving up at ``deadline`` (a trickling server cannot hold us)."""
    parts: list[bytes] = []
    try:
        for block in resp.iter_content(8192):
            parts.append(block)
            if time.monotonic() > deadline:
                raise CloudTimeoutError(f"the cloud's answer to {what} arrived too slowly")
    except requests.RequestException as exc:
        raise CloudUnavailableError(f"the cloud's answer to {what} broke off: "
                                    f"{type(exc).__name__}") from exc
    return b"".join(parts)


def _body_blocks(resp: requests.Response) -> Iterator[bytes]:
    """The decoded body in blocks of at most :data:`CHUNK`, handed over as they arrive.

    ``read1`` returns whatever the socket and the gzip decoder hold instead of waiting for a
    full chunk, so when the connection breaks every byte received so far is already written:
    a resumed download fetches again at most the bytes in flight, never a lost chunk of
    decoded data (with ``iter_content`` a cut gzip stream lost up to a chunk of compressed
    input, which can decode to many chunks). urllib3 < 2.3 has no ``read1``: use iter_content.
    """
    raw = resp.raw
    if not hasattr(raw, "read1"):
        yield from resp.iter_content(CHUNK)
        return
    while block := raw.read1(CHUNK, decode_content=True):
        yield block


def _check_content_range(resp: requests.Response, sha256: str, have: int, size: int,
                         dest: Path) -> None:
    """A 206 must continue exactly where our ``.part`` ends, for the promised size."""
    m = CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
    if m is None or int(m.group(1)) != have or m.group(3) not in ("*", str(size)):
        dest.unlink(missing_ok=True)
        raise IntegrityError(
            f"resuming artifact {sha256[:12]} at byte {have}, the cloud answered "
            f"Content-Range {resp.headers.get('Content-Range')!r} (expected 'bytes "
            f"{have}-{size - 1}/{size}'); dropped the partial file, the next sync starts over",
            sha256=sha256)


def _json_safe(v: Any) -> Any:
    """A cell as JSON can carry it: numpy scalars as Python values, NaN as null (missing).

    Infinities also become null here only because JSON cannot hold them; rows sent by the
    fallback were encoded by the schema first, which refuses them.
    """
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
