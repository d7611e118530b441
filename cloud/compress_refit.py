"""Smaller scikit-learn models for the compression guard: pruned forests and distilled boosters.

Both start from the fitted pipeline and keep its pre-processing step; only the estimator changes.

* :func:`pruned_forest` — a random forest's first ``k`` trees are themselves a random forest
  (trees are independent draws), so fewer trees need no refit: the per-tree outputs on the
  *validation* rows are computed once and averaged cumulatively, which scores every ``k`` at
  once. The forest is also refitted with larger leaves (:data:`LEAF_SIZES`), which shrinks
  every tree; each refit is screened the same way. The
  smallest forest (by node count) whose validation metric stays within the tolerance of the
  original's wins. Validation rows, not the test rows the guard judges on, choose it: picking
  ``k`` on the test split would grade the choice on the rows that made it.
* :func:`distilled` — a HistGradientBoosting model fitted to the forest's own predictions on the
  training rows (labels for classifiers, values for regressors): a few thousand leaves in place
  of a forest's hundreds of thousands, when it keeps the forest's accuracy.

Either returns the new pipeline and a one-line description; the guard exports it through the
same parity gate as the original and judges it on the test rows like every other candidate.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import clone, is_classifier
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from hybridml.shared.schema import InputSchema

from . import metrics
from .quantize import metric_drop, score
from .threshold import Decision

log = logging.getLogger("hybridml.cloud.compress_refit")

FORESTS = (RandomForestClassifier, RandomForestRegressor)
LEAF_SIZES = (4, 16)
MIN_TREES = 5
# Early stopping keeps a multiclass student (one tree per class per round) from growing
# rounds that no longer help: on digits it stops near 60 of 100.
DISTILL_PARAMS: dict[str, Any] = {"max_iter": 100, "max_leaf_nodes": 31, "learning_rate": 0.1,
                                  "early_stopping": True, "n_iter_no_change": 5}


@dataclass(frozen=True)
class Refit:
    """What the refit candidates need: the fitted pipeline, its rows, and the export gate.

    ``export`` turns a fitted pipeline into the ONNX bytes that ship (export, decision
    threshold, parity gate) and raises when the gate fails; ``x_*`` are the combined arrays the
    pipeline is fitted on (:func:`hybridml.cloud.models.combine`).
    """

    pipe: Pipeline
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    export: Callable[[Pipeline], bytes]
    seed: int = 0


class Skip(Exception):
    """This refit does not apply to the model; the message says why."""


def family_of(pipe: Pipeline) -> str:
    """The :mod:`hybridml.cloud.models` family name of a refitted pipeline's estimator."""
    est = pipe.steps[-1][1]
    return "hgb" if isinstance(est, (HistGradientBoostingClassifier,
                                     HistGradientBoostingRegressor)) else "rf"


def is_forest(pipe: Pipeline) -> bool:
    """Whether the pipeline's estimator is a plain (uncalibrated) random forest."""
    return isinstance(pipe.steps[-1][1], FORESTS)


def pruned_forest(r: Refit, task: str, tolerance: float) -> tuple[Pipeline, str]:
    """The smallest forest within ``tolerance`` on the validation rows; raises :class:`Skip`.

    ``tolerance`` is the guard's (absolute accuracy drop, or relative RMSE rise).
    """
    est = r.pipe.steps[-1][1]
    if not isinstance(est, FORESTS):
        raise Skip(f"{type(est).__name__} is not a forest")
    if len(r.y_val) == 0:
        raise Skip("no validation rows to choose the number of trees on")
    pre = r.pipe.steps[0][1]
    xt_val = pre.transform(r.x_val)
    metric_base = _cumulative_metrics(est, xt_val, r.y_val, task)[-1]
    options = [(est, "")]
    xt_train = pre.transform(r.x_train)
    for leaf in LEAF_SIZES:
        if leaf > int(est.min_samples_leaf):
            big = clone(est).set_params(min_samples_leaf=leaf)
            options.append((big.fit(xt_train, r.y_train), f", min_samples_leaf {leaf}"))
    best: tuple[int, Any, int, str] | None = None  # (nodes, forest, k, note)
    for forest, note in options:
        k = _fewest_trees(forest, xt_val, r.y_val, task, tolerance, metric_base)
        if k is None:
            continue
        nodes = sum(t.tree_.node_count for t in forest.estimators_[:k])
        if best is None or nodes < best[0]:
            best = (nodes, forest, k, note)
    total = sum(t.tree_.node_count for t in est.estimators_)
    if best is None or best[0] >= total:
        raise Skip("no smaller forest stays within tolerance on the validation rows")
    nodes, forest, k, note = best
    small = copy.copy(forest)
    small.estimators_ = list(forest.estimators_[:k])
    small.n_estimators = k
    out = Pipeline([*r.pipe.steps[:-1], (r.pipe.steps[-1][0], small)])
    return out, f"{k} of {len(est.estimators_)} trees{note}; {nodes:,} of {total:,} nodes"


