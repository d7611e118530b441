"""hybridml: deploy scikit-learn models to the edge as ONNX, with the cloud in charge of versions.

The distribution has three parts: :mod:`hybridml.shared` (contracts both sides use),
:mod:`hybridml.edge` (the light runtime for devices) and :mod:`hybridml.cloud` (training,
export, quantization, registry and the HTTP API; needs the ``cloud`` extra).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
