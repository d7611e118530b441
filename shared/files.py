"""Durable file writes both sides use: atomic replace, directory fsync, a file's sha256.

:func:`atomic_write` writes to a temp file in the target's directory, fsyncs it, renames it
over the target and fsyncs the directory, so a reader (or a process after a crash) sees the
old file or the new one, never half of either. The edge's store, its trusted keys, the cloud's
signing keys and the precomputed tables are written this way.

Test hook: :func:`crash_point` kills the process with SIGKILL at a named step when
``$HYBRIDML_TEST_CRASH_AT`` names that step. It does nothing unless the variable is set; the
fault tests use it to prove that a crash at any step leaves a store on the old or the new
version (``atomic_write`` offers the step ``before_replace:<file name>``).

``tempfile`` and ``hashlib`` are imported where they are used: a process that only predicts
never writes, and ``hashlib`` loads OpenSSL (~3.5 MB RSS).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

CRASH_ENV = "HYBRIDML_TEST_CRASH_AT"
CHUNK = 1 << 20  # hash 1 MiB at a time: a 1 GB model never sits in memory

Writer = Callable[[BinaryIO], object]


def crash_point(point: str) -> None:
    """Test hook: SIGKILL this process here if ``$HYBRIDML_TEST_CRASH_AT`` equals ``point``."""
    if os.environ.get(CRASH_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    """Make a rename, link or unlink in directory ``path`` durable (a no-op on Windows)."""
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Writer, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, never half.

    ``data`` is the bytes, or a function that writes them to the open temp file (for content
    too large to build in memory, such as a precomputed table). ``mode`` sets the file's
    permissions before it becomes visible.
    """
    import tempfile  # here, not at the top: a process that only predicts never writes

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        crash_point(f"before_replace:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def file_sha256(path: Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib  # here: it loads OpenSSL (~3.5 MB RSS), which predicting never needs

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


__all__ = ["CRASH_ENV", "atomic_write", "crash_point", "file_sha256", "fsync_dir"]
