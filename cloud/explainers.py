"""The device explainer: a fitted pipeline turned into plain arrays the edge explains rows with.

:func:`build` reads a fitted ``Pipeline([("pre", ColumnTransformer), ("est", estimator)])``
(:mod:`hybridml.cloud.models`) and writes an ``.npz`` of plain arrays (no pickle) that
:mod:`hybridml.edge.explain` evaluates with numpy alone (docs/quality.md §3):

* **linear** (logreg, sgd; Ridge and SGDRegressor for regression): exact contributions in the
  model's margin space, ``coef * (x - mean(background))`` per transformed column, centred on a
  background sample (shap's interventional linear values); the base value is the margin at the
  background mean.
* **tree_shap** (rf, gb, hgb): path-dependent TreeSHAP (Lundberg et al. 2020, Algorithm 2,
  with node cover counts). Each leaf's path is stored with its distinct features, their cover
  fractions ``z`` and the splits that decide whether a row follows the path (``o``); the edge
  evaluates the Shapley values of each leaf's product game, all leaves at once.
* mlp and calibrated models have none: the cloud explains them with shap.

Transformed columns (imputed and scaled numbers, one-hot categories) map back to the raw
column they came from, so attributions are per raw column.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import (
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge, SGDClassifier, SGDRegressor
from sklearn.pipeline import Pipeline

from hybridml.edge.explain import BUCKETS, FORMAT, MEDIA_TYPE
from hybridml.shared.errors import ConfigError
from hybridml.shared.schema import InputSchema

from .labelled import Labelled
from .metrics import positive_index_of
from .models import combine
from .registry import Registry

log = logging.getLogger("hybridml.cloud.explainers")

BACKGROUND_ROWS = 100  # rows of the holdout the linear base value is centred on
_LINEAR = (LogisticRegression, SGDClassifier, Ridge, SGDRegressor)
_TREES = (RandomForestClassifier, RandomForestRegressor, GradientBoostingClassifier,
          GradientBoostingRegressor, HistGradientBoostingClassifier,
          HistGradientBoostingRegressor)


@dataclass(frozen=True)
class DeviceExplainer:
    """A built explainer: the ``.npz`` bytes and the manifest's ``explain`` block."""

    data: bytes
    method: str
    space: str
    output: str

    def manifest_block(self) -> dict[str, str]:
        """``manifest["explain"]``: the method, the space and what attributions sum to."""
        return {"method": self.method, "space": self.space, "output": self.output}


def kind_of(est: Any) -> str | None:
    """The device method of an estimator: ``linear``, ``tree_shap``, or None."""
    if isinstance(est, _LINEAR):
        return "linear"
    return "tree_shap" if isinstance(est, _TREES) else None


def space_of(est: Any, task: str, n_classes: int) -> str:
    """The space attributions of ``est`` are in: the forest's averaged probabilities, else
    the margin (log-odds for binary, per-class logits or margins for multiclass, the value
    for regression)."""
    if task == "regression":
        return "raw"
    if isinstance(est, RandomForestClassifier):
        return "probability"
    return "log_odds" if n_classes == 2 else "raw"


def raw_columns(pipe: Pipeline, schema: InputSchema) -> np.ndarray:
    """For each column the estimator sees, the index of its raw column in ``schema.names``."""
    block = [*schema.numeric_names, *schema.categorical_names]
    where = {n: i for i, n in enumerate(schema.names)}
    return np.array([where[block[j]] for j in _columns(pipe, schema)["col_raw"]],
                    dtype=np.int64)


def unavailable(pipe: Pipeline) -> str | None:
    """Why ``pipe`` has no device explainer (the cloud explains it), or None if it has one."""
    est = pipe.named_steps["est"]
    if isinstance(est, CalibratedClassifierCV):
        return "a calibrated model's probabilities are not additive in its trees or weights"
    if isinstance(est, _LINEAR + _TREES):
        return None
    return f"{type(est).__name__} has no device explainer"


