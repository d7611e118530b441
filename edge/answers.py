"""What an answer to ``/predict`` must be before any of it becomes a prediction.

Anyone between the device and the cloud can write the answer, so each one is checked against
what the device knows of the model it asked about (:class:`AnswerCheck`, one per loaded
version):

* ``name`` is the model's name; ``model_version`` a positive integer, and when the device has
  a model it is the device's own version — the fallback asks the cloud for exactly that version
  (``"version": N``), so a row answered by the cloud comes from the same model as its
  neighbours (rollout arms never mix);
* ``predictions`` holds one entry per row sent: for a classifier one of the manifest's classes,
  compared as the cloud serialises them (JSON values, so ``1`` is not ``"1"`` nor ``true``); for
  a regressor a finite number or null;
* ``probabilities``, when present, one object per row whose keys are exactly the class names as
  text and whose values are numbers in [0, 1] or null.

Without a local model (the cloud answers everything) the classes come from the answer's own
``classes`` and any version is accepted. Anything else is a :class:`RemoteError`: the fallback
keeps the local answers and counts a failed cloud call. :attr:`AnswerCheck.row_bytes` bounds
how large a well-formed answer is per row, so the client stops reading a larger one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridml.shared.errors import RemoteError
from hybridml.shared.manifest import Manifest

if TYPE_CHECKING:  # the bodies module loads requests: only where a cloud is configured
    from .bodies import BodyLimits

FLOAT_TEXT = 24  # the longest float repr JSON carries ("-2.2250738585072014e-308")
ROW_SLACK = 64  # separators, brackets and spaces a serialiser may add per row
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class CloudRow:
    """The cloud's answer for one row."""

    prediction: Any
    probabilities: dict[str, float] | None
    model_version: int | None


class AnswerCheck:
    """The rules one model's answers must pass (see the module docstring).

    ``version`` None accepts any positive version; ``task`` None (no local model) takes the
    classes from the answer itself.
    """

    __slots__ = ("_keys", "_labels", "classes", "fixed_bytes", "name", "row_bytes", "task",
                 "version")

    def __init__(self, name: str, version: int | None = None, task: str | None = None,
                 classes: Sequence[Any] | None = None) -> None:
        self.name, self.version, self.task = name, version, task
        self.classes: tuple[Any, ...] | None = None if task in (None, "regression") \
            else tuple(classes or ())
        self._labels = frozenset(_label(c) for c in self.classes or ())
        self._keys = frozenset(str(c) for c in self.classes or ())
        if task is None:
            self.row_bytes: int | None = None  # not known: the client's default per row
            self.fixed_bytes = 0
        elif self.classes is None:
            self.row_bytes, self.fixed_bytes = FLOAT_TEXT + ROW_SLACK, 0
        else:
            keys = sum(len(json.dumps(k)) + FLOAT_TEXT + 4 for k in self._keys)
            label = max(len(json.dumps(c)) for c in self.classes)
            self.row_bytes = label + keys + ROW_SLACK
            self.fixed_bytes = len(json.dumps(list(self.classes))) * 2  # the "classes" echo

    @classmethod
    def of(cls, manifest: Manifest) -> AnswerCheck:
        """The check for answers about the version ``manifest`` describes."""
        return cls(manifest.name, manifest.version, manifest.task, manifest.classes)

    def max_bytes(self, rows: int, limits: BodyLimits) -> int:
        """The most decoded bytes a well-formed answer for ``rows`` rows takes."""
        return limits.answer_bytes + self.fixed_bytes + rows * (self.row_bytes or
                                                                limits.row_bytes)

    def rows(self, answer: Any, n: int) -> list[CloudRow]:
        """Per-row answers from ``answer`` for ``n`` rows sent; :class:`RemoteError` naming
        the first rule it breaks."""
        if not isinstance(answer, Mapping):
            raise RemoteError(f"the cloud's prediction answer is a {type(answer).__name__}, "
                              "not an object")
        preds = answer.get("predictions")
        if not isinstance(preds, list) or len(preds) != n:
            raise RemoteError(f"the cloud answered {_count(preds)} prediction(s) for {n} "
                              "row(s)")
        version = self._version(answer)
        if answer.get("name") != self.name:
            raise RemoteError(f"the cloud answered for model {_short(answer.get('name'))}, "
                              f"not {self.name!r}")
        classes = self.classes if self.task is not None else _answer_classes(answer)
        probs = answer.get("probabilities")
        if classes is None:
            _check_values(preds)
            if probs is not None:
                raise RemoteError("the cloud sent probabilities for a regression model")
        else:
            labels = self._labels if self.task is not None else \
                frozenset(_label(c) for c in classes)
            keys = self._keys if self.task is not None else frozenset(str(c) for c in classes)
            _check_labels(preds, labels)
            if probs is not None:
                _check_probabilities(probs, n, keys)
        return [CloudRow(p, None if probs is None else probs[k], version)
                for k, p in enumerate(preds)]

    def _version(self, answer: Mapping[str, Any]) -> int:
        version = answer.get("model_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise RemoteError(f"the cloud's model_version {_short(version)} is not a version "
                              "number (1, 2, ...)")
        if self.version is not None and version != self.version:
            raise RemoteError(f"asked the cloud for {self.name!r} v{self.version}, it answered "
                              f"with v{version}; not used (one answer, one model version)")
        return version


def _answer_classes(answer: Mapping[str, Any]) -> list[Any] | None:
    """A cloud-only answer's own classes (None: a regressor's answer)."""
    classes = answer.get("classes")
    if classes is None:
        return None
    if not isinstance(classes, list) or len(classes) < 2 or not all(
            c is None or isinstance(c, (str, int, float)) for c in classes):
        raise RemoteError("the cloud's 'classes' is not a list of class values")
    return classes


def _check_labels(preds: list[Any], labels: frozenset[tuple[type, Any]]) -> None:
    for k, p in enumerate(preds):
        if _label(p) not in labels:
            raise RemoteError(f"the cloud predicted {_short(p)} for row {k}, which is not one "
                              "of the model's classes")


def _check_values(preds: list[Any]) -> None:
    for k, p in enumerate(preds):
        if p is not None and (type(p) not in (int, float) or not math.isfinite(p)):
            raise RemoteError(f"the cloud predicted {_short(p)} for row {k}; a regression "
                              "answer is a number or null")


def _check_probabilities(probs: Any, n: int, keys: frozenset[str]) -> None:
    if not isinstance(probs, list) or len(probs) != n:
        raise RemoteError(f"the cloud's probabilities are not a list of one object per row "
                          f"(got {_count(probs)} for {n} row(s))")
    for k, row in enumerate(probs):
        if not isinstance(row, dict) or row.keys() != keys:
            raise RemoteError(f"the cloud's probabilities for row {k} are not one value per "
                              "class of the model")
        for v in row.values():
            if v is not None and (type(v) not in (int, float) or not 0.0 <= v <= 1.0):
                raise RemoteError(f"the cloud's probability {_short(v)} for row {k} is not "
                                  "a number within 0..1")


def _label(value: Any) -> tuple[type, Any]:
    """A class value compared as JSON tells values apart: by type and value, so ``1``,
    ``1.0``, ``true`` and ``"1"`` are four classes (a list or an object is no class)."""
    kind = type(value)
    return (kind, value) if kind in _SCALARS else (kind, id(value))


def _short(value: Any) -> str:
    return repr(value)[:40]


def _count(value: Any) -> str:
    return str(len(value)) if isinstance(value, list) else f"no list of ({type(value).__name__})"


__all__ = ["AnswerCheck", "CloudRow"]
