"""The edge runtime: onnxruntime + numpy + requests, nothing heavier.

``from hybridml.edge import EdgeRuntime``; ``rt = EdgeRuntime(store, model="eta",
cloud_url=None)``; ``rt.sync()``; ``rt.predict(rows)``.
"""

from typing import TYPE_CHECKING, Any

from .fallback import CircuitBreaker, FallbackPolicy
from .runtime import EdgeRuntime, Prediction
from .store import LocalStore

if TYPE_CHECKING:
    from .sync import SyncResult


def __getattr__(name: str) -> Any:
    # SyncResult is loaded on first use: sync pulls in requests and the signature checks,
    # which a process that only predicts never needs (memory and start-up time).
    if name == "SyncResult":
        from .sync import SyncResult
        return SyncResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CircuitBreaker", "EdgeRuntime", "FallbackPolicy", "LocalStore", "Prediction",
           "SyncResult"]