def build(pipe: Pipeline, schema: InputSchema, task: str, classes: Sequence[Any] | None,
          background: np.ndarray, positive: int = 1) -> DeviceExplainer | None:
    """The device explainer of the fitted ``pipe``; None (logged) where the family has none.

    ``background`` is the object array (:func:`hybridml.cloud.models.combine`) of the rows the
    linear base value is centred on; trees use their training covers instead. A binary model
    is explained for its ``positive`` class (``manifest["metrics"]["positive"]``'s index):
    scikit-learn's single margin or probability is that of ``classes[1]``, so for index 0 the
    model is mirrored (margins negated; a probability ``p`` becomes ``1 - p``), which mirrors
    every attribution and the base value exactly.
    """
    why = unavailable(pipe)
    if why is not None:
        log.info("no device explainer: %s", why)
        return None
    arrays: dict[str, np.ndarray] = _columns(pipe, schema)
    est = pipe.named_steps["est"]
    flip = task == "binary" and positive == 0
    if isinstance(est, _LINEAR):
        method = "linear"
        output, out_class = _linear(est, pipe, background, task, classes, arrays, flip)
    else:
        method = "tree_shap"
        output, out_class = _trees(est, task, classes, arrays, flip)
    space = space_of(est, task, len(classes or ()))
    arrays.update(format=np.array([FORMAT]), method=np.array(method), space=np.array(space),
                  output=np.array(output), out_class=np.asarray(out_class, dtype=np.int64))
    buf = io.BytesIO()
    np.savez_compressed(buf, allow_pickle=False, **arrays)
    return DeviceExplainer(buf.getvalue(), method, space, output)


def artifact_entry(sha256: str, size: int) -> dict[str, Any]:
    """The manifest's artifact entry of a stored explainer."""
    return {"role": "explainer", "sha256": sha256, "size": size, "media_type": MEDIA_TYPE}


# ------------------------------------------------------------------------------ columns
def _columns(pipe: Pipeline, schema: InputSchema) -> dict[str, np.ndarray]:
    """How raw values become the estimator's columns, and which raw column each one is."""
    pre = pipe.named_steps["pre"]
    n_num = schema.n_numeric
    out: dict[str, np.ndarray] = {
        "raw_names": np.array([*schema.numeric_names, *schema.categorical_names], dtype=str),
        "impute": np.zeros(n_num), "scale_mean": np.zeros(n_num), "scale": np.ones(n_num)}
    col_raw = list(range(n_num))
    for name, step, _cols in pre.transformers_:
        if name == "num":
            impute = step.named_steps["impute"]
            if len(impute.statistics_) != n_num or np.isnan(impute.statistics_).any():
                raise ConfigError("a numeric column was empty in training, so the imputer "
                                  "dropped it; drop the column (--drop) to get an explainer",
                                  field="explainer")
            out["impute"] = np.asarray(impute.statistics_, dtype=np.float64)
            if "scale" in step.named_steps:
                sc = step.named_steps["scale"]
                out["scale_mean"] = np.asarray(sc.mean_, dtype=np.float64)
                out["scale"] = np.asarray(sc.scale_, dtype=np.float64)
        elif name == "cat":
            for j, cats in enumerate(step.categories_):
                out[f"cats_{j}"] = np.array([str(c) for c in cats], dtype=str)
                col_raw.extend([n_num + j] * len(cats))
    out["col_raw"] = np.asarray(col_raw, dtype=np.int64)
    return out


def _positive(classes: Sequence[Any] | None, flip: bool) -> str:
    if classes is None or len(classes) < 2:
        return "the target"
    return str(classes[0] if flip else classes[1])


# ------------------------------------------------------------------------------- linear
def _linear(est: Any, pipe: Pipeline, background: np.ndarray, task: str,
            classes: Sequence[Any] | None, arrays: dict[str, np.ndarray], flip: bool
            ) -> tuple[str, list[int]]:
    sign = -1.0 if flip else 1.0  # log-odds of classes[0] = -(log-odds of classes[1])
    coef = sign * np.atleast_2d(np.asarray(est.coef_, dtype=np.float64))
    intercept = sign * np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64))
    bg = np.asarray(pipe.named_steps["pre"].transform(background), dtype=np.float64)
    arrays.update(coef=coef, intercept=intercept, bg_mean=bg.mean(axis=0))
    if task == "regression":
        return "the predicted value", [-1]
    if coef.shape[0] == 1:
        return f"the log-odds of class {_positive(classes, flip)!r}", [0 if flip else 1]
    how = "softmax logit" if isinstance(est, LogisticRegression) else "one-vs-rest margin"
    return f"the {how} of the predicted class", list(range(coef.shape[0]))


# -------------------------------------------------------------------------------- trees
@dataclass
class _Tree:
    """One tree as parallel node arrays; ``value`` is ``[nodes, K]`` in the output space."""

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    cover: np.ndarray
    value: np.ndarray


