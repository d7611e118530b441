"""A device a test drives: one JSON command per line on stdin, one JSON answer per line.

It runs the real edge (``hybridml.edge``) and nothing else of the project, on whatever Python
starts it: the host's (the x86 reference) or an emulated Raspberry Pi's (``qemu-aarch64``,
:mod:`tests.arm64.rootfs`). The test sends both the same commands and compares the answers.
Only the standard library, numpy and the edge are imported here: the emulated board has no
scikit-learn and no pytest.

Commands (``{"op": ..., ...}``)::

    versions                       platform, Python, numpy, onnxruntime, hybridml
    open   store, name, cloud, policy?   an EdgeRuntime (cloud: a URL or a list of them)
    sync                           SyncResult.to_json()
    predict rows                   the predictions (rows through the batch path)
    predict_one rows               the same rows one by one (the single-row fast path)
    rollback                       the version now active
    gc                             the artifact files left in the store
    feedback id, label             the feedback record's id
    push                           PushResult.to_json() (flushes the counters first)
    spool                          the spooled records by kind
    doctor store, name, cloud      ``hybridml-edge doctor --json``: its exit code and checks
    quit                           close the runtime and exit

An error is answered as ``{"error": type, "code": ..., "message": ...}``; the device goes on.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any


def versions() -> dict[str, Any]:
    """What this device is: CPU, Python, and the versions of the edge's dependencies."""
    from importlib.metadata import version

    return {"machine": platform.machine(), "python": platform.python_version(),
            **{d: version(d) for d in ("numpy", "onnxruntime", "requests", "cryptography",
                                       "hybridml")}}


class Device:
    """The runtime behind the commands."""

    def __init__(self) -> None:
        self.rt: Any = None

    def open(self, store: str, name: str, cloud: str | list[str],
             policy: dict[str, Any] | None = None) -> dict[str, Any]:
        from hybridml.edge import EdgeRuntime, FallbackPolicy

        self.close()
        self.rt = EdgeRuntime(store, name, cloud, policy=FallbackPolicy(**(policy or {})),
                              allow_http=True)
        return {"version": self.rt.version}

    def sync(self) -> dict[str, Any]:
        return dict(self.rt.sync().to_json())

    def predict(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p.to_json() for p in self.rt.predict(rows)]

    def predict_one(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [self.rt.predict_one(r).to_json() for r in rows]

    def rollback(self) -> dict[str, Any]:
        return {"version": self.rt.rollback().version, "loaded": self.rt.version}

    def gc(self) -> dict[str, Any]:
        self.rt.store.gc()
        files = sorted(p.name for p in self.rt.store.artifacts.iterdir())
        return {"artifacts": files}

    def feedback(self, id: str, label: Any) -> dict[str, Any]:
        return {"id": self.rt.feedback(id, label)}

    def push(self) -> dict[str, Any]:
        return dict(self.rt.push().to_json())

    def spool(self) -> dict[str, Any]:
        import sqlite3

        db = Path(self.rt.store.root) / "telemetry.db"
        with sqlite3.connect(db) as con:
            rows = con.execute("SELECT kind, COUNT(*) FROM records GROUP BY kind").fetchall()
        return {k: n for k, n in rows}

    def doctor(self, store: str, name: str, cloud: str) -> dict[str, Any]:
        import contextlib
        import io

        from hybridml.edge.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["doctor", "--store", store, "--name", name, "--cloud", cloud,
                         "--allow-http", "--json"])
        return {"exit": code, **json.loads(out.getvalue())}

    def close(self) -> None:
        if self.rt is not None:
            self.rt.close()
            self.rt = None


def answer(device: Device, command: dict[str, Any]) -> Any:
    """Run one command."""
    op = command.pop("op")
    if op == "versions":
        return versions()
    return getattr(device, op)(**command)


def main() -> int:
    """Serve commands until ``quit`` or the end of stdin."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    device = Device()
    out = sys.stdout
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("op") == "quit":
            break
        try:
            result: Any = answer(device, command)
        except Exception as exc:  # the test reads the error; the device keeps serving
            result = {"error": type(exc).__name__, "code": getattr(exc, "code", None),
                      "message": getattr(exc, "message", None) or str(exc)}
        out.write(json.dumps(result) + "\n")
        out.flush()
    device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
