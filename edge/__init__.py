"""The edge runtime: onnxruntime + numpy + requests, nothing heavier.

``from hybridml.edge import EdgeRuntime``; ``rt = EdgeRuntime(store, model="eta",
cloud_url=None)``; ``rt.sync()``; ``rt.predict(rows)``.
"""

from .fallback import CircuitBreaker, FallbackPolicy
from .runtime import EdgeRuntime, Prediction
from .store import LocalStore
from .sync import SyncResult

__all__ = ["CircuitBreaker", "EdgeRuntime", "FallbackPolicy", "LocalStore", "Prediction",
           "SyncResult"]
