"""Real servers on loopback for the benchmarks: the cloud, the bare floor app, a byte counter,
and a proxy that makes a server slow (in a process of its own, so its threads never compete
with a load generator for the GIL).

Every server runs in its own process group and is stopped by :meth:`stop` (the suites use them
as context managers), so nothing outlives a run. Servers bind port 0 and report the address
they got through a ready file, so no port is picked here and bound later by another process.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .common import PY, ROOT, child_env, group_cpu_seconds, stop_group, wait_http

BIN = Path(PY).parent
READY_TIMEOUT_S = 30.0
# A gunicorn config file for servers that are not ours: the same ready file as our serve.
_READY_CONF = """from hybridml.cloud.serve import ready_hook
when_ready = ready_hook({path!r})
"""


@functools.lru_cache(maxsize=1)
def _insecure_flag() -> list[str]:
    """``--insecure`` when this kit's ``serve`` has it (loopback serving without tokens)."""
    out = subprocess.run([str(BIN / "hybridml-cloud"), "serve", "--help"], capture_output=True,
                         text=True, check=False)
    return ["--insecure"] if "--insecure" in out.stdout else []


class Server:
    """A child process serving HTTP on loopback, on the port it bound (see :meth:`start`).

    ``command`` gets the path of the ready file the server must write its URL to.
    """

    def __init__(self, command: Callable[[Path], list[str]], health: str,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.command, self.health = command, health
        self.cmd: list[str] = []
        self.url, self.port = "", 0
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] | None = None
        self._dir: Path | None = None

    def start(self) -> Server:
        """Start, read the URL from the ready file, and wait for the health URL."""
        self._dir = Path(tempfile.mkdtemp(prefix="hybridml-bench-server-"))
        ready = self._dir / "ready"
        self.cmd = self.command(ready)
        # stderr goes to a file, not a pipe nobody reads: a chatty server would block on it.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=self.log,
                                     start_new_session=True, env=self.env or child_env(),
                                     cwd=self.cwd or ROOT)
        try:
            self.url = _read_ready(ready, self.proc)
            self.port = int(self.url.rsplit(":", 1)[1])
            wait_http(self.url + self.health, self.proc)
        except RuntimeError as exc:
            self.log.seek(0)
            err = self.log.read().decode(errors="replace")[-2000:]
            self.stop()
            raise RuntimeError(f"{exc}; server stderr: {err}") from exc
        return self

    def stop(self) -> None:
        """Stop the process group."""
        stop_group(self.proc)
        self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL the whole process group at once, as a crash or an OOM kill would: no
        graceful shutdown, in-flight requests cut. The fault of a replica dying."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stop()

    def cpu_seconds(self) -> float:
        """CPU seconds used so far by the server and its workers."""
        return group_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _read_ready(ready: Path, proc: subprocess.Popen[bytes]) -> str:
    """The URL a server wrote to ``ready``; RuntimeError if it exits or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if ready.exists():
            return ready.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        time.sleep(0.02)
    raise RuntimeError(f"server did not listen within {READY_TIMEOUT_S:g} s")


def cloud(registry: Path, *, dev: bool = False, workers: int = 2, extra: Sequence[str] = (),
          env: dict[str, str] | None = None, port: int = 0, verbose: bool = True) -> Server:
    """``hybridml-cloud serve`` (gunicorn, or Flask's dev server with ``dev``), with the
    request log on (``--verbose``: one INFO line per request, written to a file).

    ``extra`` goes on the command line (a fleet's ``--db ... --artifacts ...``), ``env`` is the
    child's whole environment (:func:`child_env`), ``port`` a port to bind again (a replica
    restarted where its devices expect it; 0: any free port)."""
    def command(ready: Path) -> list[str]:
        return [str(BIN / "hybridml-cloud"), "serve", *(["--verbose"] if verbose else []),
                "--registry", str(registry), "--port", str(port), "--ready-file", str(ready),
                "--workers", str(workers), *_insecure_flag(), *(["--dev"] if dev else []),
                *extra]

    return Server(command, "/healthz", env=env)


def floor(model_path: Path, num_idx: list[int], cat_idx: list[int], workers: int = 2) -> Server:
    """The bare Flask + onnxruntime endpoint under gunicorn: the serving floor."""
    env = child_env(FLOOR_MODEL=str(model_path), FLOOR_NUM=",".join(map(str, num_idx)),
                    FLOOR_CAT=",".join(map(str, cat_idx)))

    def command(ready: Path) -> list[str]:
        conf = ready.with_name("gunicorn_conf.py")
        conf.write_text(_READY_CONF.format(path=str(ready)))
        return [str(BIN / "gunicorn"), "-c", str(conf), "-w", str(workers), "-b",
                "127.0.0.1:0", "--log-level", "warning", "benchmarks.floor_app:app"]

    return Server(command, "/healthz", env=env)


def relay(src: socket.socket, dst: socket.socket, before_each: Callable[[int], None]) -> None:
    """Copy ``src`` to ``dst`` until either side ends, calling ``before_each(n)`` before each
    chunk of ``n`` bytes goes on (to count it, or hold it back); then close both."""
    try:
        while data := src.recv(65536):
            before_each(len(data))
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class CountingProxy:
    """A TCP forwarder on loopback that counts the bytes each way: bytes on the wire."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.up = self.down = 0
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        """Zero the counters."""
        with self._lock:
            self.up = self.down = 0

    def totals(self) -> dict[str, int]:
        """Bytes sent by the client (up) and by the server (down) since the last reset."""
        with self._lock:
            return {"up": self.up, "down": self.down, "total": self.up + self.down}

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        def count(n: int) -> None:
            with self._lock:
                if up:
                    self.up += n
                else:
                    self.down += n

        relay(src, dst, count)

    def close(self) -> None:
        """Stop accepting."""
        self._stop = True
        self._sock.close()

    def __enter__(self) -> CountingProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class DelayProxy:
    """A TCP forwarder on loopback that holds back each response by :attr:`delay_s`: a slow
    object store in front of a fast one. It runs in a child process, so its threads (two per
    connection) never take the GIL from the load generator. ``delay_s`` may change at any
    time; it applies to the next response. Bytes each way are counted (:meth:`totals`).

    A response is what the server sends after the client last sent something: the first
    chunk of it waits ``delay_s``, the rest of it flows at loopback speed.
    """

    def __init__(self, target_port: int, delay_s: float = 0.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._delay = ctx.Value("d", delay_s)
        self._bytes = ctx.Array("q", 3)  # up, down, responses delayed
        ready = ctx.Queue()
        self._proc = ctx.Process(target=_delay_proxy_main,
                                 args=(target_port, self._delay, self._bytes, ready),
                                 daemon=True, name="bench-delay-proxy")
        self._proc.start()
        self.port = int(ready.get(timeout=READY_TIMEOUT_S))
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def delay_s(self) -> float:
        """Seconds each response is held back."""
        return float(self._delay.value)

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        self._delay.value = float(value)

    def totals(self) -> dict[str, int]:
        """Bytes client to server (up), server to client (down), and responses delayed."""
        up, down, delayed = self._bytes[:]
        return {"up": int(up), "down": int(down), "delayed_responses": int(delayed)}

    def cpu_seconds(self) -> float:
        """CPU seconds the proxy process used."""
        return group_cpu_seconds(self._proc.pid) if self._proc.pid else 0.0

    def close(self) -> None:
        """Stop the proxy process."""
        if self._proc.is_alive():
            self._proc.terminate()
        self._proc.join(timeout=5)

    def __enter__(self) -> DelayProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _delay_proxy_main(target: int, delay: Any, counts: Any, ready: Any) -> None:
    """The child process of :class:`DelayProxy`: accept, and pipe both ways per connection."""
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)  # a group of its own: its CPU is read apart from the parent's
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    ready.put(listener.getsockname()[1])
    lock = threading.Lock()

    def pipe(src: socket.socket, dst: socket.socket, up: bool, asked: list[bool]) -> None:
        def hold(n: int) -> None:
            if up:
                asked[0] = True
            elif asked[0]:  # the first bytes of an answer: hold them back
                asked[0] = False
                wait = float(delay.value)
                if wait > 0:
                    time.sleep(wait)
                    with lock:
                        counts[2] += 1
            with lock:
                counts[0 if up else 1] += n

        relay(src, dst, hold)

    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", target), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        asked = [False]
        for src, dst, up in ((client, upstream, True), (upstream, client, False)):
            threading.Thread(target=pipe, args=(src, dst, up, asked), daemon=True).start()


def cpu_of(server: Server) -> float:
    """Alias used by the suites: CPU seconds of ``server``."""
    return server.cpu_seconds()
