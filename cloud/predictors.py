"""The cloud's models ready to answer: one :class:`Predictor` per version, kept in an LRU.

Everything that does not depend on the request is done once per version here (manifest,
schema, onnxruntime session, class names), not per call of ``/predict``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.manifest import Manifest

from .registry import Registry

if TYPE_CHECKING:  # imported where a model is loaded: never in gunicorn's master (see below)
    from hybridml.edge.session import ModelSession, Outputs
    from hybridml.shared.schema import EncodedBatch


class Predictor:
    """One model version ready to answer: manifest, schema, session and class names, built once.

    Everything that does not depend on the request is done here, not per call.
    """

    __slots__ = ("_keys", "classes", "manifest", "name", "schema", "session", "version")

    def __init__(self, name: str, version: int, manifest: Manifest, session: ModelSession
                 ) -> None:
        self.name, self.version, self.manifest = name, version, manifest
        self.schema, self.session = manifest.schema, session
        self.classes = list(manifest.classes or ())
        self._keys = [str(c) for c in self.classes]

    def answer(self, rows: list[Any]) -> dict[str, Any]:
        """Validate and encode ``rows`` (InputError names the row and column), run, shape."""
        return self.shape(self.session.run(self.schema.encode(rows)))

    def run(self, rows: list[Any]) -> tuple[EncodedBatch, Outputs]:
        """:meth:`answer` before shaping: the encoded batch and the model's outputs (a
        shadowed call hands both to :class:`hybridml.cloud.online.CloudShadow`)."""
        batch = self.schema.encode(rows)
        return batch, self.session.run(batch)

    def shape(self, out: Outputs) -> dict[str, Any]:
        """The answer (without the request's rows) of the model's outputs."""
        answer: dict[str, Any] = {"name": self.name, "model_version": self.version}
        if out.values is not None:
            # float32 outputs: the shortest text that round-trips (23.372, not 23.37200164);
            # a NaN (a model overflowing) is not JSON: null, as the edge CLI prints it
            answer["predictions"] = [None if v != v else float(str(v))
                                     for v in out.values.astype(np.float32)]
            return answer
        assert out.labels is not None and out.probabilities is not None
        classes, keys = self.classes, self._keys
        answer["predictions"] = [classes[i] for i in out.labels.tolist()]
        answer["probabilities"] = [{k: round(p, 6) if p == p else None for k, p in zip(keys, ps)}
                                   for ps in out.probabilities.tolist()]
        answer["classes"] = classes
        return answer


class ModelCache:
    """LRU of :class:`Predictor` s over the fp32 models, keyed by (name, version); thread-safe."""

    def __init__(self, registry: Registry, size: int) -> None:
        self.registry = registry
        self.size = size
        self._items: OrderedDict[tuple[str, int], Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, version: int) -> Predictor:
        """The predictor of version ``version`` of ``name`` (loaded on first use)."""
        key = (name, version)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        manifest = Manifest.from_json(self.registry.manifest(name, version))
        art = manifest.artifact("model_fp32") or manifest.artifact("model")
        assert art is not None
        # onnxruntime is imported here, in a worker, not when the app is built: a process
        # forked from one that imported it hangs or aborts in its C++ destructors at exit,
        # which kept every gunicorn worker alive for the whole graceful timeout on stop.
        from hybridml.edge.session import ModelSession

        session = ModelSession(self.registry.blob_path(art.sha256), manifest.schema,
                               manifest.task)
        predictor = Predictor(name, version, manifest, session)
        with self._lock:
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return predictor


__all__ = ["ModelCache", "Predictor"]
