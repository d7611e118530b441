"""Class imbalance: detect it on the training rows and weight the classes (docs/quality.md §1).

:func:`detect` counts the classes; a task is imbalanced when its smallest class has under
:func:`hybridml.cloud.quality.imbalance_limit` of the training rows (20% for a binary task,
20% x 2/K for K classes: :func:`hybridml.cloud.quality.is_imbalanced`). :func:`prepare`
resolves ``--class-weight auto|balanced|none`` and sets up a :class:`Balancing` for the
pipeline:

* ``class_weight``: the estimator's own ``class_weight="balanced"`` (logreg, rf, hgb, sgd;
  sgd gets the equivalent per-class dict, which ``partial_fit`` accepts, so a fine-tune of it
  keeps working);
* ``sample_weight``: ``compute_sample_weight("balanced", y)`` passed to ``fit`` where the
  estimator's ``fit`` has the parameter (gb; mlp from scikit-learn 1.7 on, where
  ``MLPClassifier.fit`` takes ``sample_weight``: better than over-sampling on the fraud data,
  balanced accuracy 0.652 against 0.612);
* ``oversampling``: balanced random over-sampling of the training rows, seeded: the fallback
  where ``fit`` has no ``sample_weight`` (mlp before scikit-learn 1.7).

The record is ``manifest["training"]["imbalance"]``. Regression has none, and asking it for
``balanced`` is a :class:`ConfigError`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
from sklearn.utils.validation import has_fit_parameter

from hybridml.shared.errors import ConfigError

from . import calibration
from .quality import is_imbalanced

log = logging.getLogger("hybridml.cloud.imbalance")

# Families without class_weight whose fit may lack sample_weight (scikit-learn < 1.7):
# sample weights when the installed fit has them, else over-sampling (see the module doc).
_SAMPLE_WEIGHT_OR_OVERSAMPLED = frozenset({"mlp"})
# Families whose class_weight must be a dict: SGDClassifier.partial_fit refuses "balanced".
_DICT_WEIGHTS = frozenset({"sgd"})


@dataclass(frozen=True)
class ClassCounts:
    """How many training rows each class has, by class name."""

    counts: dict[str, int]

    @property
    def total(self) -> int:
        """The number of training rows."""
        return sum(self.counts.values())

    @property
    def minority(self) -> str:
        """The smallest class's name (the first of them on a tie)."""
        return min(self.counts, key=lambda c: self.counts[c])

    @property
    def minority_share(self) -> float:
        """The smallest class's share of the training rows."""
        return self.counts[self.minority] / self.total if self.total else 0.0

    @property
    def imbalanced(self) -> bool:
        """True when the smallest class has under
        :func:`~hybridml.cloud.quality.imbalance_limit` of the rows (one definition:
        :func:`~hybridml.cloud.quality.is_imbalanced`)."""
        return is_imbalanced(list(self.counts.values()))

    def describe(self) -> str:
        """One line for people: ``fraud is 3.1% of 3,600 training rows``."""
        return (f"{self.minority} is {self.minority_share:.1%} of {self.total:,} training "
                "rows")


def detect(y: np.ndarray, classes: Sequence[Any]) -> ClassCounts:
    """Count the training labels ``y`` (indices into ``classes``) per class name."""
    found = np.bincount(np.asarray(y, dtype=np.int64), minlength=len(classes))
    return ClassCounts({str(c): int(n) for c, n in zip(classes, found)})


@dataclass
class Balancing:
    """How one fit is balanced: call :meth:`fit` instead of ``pipe.fit``."""

    record: dict[str, Any] | None
    how: str = "none"
    seed: int = 0
    fit_params: dict[str, Any] = field(default_factory=dict)

    def fit(self, pipe: Pipeline, x: np.ndarray, y: np.ndarray) -> Pipeline:
        """Fit ``pipe`` on ``x``, ``y`` with the weights or resampling chosen."""
        if self.how == "sample_weight":
            return pipe.fit(x, y, est__sample_weight=compute_sample_weight("balanced", y))
        if self.how == "oversampling":
            rows = oversample(y, self.seed)
            return pipe.fit(x[rows], y[rows])
        return pipe.fit(x, y)


