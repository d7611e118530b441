"""HTTP client for the cloud API v1, as the edge uses it.

Connection problems become :class:`CloudUnavailableError`, time-outs :class:`CloudTimeoutError`,
and JSON error bodies are rebuilt into the error class the cloud raised.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from hybridml.shared.errors import (
    ArtifactError,
    CloudTimeoutError,
    CloudUnavailableError,
    HybridMLError,
    RemoteError,
)

log = logging.getLogger("hybridml.edge.client")

CHUNK = 1 << 16
DEFAULT_TIMEOUT = (3.05, 30.0)


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

        Returns the number of bytes received on the wire for the body.
        """
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        resp = self._request("GET", f"/v1/artifacts/{sha256}", headers=headers, stream=True)
        with resp:
            if resp.status_code == 416:  # our part is stale or complete: start over
                dest.unlink(missing_ok=True)
                return self.download(sha256, dest, size)
            if have and resp.status_code != 206:
                have = 0  # the server ignored the Range header: rewrite from the start
            mode = "ab" if have else "wb"
            received = 0
            try:
                with open(dest, mode) as fh:
                    for block in resp.iter_content(CHUNK):
                        fh.write(block)
                        received += len(block)
                        if have + received > size:
                            raise ArtifactError(
                                f"artifact {sha256[:12]} is longer than the manifest's "
                                f"{size} bytes", sha256=sha256)
                    fh.flush()
                    os.fsync(fh.fileno())
            except requests.RequestException as exc:
                raise CloudUnavailableError(
                    f"download of {sha256[:12]} broke off after {have + received} of {size} "
                    "bytes; the next sync resumes it") from exc
        return received

    def predict(self, name: str, rows: Sequence[Mapping[str, Any] | Sequence[Any]],
                timeout_s: float) -> dict[str, Any]:
        """POST rows (objects by column name, or lists in schema order) for prediction."""
        body = json.dumps({"inputs": [
            {k: _json_safe(v) for k, v in r.items()} if isinstance(r, Mapping)
            else [_json_safe(v) for v in r] for r in rows]})
        resp = self._request("POST", f"/v1/models/{name}/predict", data=body,
                             headers={"Content-Type": "application/json"},
                             timeout=(timeout_s, timeout_s))
        try:
            data = resp.json()
        except ValueError as exc:
            raise RemoteError("the cloud's prediction answer is not JSON") from exc
        if not isinstance(data, dict) or "predictions" not in data:
            raise RemoteError("the cloud's prediction answer has no 'predictions'")
        return data

    def healthy(self, timeout_s: float = 1.0) -> bool:
        """True if ``/healthz`` answers 200 within ``timeout_s``."""
        try:
            return self._request("GET", "/healthz", timeout=timeout_s).status_code == 200
        except HybridMLError:
            return False


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v