def _trees(est: Any, task: str, classes: Sequence[Any] | None,
           arrays: dict[str, np.ndarray], flip: bool) -> tuple[str, list[int]]:
    """Gather the trees in their output space (:func:`space_of`); returns what the
    attributions sum to and the explained classes. ``flip`` mirrors a binary model onto
    ``classes[0]`` (see :func:`build`)."""
    trees: list[_Tree] = []
    if isinstance(est, (RandomForestClassifier, RandomForestRegressor)):
        n = len(est.estimators_)
        for t in est.estimators_:
            v = np.asarray(t.tree_.value[:, 0, :], dtype=np.float64)
            if task != "regression":
                v = v / v.sum(axis=1, keepdims=True)
                if v.shape[1] == 2:  # binary: the positive class's probability
                    v = v[:, 1:]
            trees.append(_sk_tree(t.tree_, v / n))
        base = np.zeros(trees[0].value.shape[1])
        if task == "regression":
            output, out_class = "the predicted value", [-1]
        elif len(classes or ()) == 2:
            output = f"the probability of class {_positive(classes, flip)!r}"
            out_class = [0 if flip else 1]
        else:
            output = "the probability of the predicted class"
            out_class = list(range(len(classes or ())))
    elif isinstance(est, (GradientBoostingClassifier, GradientBoostingRegressor)):
        k = est.estimators_.shape[1]
        for row in est.estimators_:
            for j, t in enumerate(row):
                v = np.zeros((t.tree_.node_count, k))
                v[:, j] = t.tree_.value[:, 0, 0] * est.learning_rate
                trees.append(_sk_tree(t.tree_, v))
        dummy = np.zeros((1, est.n_features_in_))
        base = np.asarray(est._raw_predict_init(dummy)[0], dtype=np.float64)
        output, out_class = _margin(task, classes, k, flip)
    else:  # HistGradientBoosting*
        k = len(est._predictors[0])
        for preds in est._predictors:
            for j, p in enumerate(preds):
                nodes = p.nodes
                if nodes["is_categorical"].any():
                    raise ConfigError("native categorical splits of HistGradientBoosting "
                                      "have no device explainer", field="explainer")
                leaf = nodes["is_leaf"].astype(bool)
                v = np.zeros((len(nodes), k))
                v[:, j] = nodes["value"]
                trees.append(_Tree(np.where(leaf, -1, nodes["left"].astype(np.int64)),
                                   np.where(leaf, -1, nodes["right"].astype(np.int64)),
                                   np.where(leaf, -2, nodes["feature_idx"].astype(np.int64)),
                                   nodes["num_threshold"].astype(np.float64),
                                   nodes["count"].astype(np.float64), v))
        base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
        output, out_class = _margin(task, classes, k, flip)
    if flip:  # margins: -m; rf's probability: 1 - p (each tree's leaves negated, base 1)
        rf = isinstance(est, RandomForestClassifier)
        base = np.ones_like(base) if rf else -base
        for t in trees:
            t.value = -t.value
    arrays.update(_leaf_paths(trees, base))
    return output, out_class


def _margin(task: str, classes: Sequence[Any] | None, k: int, flip: bool
            ) -> tuple[str, list[int]]:
    if task == "regression":
        return "the predicted value", [-1]
    if k == 1:
        return f"the log-odds of class {_positive(classes, flip)!r}", [0 if flip else 1]
    return "the softmax logit of the predicted class", list(range(k))


def _sk_tree(tree: Any, value: np.ndarray) -> _Tree:
    return _Tree(np.asarray(tree.children_left, dtype=np.int64),
                 np.asarray(tree.children_right, dtype=np.int64),
                 np.asarray(tree.feature, dtype=np.int64),
                 np.asarray(tree.threshold, dtype=np.float64),
                 np.asarray(tree.weighted_n_node_samples, dtype=np.float64), value)


@dataclass
class _Leaf:
    value: np.ndarray  # [K]
    weight: float  # cover of the leaf over the cover of the root
    features: list[int]  # distinct features on the path
    z: list[float]  # per distinct feature: the product of its splits' cover fractions
    splits: list[list[tuple[float, bool]]]  # per distinct feature: (threshold, goes left)


def _walk(t: _Tree) -> list[_Leaf]:
    leaves: list[_Leaf] = []
    root = float(t.cover[0])
    # (node, path: feature -> (z, [(threshold, left)]) in first-seen order)
    stack: list[tuple[int, dict[int, tuple[float, list[tuple[float, bool]]]]]] = [(0, {})]
    while stack:
        node, path = stack.pop()
        if t.left[node] < 0:
            leaves.append(_Leaf(t.value[node], float(t.cover[node]) / root, list(path),
                                [p[0] for p in path.values()], [p[1] for p in path.values()]))
            continue
        f, thr, cover = int(t.feature[node]), float(t.threshold[node]), float(t.cover[node])
        for child, left in ((int(t.left[node]), True), (int(t.right[node]), False)):
            z0, splits = path.get(f, (1.0, []))
            p = dict(path)
            p[f] = (z0 * float(t.cover[child]) / cover, [*splits, (thr, left)])
            stack.append((child, p))
    return leaves


