"""The reference profile a version ships with (``manifest["profile"]``, format 1).

Inputs are profiled on the training split; the shipped model's outputs and the permutation
importance of each feature on the held-out rows (validation and test splits, which the model
never trained on), so a device compares what it sees with what the same model saw
(docs/monitoring.md §1). The format is parsed and the bins are assigned by
:mod:`hybridml.shared.reference`; this module chooses the edges and categories and measures
the proportions with those same functions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from sklearn.inspection import permutation_importance as _sk_permutation_importance
from threadpoolctl import threadpool_limits

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import DataError
from hybridml.shared.reference import FORMAT, ColumnProfile, Profile, float32_json
from hybridml.shared.schema import CATEGORICAL, MISSING_CATEGORY, NUMERIC, InputSchema

from . import metrics
from .data import Dataset, Split
from .models import combine

log = logging.getLogger("hybridml.cloud.profile")

# Numeric edges are the deciles (at most 11 edges: 10 inner bins), or fewer quantiles for a
# small reference: the reference's own sampling noise adds ~(bins - 1) / values to every PSI
# (0.09 for 10 bins of 120 values: the warn line), so each inner bin gets 30 values or more.
MAX_BINS = 10
VALUES_PER_BIN = 30
MAX_CATEGORIES = 50
# Shuffles per feature: with 3 the top-3 features of the orders models (120 held-out rows)
# were the same for 10 seeds out of 10 (1 shuffle: 9 of 10). Wide data gets fewer (digits'
# 64 pixels: one each), and at most IMPORTANCE_ROWS held-out rows are scored, so the cost is
# bounded by ~64 predictions of 2,000 rows whatever the data.
REPEATS = 3
MAX_SHUFFLES = 64
IMPORTANCE_ROWS = 2000


class Predictor(Protocol):
    """What permutation importance scores: ``predict`` on ``combine(num, cat)`` rows, giving
    class indices or values (a fitted pipeline of :mod:`hybridml.cloud.models`, or
    :class:`ShippedModel`)."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class ShippedModel:
    """The shipped ONNX model behind the pipelines' ``predict(combine(num, cat))``: scoring
    it is what the device runs, and 20-30x faster than the pipeline on small held-out sets
    (late/rf: 13 ms instead of 270 ms), with the same importances."""

    def __init__(self, model: bytes, schema: InputSchema, task: str) -> None:
        self.schema = schema
        self.session = ModelSession(model, schema, task)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices or values for rows of the combined object array."""
        n = self.schema.n_numeric
        out = self.session.run(self.schema.encode_blocks(x[:, :n].astype(np.float32),
                                                         x[:, n:]))
        pred = out.values if out.values is not None else out.labels
        assert pred is not None  # a session answers values or labels
        return pred

    def fit(self, x: np.ndarray, y: np.ndarray) -> ShippedModel:
        """Refused: the model is fitted and exported (scikit-learn's parameter check asks
        for an estimator with ``fit``; permutation importance never calls it)."""
        raise TypeError("a shipped ONNX model cannot be refitted; train a new version")


def version_profile(model: bytes, schema: InputSchema, ds: Dataset, sp: Split,
                    seed: int) -> dict[str, Any]:
    """The profile of a trained version: the training split's inputs; the outputs of the
    shipped ONNX ``model`` and its permutation importance on the held-out rows."""
    train_num, train_cat, _ = ds.take(sp.train)
    num, cat, y = ds.take(np.concatenate([sp.validation, sp.test]))
    shipped = ShippedModel(model, schema, ds.task)
    out = shipped.session.run(schema.encode_blocks(num, cat))
    predictions = out.values if out.values is not None else out.labels
    assert predictions is not None
    importance = permutation_importance(shipped, num, cat, y, ds.task, seed,
                                        names=[*schema.numeric_names, *schema.categorical_names])
    return reference_profile(schema, train_num, train_cat, predictions=predictions,
                             probabilities=out.probabilities, classes=ds.classes, task=ds.task,
                             importance=importance)


def reference_profile(schema: InputSchema, train_num: np.ndarray, train_cat: np.ndarray, *,
                      predictions: np.ndarray, probabilities: np.ndarray | None,
                      classes: Sequence[Any] | None, task: str,
                      importance: dict[str, float]) -> dict[str, Any]:
    """The format-1 profile: per-feature bins of the training blocks, the model's
    ``predictions`` (class indices for classifiers, values for regression) and, for
    classifiers, its confidence (the top of ``probabilities``) on held-out rows."""
    features: list[ColumnProfile] = []
    for j, name in enumerate(schema.numeric_names):
        features.append(numeric_profile(name, train_num[:, j]))
    for j, name in enumerate(schema.categorical_names):
        features.append(categorical_profile(name, train_cat[:, j]))
    by_name = {f.name: f for f in features}
    confidence = None
    if task == "regression":
        preds = numeric_profile("predictions", np.asarray(predictions, dtype=np.float32))
    else:
        if classes is None or probabilities is None:
            raise DataError("a classifier's profile needs its classes and probabilities",
                            field="classes")
        preds = class_profile([str(c) for c in classes], np.asarray(predictions))
        confidence = numeric_profile("confidence", np.max(probabilities, axis=1))
    prof = Profile(int(train_num.shape[0]), tuple(by_name[n] for n in schema.names), preds,
                   confidence, {n: float(importance.get(n, 0.0)) for n in schema.names})
    return prof.to_json()


def numeric_profile(name: str, values: np.ndarray) -> ColumnProfile:
    """Bins of the non-missing values (docs/monitoring.md §1).

    Edges: the deduplicated quantiles 0, 1/k, ..., 1 (each edge a reference value: numpy's
    ``lower`` quantile) with k = 10 (deciles), or one bin per :data:`VALUES_PER_BIN` values
    for fewer than 300; a constant column gets the value and the next float32 above it, so
    its one inner bin holds exactly that value; a column with no values gets no edges and
    one bin. Proportions: inner bins ``count / (n + 2)``, each overflow bin ``1 / (n + 2)``
    — a new value falls below the least (or above the greatest) of n values with chance
    1/(n + 1), not 0; with a zero there, PSI flooring makes every value past a small
    reference's range an alarm (the orders model's confidence, 120 held-out values: 66% of
    stable windows in alert).
    """
    col = np.asarray(values, dtype=np.float32)
    ok = col[~np.isnan(col)]
    missing = (col.size - ok.size) / col.size if col.size else 0.0
    if not ok.size:
        return ColumnProfile(name, NUMERIC, np.ones(1), missing)
    k = int(np.clip(ok.size // VALUES_PER_BIN, 1, MAX_BINS))
    quantiles = np.linspace(0.0, 1.0, k + 1)
    edges = np.unique(np.quantile(ok, quantiles, method="lower")).astype(np.float32)
    if edges.size == 1:
        edges = np.array([edges[0], np.nextafter(edges[0], np.float32(np.inf))], np.float32)
    # Written as the shortest decimals that read back as these float32 values.
    edges = np.array([float32_json(e) for e in edges], dtype=np.float32)
    shell = ColumnProfile(name, NUMERIC, np.ones(edges.size + 1), missing, edges)
    counts = shell.tally(ok).counts.astype(np.float64)  # the overflow bins are empty here
    counts[0] += 1.0
    counts[-1] += 1.0
    return ColumnProfile(name, NUMERIC, counts / counts.sum(), missing, edges)


def categorical_profile(name: str, values: np.ndarray) -> ColumnProfile:
    """The :data:`MAX_CATEGORIES` most frequent values (ties: alphabetical), most frequent
    first, plus "other"; ``""`` (missing) is a category like any other."""
    texts = np.asarray(values, dtype=object).astype(str)
    uniq, counts = np.unique(texts, return_counts=True)
    order = np.lexsort((uniq, -counts))[:MAX_CATEGORIES]  # by count, then by text
    cats = tuple(str(uniq[i]) for i in order)
    n = texts.size
    props = np.append(counts[order], counts.sum() - counts[order].sum()) / max(n, 1)
    missing = float(counts[uniq == MISSING_CATEGORY].sum()) / n if n else 0.0
    return ColumnProfile(name, CATEGORICAL, props if n else _other_only(len(cats)), missing,
                         categories=cats)


def class_profile(names: Sequence[str], labels: np.ndarray) -> ColumnProfile:
    """Predicted classes over the class names in the model's class order (so a label index
    is its bin), with an always-empty "other"."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names) + 1)
    total = counts.sum()
    props = counts / total if total else _other_only(len(names))
    return ColumnProfile("predictions", CATEGORICAL, props.astype(np.float64),
                         categories=tuple(names))


