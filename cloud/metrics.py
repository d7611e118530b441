"""Task metrics: every side scores models the same way.

The label metrics (accuracy, balanced accuracy, F1, RMSE, ...) take only numpy; those of the
probabilities (ROC-AUC, PR-AUC, Brier) and the confusion matrix are scikit-learn's (cloud side).
A classifier's primary metric is :data:`PRIMARY`'s unless the version chose another
(``--primary``, recorded in ``manifest["metrics"]["primary"]``): :func:`primary_name`.

A binary task's **positive class** (the one F1, PR-AUC, the decision threshold and fairness
selection rates are about) is its minority class on the training rows: :func:`positive_index`
is the one rule, decided once by ``train`` and recorded as ``manifest["metrics"]["positive"]``
(the class name); :func:`positive_of` reads it back (``classes[1]`` for versions from before).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybridml.shared.errors import ConfigError
from hybridml.shared.manifest import positive_class

from .quality import PRIMARIES

# The metric the accuracy guard and the model table use for each task, unless chosen.
PRIMARY = {"binary": "balanced_accuracy", "multiclass": "accuracy", "regression": "rmse"}


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Share of rows whose predicted class index equals the true one."""
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else 0.0


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``y``."""
    y, pred = np.asarray(y), np.asarray(pred)
    recalls = [float(np.mean(pred[y == c] == c)) for c in np.unique(y)]
    return float(np.mean(recalls)) if recalls else 0.0


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    """Root mean squared error."""
    d = np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64).reshape(-1)
    return float(math.sqrt(np.mean(d * d))) if d.size else 0.0


def mae(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean absolute error."""
    d = np.asarray(y, dtype=np.float64) - np.asarray(pred, dtype=np.float64).reshape(-1)
    return float(np.mean(np.abs(d))) if d.size else 0.0


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination (1.0 is perfect; 0.0 is predicting the mean)."""
    y = np.asarray(y, dtype=np.float64)
    ss_res = float(np.sum((y - np.asarray(pred, dtype=np.float64).reshape(-1)) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over classes present in ``y`` or ``pred``."""
    y, pred = np.asarray(y), np.asarray(pred)
    scores = []
    for c in np.union1d(np.unique(y), np.unique(pred)):
        tp = float(np.sum((pred == c) & (y == c)))
        fp = float(np.sum((pred == c) & (y != c)))
        fn = float(np.sum((pred != c) & (y == c)))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def positive_index(counts: Sequence[int] | np.ndarray) -> int:
    """The positive class of a binary task from its training rows per class (``counts[i]``:
    rows of class index ``i``): the class with fewer rows, the minority; a tie gives 1.

    Classes are sorted by name, so ``classes[1]`` is an accident of spelling ("legit" sorts
    after "fraud"); the minority is the class people look for. Raises :class:`ConfigError`
    unless there are exactly two counts.
    """
    c = [int(n) for n in counts]
    if len(c) != 2:
        raise ConfigError(f"the positive class is defined for binary tasks; got {len(c)} class "
                          "counts: pass the two classes' training row counts",
                          field="positive")
    return 0 if c[0] < c[1] else 1


def positive_of(manifest: Mapping[str, Any]) -> str | None:
    """The positive class a binary version recorded (``manifest["metrics"]["positive"]``);
    ``classes[1]`` for a version from before the rule; None for other tasks
    (:func:`hybridml.shared.manifest.positive_class`, the one reading of it)."""
    return positive_class(manifest)


def positive_index_of(manifest: Mapping[str, Any]) -> int | None:
    """The index in ``manifest["output"]["classes"]`` of :func:`positive_of` (None when the
    version is not binary). Raises :class:`ConfigError` when the recorded name is not one of
    the classes."""
    name = positive_of(manifest)
    if name is None:
        return None
    names = [str(c) for c in manifest["output"]["classes"]]
    if name not in names:
        raise ConfigError(f"manifest positive class {name!r} is not one of the classes "
                          f"{names}; re-register the version with metrics.positive set to one "
                          "of them", field="positive")
    return names.index(name)


