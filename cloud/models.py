"""Model families: scikit-learn pipelines that take the schema's ``num`` and ``cat`` blocks.

Every pipeline is ``Pipeline([("pre", ColumnTransformer(...)), ("est", estimator)])`` fitted on
one object array whose first ``n_num`` columns are the numeric features (float, NaN = missing)
and whose last ``n_cat`` columns are the categorical ones (str, ``""`` = missing). The ONNX
export maps those columns back onto the two graph inputs, so the graph takes raw values.

Tree models skip scaling: it changes nothing for them and float32 scaling can flip a split.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from hybridml.shared.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """A model family: how to build its estimator, and what it supports."""

    name: str
    classifier: Callable[..., BaseEstimator]
    regressor: Callable[..., BaseEstimator]
    scale: bool
    finetune: bool  # has partial_fit (the others continue by warm start: cloud.finetune)
    defaults: Mapping[str, Any]
    description: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("logreg", LogisticRegression, Ridge, True, False, {"max_iter": 1000},
               "logistic regression (ridge for regression); retrained, never fine-tuned"),
        Family("rf", RandomForestClassifier, RandomForestRegressor, False, False,
               {"n_estimators": 100, "n_jobs": 1}, "random forest; fine-tuned by added trees"),
        Family("gb", GradientBoostingClassifier, GradientBoostingRegressor, False, False,
               {"n_estimators": 100}, "gradient boosting; fine-tuned by added rounds"),
        Family("hgb", HistGradientBoostingClassifier, HistGradientBoostingRegressor, False,
               False, {"max_iter": 100},
               "histogram gradient boosting; fine-tuned by added rounds"),
        Family("mlp", MLPClassifier, MLPRegressor, True, True,
               {"hidden_layer_sizes": (128, 64), "max_iter": 500},
               "multi-layer perceptron; fine-tuned by partial_fit"),
        Family("sgd", SGDClassifier, SGDRegressor, True, True,
               {"max_iter": 1000, "tol": 1e-3},
               "linear model trained by SGD; fine-tuned by partial_fit"),
    )
}
# Estimators whose constructor takes no random_state.
_NO_SEED = {Ridge}
# SGDClassifier needs a probabilistic loss for predict_proba.
_CLASSIFIER_EXTRA = {"sgd": {"loss": "log_loss"}}


def family(name: str) -> Family:
    """Return the family called ``name`` or raise :class:`ConfigError` listing the choices."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; choose one of {', '.join(sorted(FAMILIES))}",
            field="model") from None


def build_pipeline(name: str, task: str, n_num: int, n_cat: int, seed: int,
                   params: Mapping[str, Any] | None = None) -> Pipeline:
    """Build an unfitted pipeline for ``task`` over ``n_num`` numeric and ``n_cat`` categoricals."""
    fam = family(name)
    is_clf = task != "regression"
    ctor = fam.classifier if is_clf else fam.regressor
    kwargs: dict[str, Any] = dict(fam.defaults)
    if ctor in (Ridge,):
        kwargs = {}
    if is_clf:
        kwargs.update(_CLASSIFIER_EXTRA.get(name, {}))
    kwargs.update(params or {})
    if ctor not in _NO_SEED:
        kwargs.setdefault("random_state", seed)
    try:
        est = ctor(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad parameter for {name}: {exc}", field="params") from exc
    steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median"))]
    if fam.scale:
        steps.append(("scale", StandardScaler()))
    transformers: list[tuple[str, Any, list[int]]] = []
    if n_num:
        transformers.append(("num", Pipeline(steps), list(range(n_num))))
    if n_cat:
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                             list(range(n_num, n_num + n_cat))))
    pre = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0)
    return Pipeline([("pre", pre), ("est", est)])


def combine(num: np.ndarray, cat: np.ndarray) -> np.ndarray:
    """Join the ``num`` and ``cat`` blocks into the object array the pipelines are fitted on."""
    out = np.empty((num.shape[0], num.shape[1] + cat.shape[1]), dtype=object)
    out[:, : num.shape[1]] = num.astype(np.float64)
    out[:, num.shape[1]:] = cat
    return out
