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

from hybridml.shared.errors import InferenceError, ModelLoadError
from hybridml.shared.schema import EncodedBatch, InputSchema

log = logging.getLogger("hybridml.edge.session")


def _ort_errors() -> tuple[type[BaseException], ...]:
    """The exception types onnxruntime raises from a run: its own (pybind11) types, plus the
    built-in ones its bindings use for bad feeds (RuntimeError, ValueError, TypeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(c for c in vars(state).values()
                if isinstance(c, type) and issubclass(c, Exception))
    return (*own, RuntimeError, ValueError, TypeError, MemoryError)


# Converted to InferenceError here, at the boundary, and nowhere else.
ORT_ERRORS = _ort_errors()


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
        except ORT_ERRORS as exc:  # onnxruntime's own Fail/InvalidGraph/... types
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
        """Run the model once for the whole batch; :class:`InferenceError` if it fails."""
        try:
            res = self._run(self._outs, batch.feeds(self.schema), None)
        except ORT_ERRORS as exc:
            raise InferenceError(f"the model failed to run on {len(batch)} row(s): "
                                 f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        if self.task == "regression":
            return Outputs(None, None, np.asarray(res[0], dtype=np.float32).reshape(-1))
        return Outputs(np.asarray(res[0]).reshape(-1).astype(np.int64, copy=False),
                       np.asarray(res[1], dtype=np.float32), None)

    def row_runner(self, num: np.ndarray, cat: np.ndarray) -> RowRunner:
        """A no-argument call that runs the model on the one-row buffers ``num`` (float32
        ``[1, n_numeric]``) and ``cat`` (object ``[1, n_categorical]``), for the single-row
        fast path; see :class:`RowRunner`.
        """
        return RowRunner(self, num, cat)

    def warm(self) -> None:
        """Run one all-missing row so the first real call pays no lazy-initialisation cost.

        A model that cannot run that row still loads: warming is only an optimisation, and
        rows it can run must still be answered (the failure is logged).
        """
        try:
            self.run(self.schema.encode([[None] * len(self.schema.names)]))
        except InferenceError as exc:
            log.warning("warm-up skipped: %s", exc.message)


def batch_feed_names(schema: InputSchema) -> tuple[str, ...]:
    """Names of the ONNX inputs a model with ``schema`` takes."""
    names: list[str] = []
    if schema.n_numeric:
        names.append("num")
    if schema.n_categorical:
        names.append("cat")
    return tuple(names)


class RowRunner:
    """Runs one model on fixed one-row input buffers, with as little per call as possible.

    Numeric-only models use IO binding: the input is bound once to the caller's buffer (no
    feed dict, no per-call input checks, no copy) and, when a trial run shows their shapes,
    the outputs are bound to preallocated arrays too (:attr:`reuses_outputs`: the returned
    arrays are then overwritten by the next call, so callers copy what they keep while they
    still hold the buffers). Models with string inputs feed the buffers to the C session's
    run, which skips the Python wrapper's per-call checks. Either way a failed run raises
    :class:`InferenceError`, like :meth:`ModelSession.run`.
    """

    def __init__(self, session: ModelSession, num: np.ndarray, cat: np.ndarray) -> None:
        self.reuses_outputs = False
        sess = session._sess
        outs = list(session._outs)
        c_sess = getattr(sess, "_sess", None)
        self._call: Callable[[], list[np.ndarray]]
        if cat.shape[1] == 0:
            self._call = self._bound(sess, c_sess, outs, num)
            return
        run = c_sess.run if c_sess is not None else sess.run
        feeds = {"cat": cat}
        if num.shape[1]:
            feeds["num"] = num
        self._call = lambda: run(outs, feeds, None)  # type: ignore[no-any-return]

    def __call__(self) -> list[np.ndarray]:
        """Run the model on the buffers' current contents."""
        try:
            return self._call()
        except ORT_ERRORS as exc:
            raise InferenceError(f"the model failed to run on one row: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from exc

    def _bound(self, sess: ort.InferenceSession, c_sess: Any, outs: list[str],
               num: np.ndarray) -> Callable[[], list[np.ndarray]]:
        io = sess.io_binding()
        io.bind_ortvalue_input("num", ort.OrtValue.ortvalue_from_numpy(num))
        for name in outs:
            io.bind_output(name)
        sess.run_with_iobinding(io)
        trial = io.copy_outputs_to_cpu()
        c_io = getattr(io, "_iobinding", None)
        if c_sess is None or c_io is None or not hasattr(c_sess, "run_with_iobinding"):
            def run_public() -> list[np.ndarray]:
                sess.run_with_iobinding(io)
                return io.copy_outputs_to_cpu()  # type: ignore[no-any-return]
            return run_public
        options = ort.RunOptions()
        if all(isinstance(a, np.ndarray) and a.dtype != object for a in trial):
            buffers = [np.empty_like(a) for a in trial]
            io.clear_binding_outputs()
            for name, buf in zip(outs, buffers):
                io.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(buf))
            self.reuses_outputs = True

            def run_prebound() -> list[np.ndarray]:
                c_sess.run_with_iobinding(c_io, options)
                return buffers
            return run_prebound

        def run_bound() -> list[np.ndarray]:
            c_sess.run_with_iobinding(c_io, options)
            return c_io.copy_outputs_to_cpu()  # type: ignore[no-any-return]
        return run_bound
