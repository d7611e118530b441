"""Helpers for edge tests: a store holding a registry's versions, and an in-process cloud.

``install`` copies a registry version's artifacts into an edge store and activates it, as a
sync would (without the network). ``trusting`` provisions a store with a registry's signing
key (creating one if the registry has none), as a device is provisioned before its first sync.
``ThreadCloud`` serves the real Flask app of
``hybridml.cloud.app`` with werkzeug's threaded server on a loopback port the OS picks (port 0),
for tests that need the app with other settings than ``hybridml-cloud serve``'s (a batch limit
of 3 rows) or that count the requests it gets.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server

from hybridml.cloud.app import create_app
from hybridml.cloud.config import ServeConfig
from hybridml.cloud.registry import Registry
from hybridml.cloud.signing import KeyRing
from hybridml.cloud.tokens import TokenStore
from hybridml.cloud.train import train
from hybridml.edge.store import LocalStore
from hybridml.edge.trust import TrustStore
from hybridml.shared.manifest import Manifest


def install(reg: Registry, name: str, store: LocalStore, version: int | None = None) -> Manifest:
    """Copy version ``version`` (default: stable) of ``name`` into ``store`` and activate it."""
    data = reg.manifest(name, version if version is not None else "stable")
    store.ensure()
    for art in data["artifacts"]:
        dst = store.artifact_path(art["sha256"])
        if not dst.exists():
            shutil.copyfile(reg.blob_path(art["sha256"]), dst)
    manifest = Manifest.from_json(data)
    store.activate(manifest)
    return manifest


def iris_registry(root: Path, versions: int = 1) -> Path:
    """A registry at ``root`` with ``versions`` iris (logreg) versions, seeds 0, 1, ..."""
    reg = Registry(root)
    for seed in range(versions):
        train(reg, "iris", dataset="iris", model="logreg", seed=seed)
    reg.close()
    return root


def trusting(store: LocalStore | str | Path, registry: str | Path) -> LocalStore:
    """``store``, trusting ``registry``'s public keys (a key is created if it has none)."""
    ring = KeyRing(registry)
    if ring.active_id() is None:
        ring.init()
    store = store if isinstance(store, LocalStore) else LocalStore(store)
    trust = TrustStore(store.root)
    for key in ring.list():
        trust.add(key.public_path)
    return store


class ThreadCloud:
    """The cloud app on a loopback port in this process; ``requests`` records each predict
    call's row count (or the status it answered)."""

    def __init__(self, registry: Path, config: ServeConfig | None = None) -> None:
        self.registry = Path(registry)
        _, self.token = TokenStore(registry).create("device", "edgekit")
        self.app = create_app(registry, config or ServeConfig())
        self.requests: list[dict[str, Any]] = []
        inner = self.app.wsgi_app
        calls = self.requests

        def counting(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO", "").endswith("/predict"):
                length = int(environ.get("CONTENT_LENGTH") or 0)
                body = environ["wsgi.input"].read(length)
                environ["wsgi.input"] = io.BytesIO(body)
                call: dict[str, Any] = {"rows": len(json.loads(body).get("inputs", []))}
                calls.append(call)

                def noting(status: str, headers: list[Any], exc: Any = None) -> Any:
                    call["status"] = int(status.split()[0])
                    return start(status, headers, exc)

                return inner(environ, noting)
            return inner(environ, start)

        self.app.wsgi_app = counting  # type: ignore[method-assign]
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def trust(self, store: Path) -> Path:
        """Provision the device store at ``store`` with this cloud's signing key."""
        trusting(store, self.registry)
        return store

    def rows(self) -> list[int]:
        """Rows in each predict request so far."""
        return [c["rows"] for c in self.requests]

    def statuses(self) -> list[int]:
        """Status of each predict request so far."""
        return [c.get("status", 0) for c in self.requests]

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)
