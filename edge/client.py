"""HTTP client for the cloud API v1, as the edge uses it.

Connection problems become :class:`CloudUnavailableError`, time-outs :class:`CloudTimeoutError`,
and JSON error bodies are rebuilt into the error class the cloud raised.

Every body is read by :mod:`hybridml.edge.bodies` — raw, decoded in bounded steps, and only up
to its bound (:class:`BodyLimits`): a manifest 1 MiB, an error body 64 KiB, a prediction answer
in proportion to the rows sent, an artifact its manifest size. Redirects are never followed (a
3xx is a :class:`RemoteError`: a redirect must not carry the device token to another host).
The transport rules — https or loopback, a pinned CA bundle, tokens not on the command line —
are :mod:`hybridml.edge.transport`'s.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
import urllib3

from hybridml.shared.errors import (
    ArtifactError,
    BodyTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
    HybridMLError,
    InputError,
    IntegrityError,
    RemoteError,
)
from hybridml.shared.files import crash_point
from hybridml.shared.manifest import check_name

from .bodies import ACCEPT_ENCODING, CHUNK, BodyLimits, decoded_blocks, read_body
from .transport import (
    check_cloud_url,
    check_token,
    cloud_urls,
    read_token_file,
    resolve_ca_bundle,
    tls_failure,
)

log = logging.getLogger("hybridml.edge.client")

DEFAULT_TIMEOUT = (3.05, 30.0)
DEVICE_HEADER = "Hybridml-Device"  # the store id, on manifest requests
UPLOAD_DEADLINE_S = 120.0  # one telemetry upload (256 KB) answered, however slowly it drips
CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
T = TypeVar("T")


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not JSON")


_JSON = json.JSONDecoder(parse_constant=_not_json)  # strict: no NaN/Infinity literals


@dataclass(frozen=True)
class ManifestResponse:
    """A manifest fetch: ``body`` is None when the cloud answered 304 Not Modified."""

    body: bytes | None
    etag: str | None
    wire_bytes: int


class _Session(requests.Session):
    """A requests session that never follows a redirect, not even to look at it: requests
    reads a 3xx body whole (decoded, unbounded) to prepare the next hop even with
    ``allow_redirects=False``; with no redirect target it reads nothing."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


