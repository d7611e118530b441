"""Task metrics, computed with numpy alone so every side scores models the same way."""

from __future__ import annotations

import math

import numpy as np

# The metric the accuracy guard and the model table use for each task.
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


def scores(task: str, y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """All metrics for ``task`` (rounded to 6 digits for stable JSON)."""
    if task == "regression":
        out = {"rmse": rmse(y, pred), "mae": mae(y, pred), "r2": r2(y, pred)}
    else:
        out = {"accuracy": accuracy(y, pred), "balanced_accuracy": balanced_accuracy(y, pred),
               "f1_macro": macro_f1(y, pred)}
    return {k: round(v, 6) for k, v in out.items()}


def primary(task: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The task's primary metric (see :data:`PRIMARY`)."""
    return scores(task, y, pred)[PRIMARY[task]]