def permutation_importance(model: Predictor, num: np.ndarray, cat: np.ndarray, y: np.ndarray,
                           task: str, seed: int, *, names: Sequence[str]) -> dict[str, float]:
    """Permutation importance of each feature (scikit-learn's, on ``combine(num, cat)``): the
    drop of the task's primary metric (:data:`hybridml.cloud.metrics.PRIMARY`, an RMSE rise
    for regression) when the feature's column is shuffled, clipped at 0 and normalised to sum
    to 1 (equal weights when no feature matters).

    ``model`` is a fitted pipeline or a :class:`ShippedModel`; ``names`` are the feature names
    in block order (numeric features, then categoricals).
    """
    width = num.shape[1] + cat.shape[1]
    if len(names) != width:
        raise DataError(f"{len(names)} names for {width} columns; pass the numeric names, "
                        "then the categorical ones", field="names")
    if not width:
        return {}
    if y.size < 2:  # nothing to shuffle: no feature can be told apart
        return {n: 1.0 / width for n in names}
    repeats = max(1, min(REPEATS, MAX_SHUFFLES // width))
    if y.size > IMPORTANCE_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(y.size, IMPORTANCE_ROWS,
                                                          replace=False))
        num, cat, y = num[keep], cat[keep], y[keep]
    metric = getattr(metrics, metrics.PRIMARY[task])
    sign = -1.0 if task == "regression" else 1.0  # scikit-learn maximises the score

    def score(est: Predictor, x: np.ndarray, y_true: np.ndarray) -> float:
        return sign * float(metric(y_true, est.predict(x)))

    # One OpenMP thread: on small held-out sets the threads' start-up dominates (a pipeline's
    # hgb on 600 rows, 2 cores: 140 ms a predict with 2 threads, 3 ms with one).
    with threadpool_limits(limits=1):
        result = _sk_permutation_importance(model, combine(num, cat), y, scoring=score,
                                            n_repeats=repeats, random_state=seed, n_jobs=1)
    drop = np.clip(np.asarray(result.importances_mean, dtype=np.float64), 0.0, None)
    total = float(drop.sum())
    weights = drop / total if total > 0 else np.full(width, 1.0 / width)
    return {n: float(w) for n, w in zip(names, weights)}


def _other_only(n_categories: int) -> np.ndarray:
    out = np.zeros(n_categories + 1)
    out[-1] = 1.0
    return out


__all__ = ["FORMAT", "MAX_BINS", "MAX_CATEGORIES", "VALUES_PER_BIN", "Predictor", "ShippedModel",
           "categorical_profile", "class_profile", "numeric_profile", "permutation_importance",
           "reference_profile", "version_profile"]