def f1(task: str, y: np.ndarray, pred: np.ndarray, positive: int = 1) -> float:
    """Binary: F1 of the positive class (index ``positive``; 1 for callers from before the
    minority rule); multiclass: :func:`macro_f1`."""
    if task != "binary":
        return macro_f1(y, pred)
    y, pred = np.asarray(y), np.asarray(pred)
    tp = float(np.sum((pred == positive) & (y == positive)))
    wrong = float(np.sum(pred != y))
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def scores(task: str, y: np.ndarray, pred: np.ndarray, proba: np.ndarray | None = None,
           classes: Sequence[Any] | None = None, positive: int = 1) -> dict[str, Any]:
    """All metrics for ``task`` (rounded to 6 digits for stable JSON).

    For classifiers, ``y`` and ``pred`` are class indices (``pred`` at the decision threshold);
    with ``proba`` (one column per class) the block adds ``roc_auc``, ``pr_auc`` (binary) and
    ``brier``, and it always has ``f1`` and ``confusion`` (labelled by ``classes``' names).
    Binary ``f1``, ``pr_auc``, ``roc_auc`` and ``brier`` are of the class index ``positive``
    (:func:`positive_index`; 1, ``classes[1]``, for callers from before); the confusion matrix
    covers every class. A metric the test rows cannot define (one class only) is None.
    """
    if task == "regression":
        out: dict[str, Any] = {"rmse": rmse(y, pred), "mae": mae(y, pred), "r2": r2(y, pred)}
    else:
        out = {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred),
               "f1_macro": macro_f1(y, pred), "f1": f1(task, y, pred, positive)}
        if proba is not None:
            out.update(_probability_scores(task, np.asarray(y), np.asarray(proba), positive))
    rounded: dict[str, Any] = {k: None if v is None else round(v, 6) for k, v in out.items()}
    if task != "regression":
        rounded["confusion"] = confusion(y, pred, classes)
    return rounded


def confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[Any] | None = None
              ) -> dict[str, Any]:
    """``{"labels": [class names], "matrix": [[...]]}``: rows true, columns predicted."""
    from sklearn.metrics import confusion_matrix

    y, pred = np.asarray(y, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    n = len(classes) if classes is not None else \
        int(max(y.max(initial=-1), pred.max(initial=-1))) + 1
    names = [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
    matrix = confusion_matrix(y, pred, labels=list(range(n))) if len(y) else np.zeros((n, n))
    return {"labels": names, "matrix": [[int(v) for v in row] for row in matrix]}


def auc_text(block: Mapping[str, Any], positive: str | None = None) -> str:
    """``ROC-AUC 0.866  PR-AUC 0.412`` from a metric block (empty without them); with the
    binary task's ``positive`` class name, ``PR-AUC of fraud 0.412``."""
    pr = "PR-AUC" if positive is None else f"PR-AUC of {positive}"
    parts = [f"{label} {block[key]:.3f}" for key, label in (("roc_auc", "ROC-AUC"),
                                                            ("pr_auc", pr))
             if block.get(key) is not None]
    return "  ".join(parts)


def primary_name(task: str, chosen: str | None = None) -> str:
    """The primary metric of a version of ``task``: ``chosen`` (a classifier's
    ``--primary``) or :data:`PRIMARY`'s."""
    if chosen is None or task == "regression":
        return PRIMARY[task]
    if chosen not in PRIMARIES:
        raise ConfigError(f"primary metric {chosen!r}: use one of {', '.join(PRIMARIES)}",
                          field="primary")
    return chosen


def primary_of(manifest: Mapping[str, Any]) -> str:
    """The primary metric a registered version recorded (:data:`PRIMARY`'s when older)."""
    task = str(manifest["output"]["task"])
    return primary_name(task, (manifest.get("metrics") or {}).get("primary"))


def primary(task: str, y: np.ndarray, pred: np.ndarray, name: str | None = None,
            positive: int = 1) -> float:
    """The primary metric ``name`` (None: the task's, see :data:`PRIMARY`), rounded as in
    :func:`scores`. Labels may be class indices or names (``f1`` needs indices, and is of the
    class index ``positive`` for a binary task)."""
    metric = primary_name(task, name)
    if metric == "f1":
        return round(f1(task, y, pred, positive), 6)
    fn = {"accuracy": accuracy, "balanced_accuracy": balanced_accuracy, "rmse": rmse}[metric]
    return round(fn(y, pred), 6)


def brier(y: np.ndarray, proba: np.ndarray, positive: int = 1) -> float:
    """The Brier score of class-index labels ``y`` and probabilities ``proba`` (``[N, C]``):
    binary, of the positive class (index ``positive``) alone, ``mean((p_pos - [y == pos])^2)``
    (the same number for either class when the two columns sum to 1); multiclass, the mean
    over the classes of each one-vs-rest score."""
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if p.shape[1] == 2:
        return float(np.mean((p[:, positive] - (y == positive)) ** 2))
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean((p - onehot) ** 2))


def _probability_scores(task: str, y: np.ndarray, proba: np.ndarray, positive: int = 1
                        ) -> dict[str, float | None]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    n = proba.shape[1]
    # float32 model outputs: rows sum to 1 only within rounding, which roc_auc_score checks.
    proba = proba.astype(np.float64) / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)
    out: dict[str, float | None] = {"roc_auc": None, "brier": brier(y, proba, positive)}
    if task == "binary":
        out["pr_auc"] = None
        if len(np.unique(y)) == 2:
            hit = (np.asarray(y) == positive).astype(np.int64)
            out["roc_auc"] = float(roc_auc_score(hit, proba[:, positive]))
            out["pr_auc"] = float(average_precision_score(hit, proba[:, positive]))
    elif len(np.unique(y)) == n:
        out["roc_auc"] = float(roc_auc_score(y, proba, multi_class="ovr", average="macro",
                                             labels=list(range(n))))
    return out
