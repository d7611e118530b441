"""Bounded reads of the cloud's answers: every body the edge reads goes through here.

A body is read raw, as it arrives (``read1(decode_content=False)``), and decoded here rather
than by urllib3, whose decoder inflates a whole raw chunk at once: a 1 MB gzip of zeros is
1 GB, and the first release took a device to 2.2 GB of memory on one manifest. Here every
inflate step is ``decompress(data, max_length=CHUNK)`` with the rest of its input kept in
``unconsumed_tail``, so one step never yields more than :data:`CHUNK` bytes, and each decoded
byte counts against the body's bound while it streams. Past the bound the read stops with
:class:`BodyTooLargeError` before anything is parsed.

``Content-Encoding``: identity, gzip (``x-gzip``; several members one after the other) and
deflate (zlib-wrapped, or raw deflate as some servers send it — urllib3 accepts both); anything
else, or two codings stacked, is a :class:`RemoteError` naming it (the client asks only for
gzip and deflate). A compressed stream that does not decode, or ends before its end marker, is
reported through ``corrupt`` (a :class:`RemoteError` unless the caller says otherwise: a
download makes it an :class:`IntegrityError`).

A read also stops when ``cancel`` is set (the caller stopped waiting: the response is closed,
the connection dropped) or when ``deadline`` passes, checked between blocks; a connection that
breaks is :class:`CloudUnavailableError`, a socket time-out :class:`CloudTimeoutError`.
"""

from __future__ import annotations

import http.client
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import requests
import urllib3

from hybridml.shared.errors import (
    BodyTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
    ConfigError,
    HybridMLError,
    RemoteError,
)
from hybridml.shared.settings import load_env

CHUNK = 1 << 16
GZIP_WBITS = 16 + zlib.MAX_WBITS
ACCEPT_ENCODING = "gzip, deflate"  # what Decoder reads; never ask for more
Corrupt = Callable[[str], HybridMLError]