def prepare(pipe: Pipeline, family_name: str, task: str, y: np.ndarray,
            classes: Sequence[Any] | None, requested: str, seed: int,
            say: Callable[[str], None] = lambda _m: None) -> Balancing:
    """Resolve ``requested`` (``auto``, ``balanced`` or ``none``) for the training labels
    ``y`` and set the estimator's ``class_weight`` (always, so a parameter inherited from the
    line's base version never overrides the resolution); tell ``say`` when the task is
    imbalanced."""
    if task == "regression" or classes is None:
        if requested == "balanced":
            raise ConfigError("--class-weight balanced is for classification; this task is "
                              "regression: drop the flag or use --class-weight none",
                              field="class_weight")
        return Balancing(None)
    counts = detect(y, classes)
    resolved = requested if requested != "auto" else \
        ("balanced" if counts.imbalanced else "none")
    how = "none"
    if resolved == "balanced":
        how = _method(pipe, family_name)
    weight: Any = None
    if how == "class_weight":
        weight = "balanced"
        if family_name in _DICT_WEIGHTS:
            present = np.unique(y)
            values = compute_class_weight("balanced", classes=present, y=y)
            weight = {int(c): float(w) for c, w in zip(present, values)}
    _set_class_weight(pipe, weight)
    record = {"counts": counts.counts, "minority_share": round(counts.minority_share, 6),
              "imbalanced": counts.imbalanced, "class_weight": resolved,
              "requested": requested, "how": how}
    line = summary(record)
    if line:
        say(line)
        log.info("%s", line)
    return Balancing(record, how, seed)


def summary(record: dict[str, Any] | None) -> str | None:
    """The line that tells people about an imbalanced task (None when it is not):
    ``imbalance: fraud is 3.1% of 4,200 training rows -> class_weight balanced (class_weight)``.
    """
    if not record or not record.get("imbalanced"):
        return None
    counts = ClassCounts({str(k): int(v) for k, v in record["counts"].items()})
    return (f"imbalance: {counts.describe()} -> class_weight {record['class_weight']} "
            f"({record['how']})")


def finetune_record(pipe: Pipeline, task: str, y: np.ndarray, classes: Sequence[Any] | None,
                    requested: str) -> dict[str, Any] | None:
    """The imbalance record of a fine-tune: the new rows are counted; the parent's estimator
    keeps its own ``class_weight``, and nothing else is applied."""
    if task == "regression" or classes is None:
        return None
    counts = detect(y, classes)
    kept = _class_weight(pipe)
    resolved = "balanced" if kept is not None else "none"
    return {"counts": counts.counts, "minority_share": round(counts.minority_share, 6),
            "imbalanced": counts.imbalanced, "class_weight": resolved,
            "requested": requested,
            "how": "class_weight (the parent's)" if kept is not None
            else "not applied (fine-tune)"}


def oversample(y: np.ndarray, seed: int) -> np.ndarray:
    """Row indices that give every class as many rows as the largest one: all of each
    class's rows, plus a seeded draw with replacement for the rest."""
    rng = np.random.default_rng(seed)
    present, sizes = np.unique(y, return_counts=True)
    target = int(sizes.max())
    parts = []
    for c, n in zip(present, sizes):
        idx = np.flatnonzero(y == c)
        parts.append(idx)
        if n < target:
            parts.append(rng.choice(idx, target - int(n), replace=True))
    return rng.permutation(np.concatenate(parts))


# -------------------------------------------------------------------------------- internals
def _weight_key(pipe: Pipeline) -> str | None:
    """The pipeline parameter holding the estimator's class_weight, when it has one (also
    inside a wrapper such as CalibratedClassifierCV)."""
    params = pipe.get_params(deep=True)
    for key in ("est__class_weight", "est__estimator__class_weight"):
        if key in params:
            return key
    return None


def _method(pipe: Pipeline, family_name: str) -> str:
    """``class_weight`` where the estimator has the parameter, else ``sample_weight`` where
    its ``fit`` takes it (the installed release's signature), else ``oversampling``."""
    est = pipe.named_steps["est"]
    if family_name in _SAMPLE_WEIGHT_OR_OVERSAMPLED:  # the family's own fit, not a wrapper's
        own = calibration.inner(est)
        return "sample_weight" if _fit_takes_sample_weight(own) else "oversampling"
    if _weight_key(pipe) is not None:
        return "class_weight"
    if has_fit_parameter(est, "sample_weight"):
        return "sample_weight"
    return "oversampling"


def _fit_takes_sample_weight(est: Any) -> bool:
    """True when ``est.fit`` has a ``sample_weight`` parameter (MLPClassifier: scikit-learn
    1.7 on)."""
    try:
        return "sample_weight" in inspect.signature(est.fit).parameters
    except (TypeError, ValueError):  # no signature to read: the safe fallback
        return False


def _set_class_weight(pipe: Pipeline, weight: Any) -> None:
    key = _weight_key(pipe)
    if key is not None:
        pipe.set_params(**{key: weight})


def _class_weight(pipe: Pipeline) -> Any:
    key = _weight_key(pipe)
    return pipe.get_params(deep=True)[key] if key is not None else None


__all__ = ["Balancing", "ClassCounts", "detect", "finetune_record", "oversample", "prepare",
           "summary"]
