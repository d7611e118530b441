"""The edge runtime: onnxruntime + numpy + requests, nothing heavier.

``from hybridml.edge import EdgeRuntime``; ``rt = EdgeRuntime(store, model="eta",
cloud_url=None)``; ``rt.sync()``; ``rt.predict(rows)``.

Names load with their module on first use (:mod:`hybridml.shared.lazy`): a process that only
predicts never loads requests or the signature checks, and the cloud's gunicorn master (which
imports the store helpers) never loads onnxruntime before it forks its workers.
"""

from typing import TYPE_CHECKING

from hybridml.shared.lazy import export_lazily

if TYPE_CHECKING:
    from .columnar import BatchPrediction
    from .fallback import CircuitBreaker, CloudRow, Fallback, FallbackPolicy
    from .loaded import LoadedVersion
    from .observe import Observation, Observer
    from .runtime import EdgeRuntime, Prediction
    from .store import GcResult, LocalStore
    from .sync import SyncResult, sync

export_lazily(__name__, {
    "columnar": ("BatchPrediction",),
    "fallback": ("CircuitBreaker", "CloudRow", "Fallback", "FallbackPolicy"),
    "loaded": ("LoadedVersion",),
    "observe": ("Observation", "Observer"),
    "runtime": ("EdgeRuntime", "Prediction"),
    "store": ("GcResult", "LocalStore"),
    "sync": ("SyncResult", "sync"),
})

__all__ = ["BatchPrediction", "CircuitBreaker", "CloudRow", "EdgeRuntime", "Fallback",
           "FallbackPolicy", "GcResult", "LoadedVersion", "LocalStore", "Observation",
           "Observer", "Prediction", "SyncResult", "sync"]