@dataclass(frozen=True)
class BodyLimits:
    """How many decoded bytes the edge reads of each kind of answer (``HYBRIDML_BODY_*``).

    ``answer_bytes`` is the fixed part of a prediction answer; each row sent adds a per-row
    bound (the fallback computes it from the loaded model's class names, else ``row_bytes``).
    """

    manifest_bytes: int = 1 << 20
    error_bytes: int = 64 << 10
    answer_bytes: int = 64 << 10
    row_bytes: int = 4 << 10

    def __post_init__(self) -> None:
        for name in ("manifest_bytes", "error_bytes", "answer_bytes", "row_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 byte, got {getattr(self, name)}",
                                  field=name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> BodyLimits:
        """Read ``HYBRIDML_BODY_<FIELD>`` (e.g. ``HYBRIDML_BODY_MANIFEST_BYTES=2097152``)."""
        return load_env(cls, "HYBRIDML_BODY_", env)


class Decoder:
    """One body's ``Content-Encoding``, undone in steps of at most :data:`CHUNK` bytes.

    ``feed`` raises ``zlib.error`` on a stream that does not decode and ``finish`` on one that
    ended early; :func:`decoded_blocks` turns both into the caller's error.
    """

    __slots__ = ("_fed", "_head", "_obj", "coding")

    def __init__(self, coding: str = "identity") -> None:
        if coding not in ("identity", "gzip", "deflate"):
            raise ValueError(f"no decoder for {coding!r}")
        self.coding = coding
        self._obj = zlib.decompressobj(GZIP_WBITS) if coding == "gzip" else None
        self._head = b""  # deflate: the first bytes, held until the wrapper is known
        self._fed = False

    @classmethod
    def for_header(cls, value: str | None, what: str) -> Decoder:
        """The decoder for a ``Content-Encoding`` header; :class:`RemoteError` if unknown."""
        codings = [c.strip().lower() for c in (value or "").split(",")]
        codings = ["gzip" if c == "x-gzip" else c for c in codings if c and c != "identity"]
        if not codings:
            return cls()
        if len(codings) == 1 and codings[0] in ("gzip", "deflate"):
            return cls(codings[0])
        shown = (value or "")[:80]
        raise RemoteError(f"{what} came with Content-Encoding {shown!r}; this device decodes "
                          f"only gzip or deflate (it asks for '{ACCEPT_ENCODING}'); not read",
                          encoding=shown)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded bytes of ``data`` (the next raw bytes), in blocks of <= CHUNK."""
        if not data:
            return
        if self.coding == "identity":
            for at in range(0, len(data), CHUNK):
                yield data[at:at + CHUNK]
            return
        if self._obj is None:  # deflate: zlib-wrapped or raw? Two bytes tell.
            self._head += data
            if len(self._head) < 2:
                return
            data, self._head = self._head, b""
            self._obj = zlib.decompressobj(zlib.MAX_WBITS if _zlib_header(data)
                                           else -zlib.MAX_WBITS)
        self._fed = True
        yield from self._inflate(data)

    def _inflate(self, data: bytes) -> Iterator[bytes]:
        obj = self._obj
        assert obj is not None
        while True:
            if obj.eof:
                if self.coding != "gzip":
                    raise zlib.error(f"{len(data)} byte(s) after the end of the deflate stream")
                obj = self._obj = zlib.decompressobj(GZIP_WBITS)  # the next gzip member
            out = obj.decompress(data, CHUNK)
            if out:
                yield out
            if obj.eof:
                data = obj.unused_data
                if not data:
                    return
                continue
            data = obj.unconsumed_tail
            # A full block may leave output inside zlib with no input left: ask again.
            if not data and len(out) < CHUNK:
                return

    def finish(self) -> None:
        """Check the stream is complete (``zlib.error`` if it was cut short)."""
        if self._head:
            raise zlib.error("the deflate stream ended after 1 byte")
        if self._fed and self._obj is not None and not self._obj.eof:
            raise zlib.error(f"the {self.coding} stream ended before its end marker")


def _zlib_header(data: bytes) -> bool:
    """True if ``data`` starts with a zlib header (RFC 1950), not raw deflate."""
    cmf, flg = data[0], data[1]
    return cmf & 0x0F == 8 and cmf >> 4 <= 7 and ((cmf << 8) | flg) % 31 == 0


def decoded_blocks(resp: requests.Response, what: str, *, limit: int | None = None,
                   cancel: threading.Event | None = None, deadline: float | None = None,
                   corrupt: Corrupt | None = None) -> Iterator[bytes]:
    """The decoded body of ``resp`` in blocks of at most :data:`CHUNK`, as they arrive.

    ``what`` names the body in messages ("the manifest of 'iris'"). At most ``limit`` decoded
    bytes (:class:`BodyTooLargeError` past it); ``cancel`` and ``deadline`` stop the read
    between blocks. Blocks are handed over as soon as they are decoded, so a caller writing
    them loses nothing decoded when the connection breaks.
    """
    decoder = Decoder.for_header(resp.headers.get("Content-Encoding"), what)
    raw = resp.raw
    read: Callable[[int], bytes] = (
        (lambda n: raw.read1(n, decode_content=False)) if hasattr(raw, "read1")
        else (lambda n: raw.read(n, decode_content=False)))  # urllib3 < 2.3: no read1
    total = wire = 0
    try:
        while True:
            _check_stop(resp, what, cancel, deadline)
            data = read(CHUNK)
            if not data:
                break
            wire += len(data)
            for block in decoder.feed(data):
                total += len(block)
                if limit is not None and total > limit:
                    resp.close()
                    raise BodyTooLargeError(
                        f"{what} grew past its bound of {limit:,} bytes (read {total:,} "
                        f"decoded bytes from {wire:,} on the wire"
                        f"{'' if decoder.coding == 'identity' else ', ' + decoder.coding}); "
                        "stopped reading it: nothing from it was used or installed",
                        limit=limit, read=total, wire=wire)
                yield block
                _check_stop(resp, what, cancel, deadline)
        decoder.finish()
    except zlib.error as exc:
        resp.close()
        reason = f"{what} is not a valid {decoder.coding} stream ({exc})"
        raise (corrupt or _remote)(reason) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise CloudTimeoutError(f"{what} stopped arriving after {total:,} bytes (the socket "
                                "timed out)") from exc
    except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
        raise CloudUnavailableError(f"{what} broke off after {total:,} bytes: "
                                    f"{type(exc).__name__}") from exc


def read_body(resp: requests.Response, what: str, limit: int, *,
              cancel: threading.Event | None = None, deadline: float | None = None) -> bytes:
    """The whole decoded body of ``resp``, at most ``limit`` bytes (see :func:`decoded_blocks`)."""
    return b"".join(decoded_blocks(resp, what, limit=limit, cancel=cancel, deadline=deadline))


def _check_stop(resp: requests.Response, what: str, cancel: threading.Event | None,
                deadline: float | None) -> None:
    if cancel is not None and cancel.is_set():
        resp.close()  # nobody waits for this answer: drop the connection, read no more
        raise CloudTimeoutError(f"{what} was abandoned: the caller stopped waiting")
    if deadline is not None and time.monotonic() > deadline:
        resp.close()
        raise CloudTimeoutError(f"{what} arrived too slowly")


def _remote(reason: str) -> HybridMLError:
    return RemoteError(reason)


__all__ = ["ACCEPT_ENCODING", "CHUNK", "BodyLimits", "Decoder", "decoded_blocks", "read_body"]
