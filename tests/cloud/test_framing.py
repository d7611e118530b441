"""Request framing (hybridml.cloud.framing): where a request ends, found byte by byte."""

from __future__ import annotations

import pytest

from hybridml.cloud import framing
from hybridml.cloud.framing import BAD, HEAD_TOO_LARGE, MORE, READY, TOO_LARGE, Framing

POST = b"POST /p HTTP/1.1\r\nHost: x\r\n"


def fed_one_byte_at_a_time(raw: bytes, max_head: int = 1000, max_body: int = 100
                           ) -> tuple[int, int, int]:
    """(verdict, end, bytes fed when the verdict came)."""
    f = Framing(max_head, max_body)
    for n in range(1, len(raw) + 1):
        verdict = f.scan(raw[:n])
        if verdict != MORE:
            return verdict, f.end, n
    return MORE, f.end, len(raw)


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    POST + b"Content-Length: 5\r\n\r\nhello",
    POST + b"Content-Length: 005\r\n\r\nhello",
    POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n2;x=y\r\nab\r\n0\r\n\r\n",
    POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\nX-Sum: 1\r\n\r\n",
])
def test_a_whole_request_is_ready_exactly_where_it_ends(request_bytes: bytes) -> None:
    raw = request_bytes + b"GET /pipelined"
    # Not a byte earlier, nor later; what follows is the next request.
    assert fed_one_byte_at_a_time(raw) == (READY, len(request_bytes), len(request_bytes))


@pytest.mark.parametrize("raw", [
    POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\n",  # two lengths
    POST + b"Content-Length: +5\r\n\r\n",  # not digits
    POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",  # both
    POST + b"Transfer-Encoding: gzip\r\n\r\n",  # no chunked
    b"POST /p HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",  # chunked in HTTP/1.0
])
def test_a_head_that_gunicorn_refuses_is_handed_on_at_once_without_its_body(raw: bytes) -> None:
    # gunicorn answers 400 from the head alone: no thread waits for a body.
    assert fed_one_byte_at_a_time(raw) == (READY, len(raw), len(raw))


@pytest.mark.parametrize(("raw", "verdict"), [
    (POST + b"Content-Length: 101\r\n\r\n", TOO_LARGE),
    (POST + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n", TOO_LARGE),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n60\r\n" + b"a" * 96 + b"\r\n10\r\n", TOO_LARGE),
    (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", BAD),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\nabXY", BAD),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 2000, HEAD_TOO_LARGE),
])
def test_limits_and_malformed_chunks_are_refused_before_the_whole_body(raw: bytes,
                                                                       verdict: int) -> None:
    assert fed_one_byte_at_a_time(raw, max_head=6000)[0] == verdict


def test_expect_100_continue_is_noted_while_the_body_has_not_come() -> None:
    f = Framing(1000, 100)
    head = POST + b"Content-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    assert f.scan(head) == MORE and f.expects_continue
    assert f.scan(head + b"hello") == READY
    assert framing.CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"
