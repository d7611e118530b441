"""A thin, fast wrapper around one onnxruntime session of a hybridml model.

Both sides use it: the edge to serve, the cloud to check parity, evaluate quantized candidates
and precompute tables. The graph takes the ``num``/``cat`` inputs built by
:class:`hybridml.shared.schema.InputSchema` and returns either ``label`` + ``probabilities``
(classifiers; labels are class indices) or ``variable`` (regressors).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from hybridml.shared.errors import ModelLoadError
from hybridml.shared.schema import EncodedBatch, InputSchema

log = logging.getLogger("hybridml.edge.session")


@dataclass
class Outputs:
    """Model outputs for a batch: class indices and probabilities, or regression values."""

    labels: np.ndarray | None  # int64 [N] class indices
    probabilities: np.ndarray | None  # float32 [N, C]
    values: np.ndarray | None  # float32 [N]

    def __len__(self) -> int:
        arr = self.values if self.values is not None else self.labels
        return 0 if arr is None else int(arr.shape[0])


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Session options for small-batch work on small devices.

    One intra-op thread and no spinning: spinning threads keep a core busy long after a call,
    which costs battery and steals the core from the caller on a 1-4 core device.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return opts


class ModelSession:
    """One loaded model; :meth:`run` takes an :class:`EncodedBatch`.

    ``source`` is a path or the serialized model bytes.
    """

    def __init__(self, source: str | os.PathLike[str] | bytes, schema: InputSchema,
                 task: str, threads: int = 1) -> None:
        self.schema = schema
        self.task = task
        model = source if isinstance(source, bytes) else str(Path(source))
        try:
            self._sess = ort.InferenceSession(model, session_options(threads),
                                              providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelLoadError(f"onnxruntime cannot load the model: {exc}") from exc
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        expected = list(batch_feed_names(schema))
        if sorted(self.input_names) != sorted(expected):
            raise ModelLoadError(
                f"the model takes inputs {self.input_names} but the schema builds {expected}")
        if task == "regression":
            self._outs = [self.output_names[0]]
        else:
            if len(self.output_names) < 2:
                raise ModelLoadError("a classifier model must output a label and probabilities")
            self._outs = self.output_names[:2]
        # The C session's run skips the Python wrapper's per-call feed checks (a few µs; the
        # schema built the feeds); a build without it keeps the public call.
        c_sess: Any = getattr(self._sess, "_sess", None)
        self._run: Callable[..., list[Any]] = c_sess.run if hasattr(c_sess, "run") else \
            (lambda outs, feeds, _options: self._sess.run(outs, feeds))

    def run(self, batch: EncodedBatch) -> Outputs:
        """Run the model once for the whole batch."""
        res = self._run(self._outs, batch.feeds(self.schema), None)
        if self.task == "regression":
            return Outputs(None, None, np.asarray(res[0], dtype=np.float32).reshape(-1))
        return Outputs(np.asarray(res[0]).reshape(-1).astype(np.int64, copy=False),
                       np.asarray(res[1], dtype=np.float32), None)

    def warm(self) -> None:
        """Run one all-missing row so the first real call pays no lazy-initialisation cost."""
        self.run(self.schema.encode([[None] * len(self.schema.names)]))


def batch_feed_names(schema: InputSchema) -> tuple[str, ...]:
    """Names of the ONNX inputs a model with ``schema`` takes."""
    names: list[str] = []
    if schema.n_numeric:
        names.append("num")
    if schema.n_categorical:
        names.append("cat")
    return tuple(names)
