"""Where an HTTP/1.x request ends, found as its bytes arrive (RFC 9112 §6).

:class:`Framing` lets the worker's front (:mod:`hybridml.cloud.front`) buffer a whole request
before a thread sees it. It follows gunicorn's own framing rules: a ``Transfer-Encoding``
with ``chunked`` frames the body in chunks, else ``Content-Length``, else there is no body.

The rule that keeps threads free: when :meth:`Framing.scan` says :data:`READY`, gunicorn's
parser needs no byte beyond the buffer. A head whose framing gunicorn refuses (two lengths,
a length that is not digits, a length with chunked, a coding without chunked) is handed on
as soon as the head is in: gunicorn answers 400 from the head alone. A malformed chunk is
refused here (:data:`BAD`), since gunicorn would notice it only while reading the body.
"""

from __future__ import annotations

MORE = 0  # the request is not complete yet
READY = 1  # the request ends at Framing.end
TOO_LARGE = 2  # the body is over the limit: 413
HEAD_TOO_LARGE = 3  # the head (or the chunked trailers) is over the limit: 431
BAD = 4  # the chunked framing is malformed: 400

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEX = frozenset(b"0123456789abcdefABCDEF")
_CHUNK_LINE_MAX = 8190  # gunicorn's limit on a header field, and so on a chunk-size line


class Framing:
    """The framing of one request at the start of a growing buffer.

    Call :meth:`scan` with the whole buffer each time bytes are added; it resumes where it
    stopped, so a body that comes a byte at a time costs no rescans. ``expects_continue``
    is set once the head asks for ``100 Continue`` before a body that has not come.
    """

    __slots__ = ("_body", "_chunked", "_need", "_pos", "_trailers", "end",
                 "expects_continue", "head_end", "max_body", "max_head")

    def __init__(self, max_head: int, max_body: int) -> None:
        self.max_head, self.max_body = max_head, max_body
        self.head_end = -1  # index just past the blank line that ends the head
        self.end = -1  # index just past the request, once READY
        self.expects_continue = False
        self._chunked = False
        self._pos = 0  # where scanning resumes: in the head, or at a chunk-size line
        self._need = 0  # scan again only once the buffer holds this many bytes
        self._body = 0  # chunked: body bytes in the chunks passed
        self._trailers = False  # chunked: the last chunk is passed, the trailers are next

    def scan(self, buf: bytes | bytearray) -> int:
        """:data:`MORE`, :data:`READY` (``end`` set), or a refusal of the request in ``buf``."""
        if len(buf) < self._need:
            return MORE
        if self.head_end < 0:
            verdict = self._head(buf)
            if verdict != READY or not self._chunked:
                return verdict
        elif not self._chunked:
            return self._ready(self._need)  # the Content-Length body is in
        return self._chunks(buf)

    def _head(self, buf: bytes | bytearray) -> int:
        i = buf.find(b"\r\n\r\n", max(0, self._pos - 3))
        if i < 0:
            self._pos = len(buf)
            return HEAD_TOO_LARGE if len(buf) > self.max_head else MORE
        if i + 4 > self.max_head:
            return HEAD_TOO_LARGE
        self.head_end = self._pos = i + 4
        lines = bytes(buf[:i]).split(b"\r\n")
        lengths: list[bytes] = []
        codings: list[bytes] = []
        expect = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # gunicorn refuses the head
            name = name.lower()
            if name == b"content-length":
                lengths.append(value.strip(b" \t"))
            elif name == b"transfer-encoding":
                codings += (c.strip(b" \t").lower() for c in value.split(b","))
            elif name == b"expect":
                expect = value.strip(b" \t").lower() == b"100-continue"
        http11 = lines[0].endswith(b" HTTP/1.1")
        if b"chunked" in codings and http11 and not lengths:
            self._chunked = True
            self.expects_continue = expect
            return READY  # the head is done; scan() goes on to the chunks
        if codings or len(lengths) > 1 or (lengths and not lengths[0].isdigit()):
            return self._ready(self.head_end)  # gunicorn answers 400 from the head alone
        digits = lengths[0].lstrip(b"0") if lengths else b""
        if len(digits) > 18:  # past any limit, and past int()'s 4300 digits
            return TOO_LARGE
        size = int(digits or b"0")
        if size > self.max_body:
            return TOO_LARGE
        self.expects_continue = expect and http11 and size > 0
        return self._ready(self.head_end + size) if len(buf) >= self.head_end + size \
            else self._wait(self.head_end + size)

    def _chunks(self, buf: bytes | bytearray) -> int:
        pos = self._pos
        while not self._trailers:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return BAD if len(buf) - pos > _CHUNK_LINE_MAX else self._at(pos, MORE)
            size_text = bytes(buf[pos:eol].split(b";", 1)[0].rstrip(b" \t"))
            if not size_text or not _HEX.issuperset(size_text):
                return BAD
            digits = size_text.lstrip(b"0")
            if len(digits) > 15:
                return TOO_LARGE
            size = int(digits or b"0", 16)
            if size == 0:
                self._trailers, pos = True, eol + 2
                break
            if self._body + size > self.max_body:
                return TOO_LARGE
            if len(buf) < eol + 2 + size + 2:
                self._pos = pos
                return self._wait(eol + 2 + size + 2)
            if buf[eol + 2 + size:eol + 4 + size] != b"\r\n":
                return BAD
            self._body += size
            pos = eol + 4 + size
        # Trailers: none (a blank line), or header lines up to a blank line.
        if len(buf) - pos < 2:
            return self._at(pos, MORE)
        if buf[pos:pos + 2] == b"\r\n":
            return self._ready(pos + 2)
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return HEAD_TOO_LARGE if len(buf) - pos > self.max_head else self._at(pos, MORE)
        return self._ready(end + 4)

    def _at(self, pos: int, verdict: int) -> int:
        self._pos = pos
        return verdict

    def _wait(self, need: int) -> int:
        self._need = need
        return MORE

    def _ready(self, end: int) -> int:
        self.end = end
        return READY
