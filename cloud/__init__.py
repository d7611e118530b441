"""The cloud side: training, export, compression, registry, precompute and the HTTP API.

``from hybridml.cloud import Registry, train`` (needs the ``cloud`` extra). Each name is
imported with its module on first use, so ``import hybridml.cloud`` (every CLI command,
gunicorn's master) loads neither scikit-learn nor onnxruntime; see :mod:`hybridml.shared.lazy`.
"""

from typing import TYPE_CHECKING

from hybridml.shared.lazy import export_lazily

if TYPE_CHECKING:
    from .app import create_app
    from .auth import promote, rollback
    from .compress import CompressionReport
    from .controller import Controller
    from .lineage import display_label
    from .policy import Policy
    from .precompute import PrecomputeReport, precompute
    from .quantize import QuantizationReport
    from .registry import ModelSummary, Registry, VersionInfo
    from .signing import KeyRing
    from .tokens import TokenStore
    from .train import TrainResult, train

export_lazily(__name__, {
    "app": ("create_app",),
    "auth": ("promote", "rollback"),
    "compress": ("CompressionReport",),
    "controller": ("Controller",),
    "lineage": ("display_label",),
    "policy": ("Policy",),
    "precompute": ("PrecomputeReport", "precompute"),
    "quantize": ("QuantizationReport",),
    "registry": ("ModelSummary", "Registry", "VersionInfo"),
    "signing": ("KeyRing",),
    "tokens": ("TokenStore",),
    "train": ("TrainResult", "train"),
})

__all__ = [
    "CompressionReport",
    "Controller",
    "KeyRing",
    "ModelSummary",
    "Policy",
    "PrecomputeReport",
    "QuantizationReport",
    "Registry",
    "TokenStore",
    "TrainResult",
    "VersionInfo",
    "create_app",
    "display_label",
    "precompute",
    "promote",
    "rollback",
    "train",
]
