"""One row's answer (:class:`Prediction`), as every door of the runtime returns it.

A prediction is built with as little as possible: its probabilities dict and its
``prediction_id`` (:mod:`hybridml.edge.feedback`) are made on first access, so a caller that
reads only ``prediction`` pays for neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .feedback import PredictionIds


class Prediction:
    """One row's answer. ``source`` is ``precomputed``, ``edge`` or ``cloud``.

    ``probabilities`` (classifiers) maps each class to its probability rounded to 6 digits; it
    is built on first access, so callers that only read ``prediction`` never pay for it. The
    same goes for :attr:`prediction_id`.
    """

    __slots__ = ("_classes", "_id", "_ids", "_probs", "_raw", "degraded", "error",
                 "model_version", "prediction", "reason", "source")

    def __init__(self, prediction: Any, source: str, model_version: int | None,
                 probabilities: dict[str, float] | None = None, degraded: bool = False,
                 reason: str | None = None, error: dict[str, Any] | None = None) -> None:
        self.prediction = prediction
        self.source = source
        self.model_version = model_version
        self.degraded = degraded
        self.reason = reason
        self.error = error
        self._probs = probabilities
        self._raw: Any = None
        self._classes: Sequence[Any] | None = None
        self._id: str | None = None
        self._ids: PredictionIds | None = None

    @classmethod
    def deferred(cls, prediction: Any, source: str, model_version: int | None, raw: Any,
                 classes: Sequence[Any] | None) -> Prediction:
        """A local answer whose probabilities dict is built from ``raw`` on first access.

        ``raw`` is a row of class probabilities (built into a dict of ``classes``), a shared
        dict (copied on access) or None.
        """
        p = cls.__new__(cls)
        p.prediction, p.source, p.model_version = prediction, source, model_version
        p.degraded, p.reason, p.error = False, None, None
        p._probs, p._raw, p._classes = None, raw, classes
        p._id = p._ids = None
        return p

    @property
    def prediction_id(self) -> str | None:
        """``<store id>:<model>:<counter>``, what :meth:`EdgeRuntime.feedback` takes; given
        on first access (None for an answer no runtime made, or an error)."""
        pid = self._id
        if pid is None:
            ids = self._ids
            if ids is None or self.error is not None:
                return None
            pid = self._id = ids.new(self.prediction, self.model_version)
        return pid

    @property
    def probabilities(self) -> dict[str, float] | None:
        """Class -> probability (classifiers), else None."""
        raw = self._raw
        if raw is not None:
            self._raw = None
            if isinstance(raw, dict):
                self._probs = dict(raw)
            else:
                self._probs = {str(c): round(float(p), 6)
                               for c, p in zip(self._classes or (), raw)}
        return self._probs

    @probabilities.setter
    def probabilities(self, value: dict[str, float] | None) -> None:
        self._probs, self._raw = value, None

    def __getstate__(self) -> dict[str, Any]:
        # The id is fixed before the answer leaves the process; the id source stays here.
        self.prediction_id  # noqa: B018
        return {k: getattr(self, k) for k in self.__slots__ if k != "_ids"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._ids = None
        for k, v in state.items():
            setattr(self, k, v)

    def _fields(self) -> tuple[Any, ...]:
        return (self.prediction, self.source, self.model_version, self.probabilities,
                self.degraded, self.reason, self.error)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prediction):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaced

    def __repr__(self) -> str:
        names = ("prediction", "source", "model_version", "probabilities", "degraded", "reason",
                 "error")
        return "Prediction(" + ", ".join(f"{k}={v!r}" for k, v in zip(names, self._fields())) \
            + ")"

    def to_json(self) -> dict[str, Any]:
        """JSON form printed by ``predict --json``."""
        pred = self.prediction
        out: dict[str, Any] = {"prediction": None if pred != pred else pred,
                               "source": self.source,
                               "model_version": self.model_version}
        pid = self.prediction_id
        if pid is not None:
            out["prediction_id"] = pid
        probabilities = self.probabilities
        if probabilities is not None:  # NaN (a model overflowing) is not JSON: null
            out["probabilities"] = {k: None if v != v else v for k, v in probabilities.items()}
        if self.degraded:
            out["degraded"] = True
        if self.reason:
            out["reason"] = self.reason
        if self.error is not None:
            out["error"] = self.error
        return out


def maker(ids: PredictionIds) -> Callable[..., Prediction]:
    """:meth:`Prediction.deferred` for answers whose ids ``ids`` hands out."""
    new = Prediction.__new__

    def make(prediction: Any, source: str, model_version: int | None, raw: Any,
             classes: Sequence[Any] | None) -> Prediction:
        p = new(Prediction)
        p.prediction, p.source, p.model_version = prediction, source, model_version
        p.degraded, p.reason, p.error = False, None, None
        p._probs, p._raw, p._classes = None, raw, classes
        p._id, p._ids = None, ids
        return p
    return make



__all__ = ["Prediction", "maker"]
