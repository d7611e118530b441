"""The socket a request thread writes responses to: it sends what the peer takes at once and
keeps the rest for the worker's main thread, so a client that reads slowly holds no thread.

:class:`WriteBehind` stands in for the connection's socket in gunicorn's response code
(``sendall``, ``sendfile``, ``send``); :class:`hybridml.cloud.front.Front` finishes sending
what it holds when the socket is writable (:meth:`WriteBehind.flush`).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import time
from collections import deque
from typing import Any

from . import framing

_DONTWAIT = socket.MSG_DONTWAIT
# A response a thread could not send at once is held in memory up to this size; past it the
# thread waits for the peer (at most send_timeout_s without progress). Files go by sendfile
# and are not counted: the main thread keeps a descriptor, not the bytes.
WRITE_BEHIND_LIMIT = 1024 * 1024
SENDFILE_CHUNK = 1 << 30


class ClientStalled(OSError):
    """The peer took no bytes of a response for ``send_timeout_s``."""


class _FilePart:
    """``count`` bytes of an open file from ``offset``, still to be sent."""

    __slots__ = ("count", "fd", "offset")

    def __init__(self, fd: int, offset: int, count: int) -> None:
        self.fd, self.offset, self.count = fd, offset, count


class WriteBehind:
    """The socket threads write a connection's responses to; sending never waits for the peer.

    What the peer does not take at once is kept, in order, for :meth:`flush` to send later
    from the main thread. Everything else (``fileno``, ``recv``, ``shutdown``...) is the
    socket's own. gunicorn's ``100 Continue`` is dropped: the front answered it (or the body
    was already in) before the request reached a thread.
    """

    __slots__ = ("held", "limit", "queue", "sock", "stall_s", "stalled")

    def __init__(self, sock: socket.socket, stall_s: float,
                 limit: int = WRITE_BEHIND_LIMIT) -> None:
        self.sock = sock
        self.stall_s, self.limit = stall_s, limit
        self.queue: deque[memoryview | _FilePart] = deque()
        self.held = 0  # bytes held in memory (file parts are not counted)
        self.stalled = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def send(self, data: bytes, flags: int = 0) -> int:
        """Like :meth:`sendall`; the count is always all of ``data``."""
        if len(data) != len(framing.CONTINUE) or bytes(data) != framing.CONTINUE:
            self.sendall(data)
        return len(data)

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Send ``data`` now as far as the peer takes it; keep the rest in order."""
        sent = 0
        if not self.queue:
            try:
                sent = self.sock.send(data, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                sent = 0  # the peer's window is full: all of it waits
            if sent == (data.nbytes if isinstance(data, memoryview) else len(data)):
                return  # the usual case: all of it, at once
        view = memoryview(data).cast("B")[sent:]
        if not self.queue:
            while view:
                try:
                    view = view[self.sock.send(view, _DONTWAIT):]
                except (BlockingIOError, InterruptedError):
                    break
            if not view:
                return
        self.queue.append(memoryview(bytes(view)))  # a copy: the caller may reuse its buffer
        self.held += len(view)
        if self.held > self.limit:
            self._wait_below_limit()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """``socket.sendfile`` that sends what fits now and keeps the file for the rest."""
        fd = file.fileno()
        if count is None:
            count = os.fstat(fd).st_size - offset
        part = _FilePart(fd, offset, count)
        if not self.queue:
            self.sock.setblocking(False)  # sendfile(2) has no MSG_DONTWAIT
            try:
                self._send_file(part)
            finally:
                self.sock.setblocking(True)
        if part.count > 0:
            part.fd = os.dup(fd)  # the app closes its file when the response is done
            self.queue.append(part)
        return count

    def flush(self) -> int:
        """Send what is held as far as the peer takes it now (non-blocking socket); the count.

        Raises OSError when the peer is gone.
        """
        sent = 0
        while self.queue:
            part = self.queue[0]
            if isinstance(part, _FilePart):
                n = self._send_file(part)
                if part.count > 0:
                    return sent + n
                os.close(part.fd)
            else:
                try:
                    n = self.sock.send(part, _DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    return sent
                self.held -= n
                if n < len(part):
                    self.queue[0] = part[n:]
                    return sent + n
            sent += n
            self.queue.popleft()
        return sent

    def release(self) -> None:
        """Drop what was not sent (the connection is closing)."""
        for part in self.queue:
            if isinstance(part, _FilePart):
                os.close(part.fd)
        self.queue.clear()
        self.held = 0

    def _send_file(self, part: _FilePart) -> int:
        sent = 0
        while part.count > 0:
            try:
                n = os.sendfile(self.sock.fileno(), part.fd, part.offset,
                                min(part.count, SENDFILE_CHUNK))
            except (BlockingIOError, InterruptedError):
                break
            if n == 0:  # the file is shorter than announced: nothing more to send
                part.count = 0
                break
            part.offset += n
            part.count -= n
            sent += n
        return sent

    def _wait_below_limit(self) -> None:
        # A thread only gets here for a large response that is not a file (a Range of an
        # artifact, say) to a slow reader: it waits as gunicorn would, but never longer than
        # send_timeout_s without progress.
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLOUT)
        deadline = time.monotonic() + self.stall_s
        self.sock.setblocking(False)
        try:
            while self.held > self.limit:
                if self.flush():
                    deadline = time.monotonic() + self.stall_s
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stalled = True
                    raise ClientStalled(errno.ETIMEDOUT, f"the client read nothing for "
                                        f"{self.stall_s:g} s")
                poller.poll(left * 1000)
        finally:
            self.sock.setblocking(True)
