"""The store id: 10 random hex digits made once per store, naming this device's records.

``<store>/device.json`` holds ``{"store_id": "7f3a9c2e1b", "created": "..."}``. The id is the
first part of every spool record id (``7f3a9c2e1b:42``) and of every prediction id
(``7f3a9c2e1b:eta:17``): the cloud keeps record ids to make uploads idempotent, and, without
device tokens, takes the store id in them as the device's name (docs/monitoring.md §4, §5).

The file is created exclusively (written aside, then hard-linked into place), so two processes
opening a new store at once agree on one id; it is never rewritten.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import ConfigError
from hybridml.shared.files import fsync_dir

log = logging.getLogger("hybridml.edge.identity")

DEVICE_FILE = "device.json"
STORE_ID_RE = re.compile(r"[0-9a-f]{10}")


def store_id(root: str | os.PathLike[str]) -> str:
    """The id of the store at ``root``, made (and the directory created) on first use.

    An unreadable ``device.json`` is a :class:`ConfigError`: replacing it would give this
    device a second identity, so deleting it is left to the operator.
    """
    path = Path(root).expanduser() / DEVICE_FILE
    found = _read(path)
    if found is not None:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    new = os.urandom(5).hex()
    tmp = path.with_name(f".{DEVICE_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"store_id": new, "created": utc_iso()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # fails if another process made one first: take theirs
        except FileExistsError:
            pass
        else:
            fsync_dir(path.parent)
            log.info("new store id %s for %s", new, path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    found = _read(path)
    if found is None:  # unreachable: the file was just linked or made by another process
        raise ConfigError(f"cannot create the store id at {path}", field="store_id")
    return found


def _read(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        value = json.loads(text).get("store_id")
    except (ValueError, AttributeError, RecursionError):
        value = None
    if not isinstance(value, str) or not STORE_ID_RE.fullmatch(value):
        raise ConfigError(f"{path} does not hold a store id (10 hex digits); restore it from a "
                          "backup, or delete it to give this store a new identity (the cloud "
                          "then sees a new device)", field="store_id")
    return value


__all__ = ["DEVICE_FILE", "STORE_ID_RE", "store_id"]
