"""A keep-alive connection the server closed while it sat in the pool (its idle timeout) is
sent on once more, on a fresh connection; a refused connection is not retried this way."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from hybridml.edge.client import CloudClient
from hybridml.shared.errors import CloudUnavailableError

BODY = b'{"accepted": [], "duplicates": [], "refused": []}'
ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
          b"Content-Length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)


@pytest.fixture
def closing_server() -> Iterator[tuple[str, list[int]]]:
    """Answers the first request of each connection; the next one on it is read and the
    connection closed unanswered: the race of a server's keep-alive timeout firing just as a
    pooled connection is reused."""
    sock = socket.create_server(("127.0.0.1", 0))
    served: list[int] = []

    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                for answer in (True, False):
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                    if not data:
                        break
                    if answer:  # counted before the client can read the answer
                        served.append(1)
                        conn.sendall(ANSWER)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", served
    sock.close()


def test_a_request_on_a_connection_the_server_dropped_is_sent_again(
        closing_server: tuple[str, list[int]]) -> None:
    url, served = closing_server
    client = CloudClient(url)
    for _ in range(3):  # the 2nd and 3rd go out on the pooled, closed connection first
        assert client.telemetry([])["accepted"] == []
    assert len(served) == 3
    client.close()


def test_a_refused_connection_is_not_retried_on_the_same_url() -> None:
    sock = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()
    with pytest.raises(CloudUnavailableError):
        CloudClient(url).telemetry([])