class CloudClient:
    """Talks to the cloud: one endpoint, or several replicas; keeps a connection pool.

    ``base_url`` is one URL, a comma-separated list (``"https://a,https://b"``) or a sequence
    of URLs (:func:`~hybridml.edge.transport.cloud_urls`). The client keeps a current one
    (:attr:`base_url`); when it cannot answer — no connection, a time-out, TLS failing, any 5xx
    (503 included) — a request goes on to the next, at most once around the list and within
    the caller's deadline, and the client sticks with the replica that answered. A 4xx is an
    answer, never a reason to ask another replica.

    ``token`` (else ``$HYBRIDML_TOKEN``) is sent as a bearer token. ``ca_bundle`` (else
    ``$HYBRIDML_CA_BUNDLE``) pins the CAs the cloud's certificate is checked against;
    ``allow_http`` (else ``HYBRIDML_ALLOW_HTTP=1``) permits ``http://`` to a host other than
    loopback. A URL the rules refuse is a :class:`ConfigError` here, before any connection.
    ``limits`` bounds what is read of each answer (default: :meth:`BodyLimits.from_env`).
    ``store_id`` (:mod:`hybridml.edge.identity`; a sync sets it when it is None) goes with
    each manifest request as ``Hybridml-Device``: a cloud without device tokens assigns the
    device to a rollout's cohort by it (docs/rollouts.md §2).

    :meth:`download` also fetches from a direct artifact URL a manifest names
    (docs/storage.md §3): the same transport rules, through a session that has never held the
    token or any device header.
    """

    def __init__(self, base_url: str | Sequence[str], token: str | None = None,
                 device: str | None = None, *,
                 ca_bundle: str | os.PathLike[str] | None = None, allow_http: bool = False,
                 limits: BodyLimits | None = None, store_id: str | None = None) -> None:
        self.urls = cloud_urls(base_url, allow_http)
        self.allow_http = allow_http
        self._current = 0  # index into urls of the replica that answered last
        self.device = device or os.environ.get("HYBRIDML_DEVICE_ID")
        self.store_id = store_id
        self.ca_bundle = resolve_ca_bundle(ca_bundle)
        self.limits = limits or BodyLimits.from_env()
        # Passed on each request: a session-wide verify loses to $REQUESTS_CA_BUNDLE.
        self._verify: str | bool = self.ca_bundle or True
        self._http = _Session()
        self._http.headers["User-Agent"] = "hybridml-edge/0.1"
        self._http.headers["Accept-Encoding"] = ACCEPT_ENCODING
        # Direct artifact URLs are third parties: a session of their own, without the token.
        self._direct = _Session()
        self._direct.headers["User-Agent"] = "hybridml-edge/0.1"
        self._direct.headers["Accept-Encoding"] = ACCEPT_ENCODING
        source = "the token argument"
        if not token:
            token, source = os.environ.get("HYBRIDML_TOKEN"), "$HYBRIDML_TOKEN"
        token = token.strip() if token else None  # a trailing newline from a file or env file
        if token:
            self._http.headers["Authorization"] = f"Bearer {check_token(token, source)}"

    @property
    def base_url(self) -> str:
        """The cloud URL in use: the replica that answered last (at first, the first one)."""
        return self.urls[self._current]

    @property
    def host(self) -> str:
        """The host name of :attr:`base_url`."""
        return urlsplit(self.base_url).hostname or ""

    def close(self) -> None:
        """Close pooled connections."""
        self._http.close()
        self._direct.close()

    def _request(self, method: str, path: str, *, timeout: Any = DEFAULT_TIMEOUT,
                 cancel: threading.Event | None = None, deadline: float | None = None,
                 **kwargs: Any) -> requests.Response:
        """Send a request to the current replica, failing over (class docstring); the
        response's body is left to read (through :mod:`.bodies`).

        A 3xx (but 304) is a :class:`RemoteError`; a 4xx/5xx (but 416) raises the error its
        bounded JSON body describes (the last replica's, when none could answer)."""
        start, n = self._current, len(self.urls)
        failed: HybridMLError | None = None
        for step in range(n):
            i = (start + step) % n
            if step:  # another replica, only within what the caller allows
                left = None if deadline is None else deadline - time.monotonic()
                if (cancel is not None and cancel.is_set()) or (left is not None and left <= 0):
                    break
                log.warning("the cloud at %s could not answer %s %s (%s); trying %s",
                            self.urls[(i - 1) % n], method, path,
                            failed.message if failed else "?", self.urls[i])
                if left is not None:
                    timeout = _shorter(timeout, left)
            try:
                resp = self._send(self.urls[i], method, path, timeout=timeout, **kwargs)
            except (CloudUnavailableError, CloudTimeoutError) as exc:
                failed = exc
                continue
            status = resp.status_code
            if status >= 400 and status != 416:
                with resp:
                    try:
                        self._raise_error(resp, method, path, cancel, deadline)
                    except HybridMLError as exc:
                        if status < 500:
                            self._stick(i)
                            raise  # an answer: this replica is up and refuses the request
                        failed = exc
                        continue
            self._stick(i)
            return resp
        assert failed is not None
        raise failed

    def _stick(self, i: int) -> None:
        if i != self._current:
            log.warning("now using the cloud at %s", self.urls[i])
            self._current = i

    def _send(self, base: str, method: str, path: str, *, timeout: Any,
              **kwargs: Any) -> requests.Response:
        """One request to the replica at ``base``: the response (any status), a
        :class:`RemoteError` for a redirect, or the transport failure."""
        url = base + path
        try:
            try:
                resp = self._http.request(method, url, timeout=timeout, stream=True,
                                          allow_redirects=False, verify=self._verify, **kwargs)
            except requests.ConnectionError as exc:
                if not _stale_connection(exc):
                    raise
                # A pooled keep-alive connection the server had just closed (its idle
                # timeout): nothing was answered, so send once more on a fresh connection.
                resp = self._http.request(method, url, timeout=timeout, stream=True,
                                          allow_redirects=False, verify=self._verify, **kwargs)
        except requests.exceptions.SSLError as exc:
            raise tls_failure(exc, urlsplit(base).hostname or "", self.ca_bundle) from exc
        except requests.Timeout as exc:
            raise CloudTimeoutError(f"the cloud at {base} did not answer in time "
                                    f"({method} {path})") from exc
        except requests.RequestException as exc:
            raise CloudUnavailableError(f"cannot reach the cloud at {base}: "
                                        f"{type(exc).__name__}") from exc
        status = resp.status_code
        if 300 <= status < 400 and status != 304:
            resp.close()
            location = resp.headers.get("Location", "")
            target = urlsplit(urljoin(url, location)).hostname or location
            raise RemoteError(f"the cloud answered HTTP {status} to {method} {path}, a redirect "
                              f"to {target[:100]!r}; not followed (it would carry this device's "
                              "token there): point --cloud at the final URL", status=status)
        return resp

    def _raise_error(self, resp: requests.Response, method: str, path: str,
                     cancel: threading.Event | None, deadline: float | None) -> None:
        status = resp.status_code
        said = f"the cloud answered HTTP {status} to {method} {path}"
        limit = self.limits.error_bytes
        try:
            raw = read_body(resp, f"the HTTP {status} answer to {method} {path}", limit,
                            cancel=cancel, deadline=deadline)
        except BodyTooLargeError as exc:
            message = f"{said} with an error body over {limit:,} bytes; not parsed"
            if status >= 500:
                raise CloudUnavailableError(message) from exc
            raise BodyTooLargeError(message, limit=limit) from exc
        try:
            payload = _JSON.decode(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            payload = None
        err = HybridMLError.from_json(payload, status)
        if status >= 500 and isinstance(err, RemoteError):
            raise CloudUnavailableError(f"{said}: {err.message}")
        raise err

    def manifest(self, name: str, etag: str | None = None, *, alias: str | None = None
                 ) -> ManifestResponse:
        """GET the manifest of ``name`` (for ``alias``, default the cloud's ``stable``);
        conditional on ``etag``. At most ``limits.manifest_bytes`` decoded bytes
        (:class:`BodyTooLargeError`)."""
        headers = {"If-None-Match": etag} if etag else {}
        if self.store_id:
            headers[DEVICE_HEADER] = self.store_id
        params = {"device": self.device} if self.device else {}
        if alias is not None:
            params["alias"] = alias
        resp = self._request("GET", f"/v1/models/{name}/manifest", headers=headers,
                             params=params)
        with resp:
            body = read_body(resp, f"the manifest of {name!r}", self.limits.manifest_bytes)
        wire = len(body) + sum(len(k) + len(v) + 4 for k, v in resp.headers.items())
        if resp.status_code == 304:
            return ManifestResponse(None, etag, wire)
        return ManifestResponse(body, resp.headers.get("ETag"), wire)

    def download(self, sha256: str, dest: Path, size: int, *, source: str | None = None,
                 cancel: threading.Event | None = None) -> int:
        """Fetch an artifact into ``dest`` (a ``.part`` file), resuming what is there.

        From the cloud's ``/v1/artifacts/<sha256>``, or with ``source`` from that direct URL
        (docs/storage.md §3): checked by the same transport rules (:class:`ConfigError`),
        sent without the token or any device header, never failed over — the caller decides
        to take the artifact from the cloud instead. Either way the same code reads the body:

        A fresh download accepts gzip (the cloud compresses large artifacts; the body is
        decoded as it arrives, in bounded steps, so ``dest`` always holds the artifact's own
        bytes). A resumed download asks for ``Range: bytes=N-`` with ``Accept-Encoding:
        identity``, so the range counts those same bytes. A connection cut keeps ``dest`` for
        the next resume; bytes that do not fit the manifest (too long, an undecodable stream, a
        wrong ``Content-Range``) and a full disk remove it. Returns the number of body bytes
        received.

        ``cancel`` (the agent's stop event, set by SIGTERM) abandons the download between two
        blocks as a cut connection would: :class:`CloudUnavailableError`, ``dest`` kept for
        the resume.
        """
        if source is None:
            path = f"/v1/artifacts/{sha256}"

            def get(headers: dict[str, str]) -> requests.Response:
                return self._request("GET", path, headers=headers)
        else:
            host = check_cloud_url(source, self.allow_http, what="artifact source",
                                   field="sources").hostname or ""

            def get(headers: dict[str, str]) -> requests.Response:
                return self._get_direct(source, host, headers)
        return self._download(get, sha256, dest, size, cancel)

    def _download(self, get: Callable[[dict[str, str]], requests.Response], sha256: str,
                  dest: Path, size: int, cancel: threading.Event | None = None) -> int:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return 0
        if cancel is not None and cancel.is_set():
            raise _stopped(sha256, have, size)
        headers = {"Range": f"bytes={have}-", "Accept-Encoding": "identity"} if have else {}
        resp = get(headers)
        with resp:
            if resp.status_code == 416:  # our part is stale or complete: start over
                dest.unlink(missing_ok=True)
                return self._download(get, sha256, dest, size, cancel)
            if have and resp.status_code == 206:
                _check_content_range(resp, sha256, have, size, dest)
            elif have:
                have = 0  # the server ignored the Range header: rewrite from the start
            return self._write_body(resp, sha256, dest, have, size, cancel)

    def _get_direct(self, url: str, host: str, headers: dict[str, str]) -> requests.Response:
        """GET a direct artifact URL: 200, 206 or 416, else :class:`RemoteError`; transport
        failures as the cloud's. The URL may hold a signature: messages name its host only."""
        try:
            resp = self._direct.get(url, headers=headers, timeout=DEFAULT_TIMEOUT, stream=True,
                                    allow_redirects=False, verify=self._verify)
        except requests.exceptions.SSLError as exc:
            raise tls_failure(exc, host, self.ca_bundle) from exc
        except requests.Timeout as exc:
            raise CloudTimeoutError(f"the artifact source {host} did not answer in time") \
                from exc
        except requests.RequestException as exc:
            raise CloudUnavailableError(f"cannot reach the artifact source {host}: "
                                        f"{type(exc).__name__}") from exc
        if resp.status_code not in (200, 206, 416):
            resp.close()
            raise RemoteError(f"the artifact source {host} answered HTTP {resp.status_code}",
                              status=resp.status_code)
        return resp

    def _write_body(self, resp: requests.Response, sha256: str, dest: Path, have: int,
                    size: int, cancel: threading.Event | None = None) -> int:
        received = 0

        def corrupt(reason: str) -> HybridMLError:
            return IntegrityError(
                f"artifact {sha256[:12]} arrived as a corrupted stream ({reason}); dropped the "
                "partial file, the next sync fetches it again", sha256=sha256)

        try:
            with open(dest, "ab" if have else "wb") as fh:
                for block in decoded_blocks(resp, f"artifact {sha256[:12]}", corrupt=corrupt,
                                            cancel=cancel):
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
            dest.unlink(missing_ok=True)  # decoded bytes before the damage are suspect too
            raise
        except (CloudUnavailableError, CloudTimeoutError) as exc:
            if cancel is not None and cancel.is_set():
                raise _stopped(sha256, have + received, size) from exc
            raise CloudUnavailableError(
                f"download of {sha256[:12]} broke off after {have + received} of {size} "
                f"bytes ({exc.message}); the next sync resumes it") from exc
        except RemoteError:  # an encoding this device does not read: nothing to resume
            dest.unlink(missing_ok=True)
            raise
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
                timeout_s: float, *, version: int | None = None,
                max_bytes: int | None = None) -> dict[str, Any]:
        """POST rows (objects by column name, or lists in schema order) for prediction.

        ``version`` pins the model version that answers (default: the cloud's stable one).
        The answer may be at most ``max_bytes`` decoded bytes (default: ``limits.answer_bytes``
        plus ``limits.row_bytes`` per row); :class:`BodyTooLargeError` past it. The whole
        call — DNS, connect, a server that trickles its answer — ends within ``timeout_s``
        (:class:`CloudTimeoutError`); ``requests`` alone only bounds each socket read, so a
        slow-dripping cloud could otherwise hold a prediction for minutes. An abandoned call
        stops reading at its next block and drops the connection.
        """
        payload: dict[str, Any] = {}
        try:
            payload["inputs"] = [
                {k: _json_safe(v) for k, v in r.items()} if isinstance(r, Mapping)
                else [_json_safe(v) for v in r] for r in rows]
            body = json.dumps(payload if version is None else dict(payload, version=version))
        except (TypeError, ValueError) as exc:  # bytes, sets...: nothing the cloud could read
            raise InputError(f"a row holds a value JSON cannot carry ({exc}); send numbers, "
                             "strings or null", field="inputs") from None
        deadline = time.monotonic() + timeout_s
        limit = max_bytes or self.limits.answer_bytes + len(rows) * self.limits.row_bytes
        path = f"/v1/models/{name}/predict"

        late = (f"the cloud at {self.base_url} did not answer the prediction within "
                f"{timeout_s:g} s")

        def call(cancel: threading.Event) -> dict[str, Any]:
            try:
                resp = self._request("POST", path, data=body,
                                     headers={"Content-Type": "application/json"},
                                     timeout=(timeout_s, timeout_s), cancel=cancel,
                                     deadline=deadline)
                with resp:
                    raw = read_body(resp, f"the answer to POST {path}", limit, cancel=cancel,
                                    deadline=deadline)
            except CloudTimeoutError as exc:
                if time.monotonic() < deadline:
                    raise  # a socket read timed out early, or the call was abandoned
                # The call's own deadline, seen by the reader before the waiting caller: the
                # same error whichever side notices first.
                raise CloudTimeoutError(late) from exc
            try:
                data = _JSON.decode(raw.decode("utf-8"))
            except (ValueError, RecursionError) as exc:
                raise RemoteError("the cloud's prediction answer is not JSON") from exc
            if not isinstance(data, dict) or "predictions" not in data:
                raise RemoteError("the cloud's prediction answer has no 'predictions'")
            return data

        return _within(call, timeout_s, late)

    def telemetry(self, records: Sequence[Mapping[str, Any]],
                  dropped: Mapping[str, int] | None = None) -> dict[str, Any]:
        """POST spool records (and the counts of records dropped since the last report) to
        ``/v1/telemetry``; returns ``{"accepted": [id...], "duplicates": [id...],
        "refused": [{"id", "index", "error", ...}]}`` (docs/monitoring.md §5).

        A batch the cloud refuses whole raises the error it sent (a 4xx:
        :class:`InputError`, :class:`HTTPError`, :class:`AuthError`...); an unreachable or
        failing cloud :class:`CloudUnavailableError`, a slow one :class:`CloudTimeoutError`.
        """
        payload: dict[str, Any] = {"records": list(records)}
        if dropped:
            payload["dropped"] = dict(dropped)
        return self._upload("/v1/telemetry", payload)

    def feedback(self, name: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """POST feedback records of model ``name`` to ``/v1/models/<name>/feedback``; the
        answer and errors are those of :meth:`telemetry`."""
        return self._upload(f"/v1/models/{check_name(name)}/feedback",
                            {"records": list(records)})

    def _upload(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` as JSON and read the ``accepted/duplicates/refused`` answer (at
        most ``limits.error_bytes`` plus 1 KiB per record sent)."""
        try:
            body = json.dumps(payload, separators=(",", ":"), allow_nan=False,
                              ensure_ascii=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise InputError(f"a record holds a value JSON cannot carry ({exc})",
                             field="records") from None
        limit = self.limits.error_bytes + 1024 * len(payload["records"])
        deadline = time.monotonic() + UPLOAD_DEADLINE_S
        resp = self._request("POST", path, data=body, deadline=deadline,
                             headers={"Content-Type": "application/json"})
        with resp:
            raw = read_body(resp, f"the answer to POST {path}", limit, deadline=deadline)
        try:
            data = _JSON.decode(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise RemoteError(f"the cloud's answer to POST {path} is not JSON") from exc
        if not isinstance(data, dict) or not all(
                isinstance(data.get(k), list) for k in ("accepted", "duplicates", "refused")):
            raise RemoteError(f"the cloud's answer to POST {path} has no 'accepted', "
                              "'duplicates' and 'refused' lists; is it an older cloud?")
        return data

    def probe(self, path: str = "/healthz", timeout_s: float = 3.0, *,
              limit: int | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``path`` for a diagnosis (``hybridml-edge doctor``): the status, headers and
        body (at most ``limit``, default ``limits.manifest_bytes``) of the answer, within
        ``timeout_s``; a 4xx/5xx raises the error its body describes (:class:`AuthError` for
        a rejected token), a dead cloud :class:`CloudUnavailableError`, as every call does."""
        deadline = time.monotonic() + timeout_s
        resp = self._request("GET", path, timeout=timeout_s, deadline=deadline)
        with resp:
            body = read_body(resp, f"the answer to GET {path}",
                             limit or self.limits.manifest_bytes, deadline=deadline)
        return resp.status_code, dict(resp.headers), body

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True if ``/healthz`` answers 200 within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s

        def call(cancel: threading.Event) -> int:
            resp = self._request("GET", "/healthz", timeout=timeout_s, cancel=cancel,
                                 deadline=deadline)
            with resp:
                read_body(resp, "the answer to GET /healthz", self.limits.error_bytes,
                          cancel=cancel, deadline=deadline)
            return resp.status_code

        try:
            return _within(call, timeout_s, "health check timed out") == 200
        except HybridMLError:
            return False


def _shorter(timeout: Any, left: float) -> Any:
    """``timeout`` (seconds, or a (connect, read) pair) cut to ``left`` seconds."""
    if isinstance(timeout, tuple):
        return tuple(min(t, left) for t in timeout)
    return left if timeout is None else min(timeout, left)


def _within(fn: Callable[[threading.Event], T], timeout_s: float, message: str) -> T:
    """Run ``fn(cancel)`` in a daemon thread; raise :class:`CloudTimeoutError` after
    ``timeout_s``.

    A call still running at the deadline is abandoned: ``cancel`` is set, so its body reader
    closes the response at its next block (or its socket times out), and its answer is
    dropped. Daemon threads never hold up process exit.
    """
    box: list[tuple[bool, Any]] = []
    cancel = threading.Event()

    def run() -> None:
        try:
            box.append((True, fn(cancel)))
        except BaseException as exc:  # handed to the caller below
            box.append((False, exc))

    worker = threading.Thread(target=run, name="hybridml-cloud-call", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if not box:
        cancel.set()
        raise CloudTimeoutError(message)
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _stopped(sha256: str, have: int, size: int) -> CloudUnavailableError:
    """A download abandoned because the process is stopping (its ``.part`` is kept)."""
    return CloudUnavailableError(f"download of {sha256[:12]} stopped after {have} of {size} "
                                 "bytes: the agent is stopping; the next sync resumes it",
                                 stopped=True)


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


__all__ = ["CHUNK", "DEVICE_HEADER", "CloudClient", "ManifestResponse", "read_token_file"]


def _stale_connection(exc: requests.ConnectionError) -> bool:
    """True when ``exc`` is a reused connection dropped by the server before it answered
    (not a refused, unreachable or timed-out one, which failover handles)."""
    if isinstance(exc, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return False
    cause: BaseException | None = exc
    for _ in range(8):  # requests -> urllib3 -> http.client: a few links at most
        if cause is None or isinstance(cause, urllib3.exceptions.NewConnectionError):
            return False
        if isinstance(cause, (ConnectionResetError, BrokenPipeError,
                              http.client.RemoteDisconnected)):
            return True
        nested = cause.args[-1] if cause.args and isinstance(cause.args[-1], BaseException) \
            else None
        cause = nested or cause.__cause__ or cause.__context__
    return False
