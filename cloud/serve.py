"""Run the API: gunicorn (the default, 2 sync workers) or Flask's development server.

``hybridml-cloud serve`` calls :func:`serve`; gunicorn can also load the app directly with
``gunicorn 'hybridml.cloud.serve:wsgi()'`` (the registry comes from ``$HYBRIDML_REGISTRY``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask

from hybridml.shared.errors import ConfigError

from .app import create_app

log = logging.getLogger("hybridml.cloud.serve")


def wsgi() -> Flask:
    """App factory for an external WSGI server."""
    return create_app()


def serve(registry: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          dev: bool = False, timeout: int = 30) -> int:
    """Serve ``registry`` on ``host:port`` until interrupted; returns an exit code."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port", field="port")
    if workers < 1:
        raise ConfigError("--workers must be at least 1", field="workers")
    os.environ["HYBRIDML_REGISTRY"] = registry
    app = create_app(registry)
    if dev:
        log.warning("serving %s on http://%s:%d with Flask's development server", registry,
                    host, port)
        app.run(host=host, port=port, threaded=True, use_reloader=False)
        return 0
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def __init__(self, application: Flask, options: dict[str, Any]) -> None:
            self.application = application
            self.options = options
            super().__init__()

        def load_config(self) -> None:
            for key, value in self.options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return self.application

    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "sync",
        "timeout": timeout,
        "graceful_timeout": 10,
        "keepalive": 5,
        "backlog": 256,
        "loglevel": "warning",
        "accesslog": None,
        "proc_name": "hybridml-cloud",
    }
    log.warning("serving %s on http://%s:%d with gunicorn (%d workers)", registry, host, port,
                workers)
    _Gunicorn(app, options).run()
    return 0