def _leaf_paths(trees: Sequence[_Tree], base: np.ndarray) -> dict[str, np.ndarray]:
    """Every leaf of every tree, bucketed by the number of distinct features on its path
    (padded to the bucket's width with null players: z = o = 1)."""
    k = base.shape[0]
    expected = base.copy()
    by_bucket: dict[int, list[_Leaf]] = {}
    for t in trees:
        for leaf in _walk(t):
            expected += leaf.value * leaf.weight
            if leaf.features:
                width = next(b for b in BUCKETS if b >= len(leaf.features))
                by_bucket.setdefault(width, []).append(leaf)
    out: dict[str, np.ndarray] = {"base": expected, "buckets": np.array(sorted(by_bucket))}
    for m, leaves in sorted(by_bucket.items()):
        n = len(leaves)
        feat = np.full((n, m), -1, dtype=np.int32)
        z = np.ones((n, m))
        value = np.empty((n, k))
        e_slot: list[int] = []
        e_feat: list[int] = []
        e_thr: list[float] = []
        e_left: list[bool] = []
        for i, leaf in enumerate(leaves):
            value[i] = leaf.value
            for s, (f, zf, splits) in enumerate(zip(leaf.features, leaf.z, leaf.splits)):
                feat[i, s], z[i, s] = f, zf
                for thr, left in splits:
                    e_slot.append(i * m + s)
                    e_feat.append(f)
                    e_thr.append(thr)
                    e_left.append(left)
        slots = np.asarray(e_slot, dtype=np.int64)  # grouped by slot already, in order
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])
        out.update({f"b{m}_feat": feat, f"b{m}_z": z, f"b{m}_value": value,
                    f"b{m}_slot": slots[starts].astype(np.int32),
                    f"b{m}_start": starts.astype(np.int32),
                    f"b{m}_efeat": np.asarray(e_feat, dtype=np.int32),
                    f"b{m}_ethr": np.asarray(e_thr, dtype=np.float64),
                    f"b{m}_eleft": np.asarray(e_left, dtype=bool)})
    return out


def background_rows(rows: Sequence[Mapping[str, Any]], schema: InputSchema) -> np.ndarray:
    """The object array of the first :data:`BACKGROUND_ROWS` raw ``rows`` (by column name):
    the background both the device explainer and the cloud's shap explainers centre on."""
    rows = list(rows)[:BACKGROUND_ROWS]
    batch = schema.encode([[r.get(n) for n in schema.names] for r in rows])
    num = batch.num.astype(np.float64)
    return combine(num, batch.cat)


def background(registry: Registry, metadata: Mapping[str, Any], schema: InputSchema
               ) -> np.ndarray | None:
    """The background of a version: the first :data:`BACKGROUND_ROWS` rows of its stored
    holdout (``metadata["holdout"]``), as an object array; None when it has none."""
    ref = metadata.get("holdout")
    if not isinstance(ref, Mapping) or not isinstance(ref.get("sha256"), str):
        return None
    held = Labelled.from_json(json.loads(registry.blob_path(ref["sha256"]).read_bytes()))
    return background_rows(held.rows, schema) if len(held) else None


def attach(registry: Registry, pipe: Pipeline, schema: InputSchema, task: str,
           classes: Sequence[Any] | None, manifest: dict[str, Any],
           metadata: Mapping[str, Any]) -> DeviceExplainer | None:
    """Build the device explainer of ``pipe``, store it and add it to ``manifest`` (its
    artifact and ``manifest["explain"]``); a family without one changes nothing."""
    if unavailable(pipe) is not None:
        log.info("no device explainer for %s: %s", type(pipe.named_steps["est"]).__name__,
                 unavailable(pipe))
        return None
    bg = background(registry, metadata, schema)
    if bg is None:
        log.warning("no holdout to centre the explainer on; the version has no explainer")
        return None
    positive = positive_index_of(manifest)  # binary: the class the version calls positive
    dev = build(pipe, schema, task, classes, bg, 1 if positive is None else positive)
    if dev is None:
        return None
    sha, size = registry.put_blob(dev.data)
    manifest["artifacts"].append(artifact_entry(sha, size))
    manifest["explain"] = dev.manifest_block()
    log.info("device explainer: %s in %s space (%d bytes)", dev.method, dev.space, size)
    return dev
