"""The edge runtime: onnxruntime + numpy + requests, nothing heavier.

``from hybridml.edge import EdgeRuntime``; ``rt = EdgeRuntime(store, model="eta",
cloud_url=None)``; ``rt.sync()``; ``rt.predict(rows)``.
"""

from typing import TYPE_CHECKING, Any

from .fallback import CircuitBreaker, FallbackPolicy
from .store import LocalStore

if TYPE_CHECKING:
    from .runtime import EdgeRuntime, Prediction
    from .sync import SyncResult


def __getattr__(name: str) -> Any:
    # Loaded on first use. SyncResult: sync pulls in requests and the signature checks, which
    # a process that only predicts never needs. EdgeRuntime/Prediction: onnxruntime, which
    # the cloud's gunicorn master (it imports the store helpers) must not load before it
    # forks workers — a forked child of a process that loaded it hangs at exit.
    if name == "SyncResult":
        from .sync import SyncResult
        return SyncResult
    if name in ("EdgeRuntime", "Prediction"):
        from . import runtime
        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CircuitBreaker", "EdgeRuntime", "FallbackPolicy", "LocalStore", "Prediction",
           "SyncResult"]