def distilled(r: Refit, task: str) -> tuple[Pipeline, str]:
    """A HistGradientBoosting model fitted to the forest's predictions on the training rows."""
    est = r.pipe.steps[-1][1]
    pre = r.pipe.steps[0][1]
    xt = pre.transform(r.x_train)
    target = est.predict(xt)
    if is_classifier(est):
        if len(np.unique(target)) != len(est.classes_):
            raise Skip("the forest predicts only some classes on the training rows")
        student: Any = HistGradientBoostingClassifier(random_state=r.seed, **DISTILL_PARAMS)
    else:
        student = HistGradientBoostingRegressor(random_state=r.seed, **DISTILL_PARAMS)
    with threadpool_limits(1):  # OpenMP threads on a busy small machine: 20x slower here
        student.fit(xt, target)
    out = Pipeline([*r.pipe.steps[:-1], (r.pipe.steps[-1][0], student)])
    return out, (f"hgb (max_iter {student.n_iter_}, max_leaf_nodes "
                 f"{DISTILL_PARAMS['max_leaf_nodes']}) fitted to {type(est).__name__}'s "
                 "predictions on the training rows")


def _per_tree(forest: Any, xt: np.ndarray, task: str) -> np.ndarray:
    """``[k, n, C]`` probabilities (classifiers) or ``[k, n]`` values, one slice per tree."""
    if task == "regression":
        return np.stack([t.predict(xt) for t in forest.estimators_])
    return np.stack([t.predict_proba(xt) for t in forest.estimators_])


def _cumulative_metrics(forest: Any, xt: np.ndarray, y: np.ndarray, task: str) -> list[float]:
    """The validation metric of the first ``k`` trees, for ``k = 1..n``."""
    per = _per_tree(forest, xt, task)
    cum = np.cumsum(per, axis=0)
    out = []
    for k in range(1, len(per) + 1):
        avg = cum[k - 1] / k
        pred = avg if task == "regression" else np.argmax(avg, axis=1)
        out.append(score(task, y, pred))
    return out


def _fewest_trees(forest: Any, xt: np.ndarray, y: np.ndarray, task: str, tolerance: float,
                  base: float) -> int | None:
    metric = metrics.PRIMARY[task]
    values = _cumulative_metrics(forest, xt, y, task)
    for k in range(min(MIN_TREES, len(values)), len(values) + 1):
        drop = metric_drop(metric, base, values[k - 1])
        if drop is not None and drop <= tolerance + 1e-12:
            return k
    return None


def exporter(schema: InputSchema, task: str, num: np.ndarray, cat: np.ndarray,
             decision: Decision | None, positive: int) -> Callable[[Pipeline], bytes]:
    """The export gate a refitted pipeline passes, as the original did in training: ONNX
    export, the decision threshold, then the parity check on the same rows."""
    from .export import check_parity, export_onnx
    from .threshold import add_threshold

    def gate(pipe: Pipeline) -> bytes:
        data = export_onnx(pipe, schema, task)
        if decision is not None:
            data = add_threshold(data, decision.threshold, decision.index)
        check_parity(pipe, data, schema, task, num, cat,
                     threshold=decision.threshold if decision else None, positive=positive)
        return data

    return gate
