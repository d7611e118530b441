"""Owner-only files and directories: nothing in a registry is meant for other users.

A registry holds who may call the cloud (``tokens.db``), who moved which alias (the ``audit``
table of ``registry.db``), the signing keys and every model; other accounts on the machine have
no business reading any of it. So its directories are created ``0700`` and its files ``0600``
(blobs ``0400``: owner-only and read-only, as they are immutable) — with ``os.open`` /
``mkdir`` modes, so no file is ever readable by others, not even for the instant before a
``chmod`` — and :func:`tighten_tree` takes group and other bits off a registry that an earlier
release created with the umask's modes (typically ``0755``/``0644``) when it is opened. Owner
bits are never added or removed by tightening, so a read-only blob stays read-only.

A ``chmod`` this process may not make (a registry owned by another account, opened
read-only) is logged once and skipped: it must not stop a server from starting.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("hybridml.cloud.private")

DIR_MODE = 0o700
FILE_MODE = 0o600
OTHERS = 0o077  # group and other bits


def restrict(path: str | os.PathLike[str]) -> bool:
    """Take group and other permission bits off ``path``; True if it had any.

    A missing path is left alone (False); a symlink is not followed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & OTHERS:
        return False
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode) & ~OTHERS)
    except FileNotFoundError:
        return False
    except PermissionError as exc:
        log.warning("cannot make %s private (%s); other users may read it: fix its owner "
                    "or mode", path, exc.strerror)
    return True


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and its missing parents ``0700``, or restrict it if it exists."""
    p = Path(path)
    missing = []
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            d.mkdir(mode=DIR_MODE)
    # mkdir's mode passes through the umask: an unusual one could keep others' bits.
    restrict(path)
    return Path(path)


def private_file(path: str | os.PathLike[str]) -> None:
    """Create an empty ``path`` ``0600`` unless it exists; restrict it either way.

    An existing file is never opened: closing any descriptor of a file drops every POSIX
    lock this process holds on it, and SQLite's locks on a database another connection of
    this process has open are exactly such locks (a second ``Registry`` in a process would
    silently break the first one's locking).
    """
    if not os.path.lexists(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except FileExistsError:
            pass  # another process created it first
        else:
            os.close(fd)
    restrict(path)


def tighten_tree(root: str | os.PathLike[str]) -> int:
    """Restrict ``root`` and what it holds; returns how many modes changed.

    Only ``root``'s own entries are checked when ``root`` was private already (the cost of
    opening a registry stays a few ``stat`` calls); a ``root`` open to others — a registry
    from a release before this rule — has its whole tree restricted once. Symlinks are not
    followed.
    """
    top = Path(root)
    changed = int(restrict(top))
    if not changed:
        with os.scandir(top) as it:
            return sum(restrict(entry.path) for entry in it)
    for dirpath, dirnames, filenames in os.walk(top):
        changed += sum(restrict(os.path.join(dirpath, n)) for n in (*dirnames, *filenames))
    log.warning("made the registry at %s private to its owner (%d files and directories "
                "were open to other users)", top, changed)
    return changed
