"""``POST /v1/models/<name>/explain``: attributions per raw column from the ``shap`` library.

The route (in :mod:`hybridml.cloud.app`) validates the body like ``/predict``; this module
explains the rows with the version's scikit-learn pipeline (``metadata["sklearn_sha256"]``)
and shap (docs/quality.md §3):

* rf, gb, hgb: ``shap.TreeExplainer(feature_perturbation="tree_path_dependent")`` — the same
  values as the device's TreeSHAP (multiclass gb, which shap's tree explainer does not take,
  and calibrated models go the model-agnostic way below);
* logreg, sgd (Ridge, SGDRegressor): ``shap.LinearExplainer`` with the version's background
  (:func:`hybridml.cloud.explainers.background`), the device's linear values;
* mlp and the rest: ``shap.KernelExplainer`` over the raw columns (categories as codes), on a
  background of :data:`KERNEL_BACKGROUND` rows, in probability space (exact over every
  coalition up to 9 columns; :data:`KERNEL_SAMPLES` coalitions above). Kernel, not
  Permutation: shap's permutation explainer compiles with numba for ~30 s on first use.

``?method=device`` answers from the version's device explainer instead. At most
:data:`MAX_ROWS` rows per request: explaining costs far more than predicting. shap (and
scikit-learn) are imported on the first call, never when a worker starts.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hybridml.shared.errors import HTTPError, InputError, NoModelError
from hybridml.shared.schema import EncodedBatch, InputSchema

from .metrics import positive_index_of
from .predictors import ModelCache, Predictor
from .registry import Registry

log = logging.getLogger("hybridml.cloud.explain_api")

MAX_ROWS = 50
KERNEL_BACKGROUND = 30
KERNEL_SAMPLES = 512
METHODS = ("shap", "device")
_CACHE = 4


@dataclass
class _Cloud:
    """One version's shap explainer: ``run(batch)`` gives values ``[N, F, K]`` per raw column
    and base values ``[N, K]``."""

    method: str
    space: str
    run: Callable[[EncodedBatch], tuple[np.ndarray, np.ndarray]]


class Explanations:
    """The explainers of the versions asked about (an LRU of :data:`_CACHE`); thread-safe."""

    def __init__(self, registry: Registry, models: ModelCache) -> None:
        self.registry, self.models = registry, models
        self._items: OrderedDict[tuple[str, int], _Cloud] = OrderedDict()
        self._lock = threading.Lock()

    def answer(self, name: str, version: int, rows: Any, method: str | None
               ) -> dict[str, Any]:
        """The answer of the route: ``{"name", "model_version", "explanations": [...]}``."""
        if not isinstance(rows, list) or not rows:
            raise InputError("'inputs' must be a non-empty list of rows (objects by column "
                             "name, or lists in schema order)", field="inputs")
        if len(rows) > MAX_ROWS:
            raise HTTPError(f"{len(rows)} rows exceed the explain limit of {MAX_ROWS}; "
                            "split the request", status=413, code="batch_too_large",
                            field="inputs", max_batch=MAX_ROWS)
        method = method or "shap"
        if method not in METHODS:
            raise InputError(f"?method={method[:40]!r}: use shap (default) or device",
                             field="method")
        predictor = self.models.get(name, version)
        batch = predictor.schema.encode(rows)  # the rules /predict applies
        out = predictor.session.run(batch)
        predictions = predictor.shape(out)["predictions"]
        labels = None if out.values is not None else out.labels
        classes = predictor.classes
        if method == "device":
            from hybridml.edge.explain import explain, for_manifest

            dev = for_manifest(predictor.manifest, self.registry.blob_path)
            found = explain(dev, batch, predictions, labels, classes, predictor.schema.names)
        else:
            cloud = self._explainer(predictor)
            values, base = cloud.run(batch)
            found = _answers(cloud, values, base, predictions, labels, classes,
                             predictor.schema.names, positive_index_of(predictor.manifest.raw))
        return {"name": name, "model_version": version, "explanations": found}

    def _explainer(self, predictor: Predictor) -> _Cloud:
        key = (predictor.name, predictor.version)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        made = _build(self.registry, predictor)
        with self._lock:
            self._items[key] = made
            while len(self._items) > _CACHE:
                self._items.popitem(last=False)
        return made


def _answers(cloud: _Cloud, values: np.ndarray, base: np.ndarray, predictions: Sequence[Any],
             labels: np.ndarray | None, classes: Sequence[Any], names: Sequence[str],
             positive: int | None) -> list[dict[str, Any]]:
    """Per row, the explained class's attributions: a binary model's positive class (one
    shap output is that of ``classes[1]``: mirrored for positive 0, as the device explainer
    is), a multiclass model's predicted class."""
    binary = len(classes) == 2
    pos = 1 if positive is None else positive
    if binary and values.shape[2] == 1 and pos == 0:
        values = -values  # margins: -m; a probability p: 1 - p (the base below)
        base = (1.0 - base) if cloud.space == "probability" else -base
    out = []
    for r, pred in enumerate(predictions):
        if values.shape[2] == 1:
            k, cls = 0, (classes[pos] if binary else None)
        else:
            k = pos if binary or labels is None else int(labels[r])
            cls = classes[k] if classes else None
        out.append({"prediction": pred, "base_value": float(base[r, k]),
                    "attributions": dict(zip(names, values[r, :, k].tolist())),
                    "method": cloud.method, "space": cloud.space, "class": cls})
    return out


def _build(registry: Registry, predictor: Predictor) -> _Cloud:
    """The shap explainer of a version (imports shap and scikit-learn: a first call only)."""
    import shap
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import GradientBoostingClassifier

    from . import explainers
    from .models import combine

    meta = registry.metadata(predictor.name, predictor.version)
    sha = meta.get("sklearn_sha256")
    if not isinstance(sha, str):
        raise NoModelError(f"version {predictor.version} of {predictor.name!r} has no stored "
                           "scikit-learn pipeline to explain; re-train it", name=predictor.name)
    pipe = pickle.loads(registry.blob_path(sha).read_bytes())  # our own registry's blob
    schema, task = predictor.schema, predictor.manifest.task
    est, pre = pipe.named_steps["est"], pipe.named_steps["pre"]
    group = _group(explainers.raw_columns(pipe, schema), len(schema.names))
    bg = explainers.background(registry, meta, schema)
    calibrated = isinstance(est, CalibratedClassifierCV)
    multiclass_gb = isinstance(est, GradientBoostingClassifier) and len(est.classes_) > 2
    kind = None if calibrated or multiclass_gb else explainers.kind_of(est)
    space = explainers.space_of(est, task, len(predictor.classes)) if kind else \
        ("raw" if task == "regression" else "probability")

    def transform(batch: EncodedBatch) -> np.ndarray:
        return np.asarray(pre.transform(combine(batch.num.astype(np.float64), batch.cat)),
                          dtype=np.float64)

    if kind == "tree_shap":
        tree = shap.TreeExplainer(est, feature_perturbation="tree_path_dependent")

        def run(batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
            vals = _per_class(tree.shap_values(transform(batch)))
            return _raw(vals, group), _bases(tree.expected_value, len(batch))

        return _Cloud("shap.TreeExplainer", space, run)
    if bg is None:
        raise NoModelError(f"version {predictor.version} of {predictor.name!r} has no holdout "
                           "to draw a background from; re-train it", name=predictor.name)
    if kind == "linear":
        lin = shap.LinearExplainer(est, np.asarray(pre.transform(bg), dtype=np.float64))

        def run_linear(batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
            vals = _per_class(lin.shap_values(transform(batch)))
            return _raw(vals, group), _bases(lin.expected_value, len(batch))

        return _Cloud("shap.LinearExplainer", space, run_linear)
    return _kernel(shap, pipe, schema, task, bg[:KERNEL_BACKGROUND], space)


def _kernel(shap: Any, pipe: Any, schema: InputSchema, task: str, bg: np.ndarray,
                 space: str) -> _Cloud:
    """shap's KernelExplainer over the raw columns: numbers as they are, categories as
    codes into a vocabulary the model's function decodes, so no one-hot column is ever
    masked apart from its siblings."""
    n_num = schema.n_numeric
    vocab = [list(dict.fromkeys([*f.categories, ""])) for f in schema.features
             if f.kind != "numeric"]

    def decode(z: np.ndarray) -> np.ndarray:
        out = np.empty(z.shape, dtype=object)
        out[:, :n_num] = z[:, :n_num]
        for j, words in enumerate(vocab):
            out[:, n_num + j] = [words[int(c)] for c in z[:, n_num + j]]
        return out

    def encode(x: np.ndarray) -> np.ndarray:
        z = np.zeros(x.shape, dtype=np.float64)
        z[:, :n_num] = x[:, :n_num].astype(np.float64)
        for j, words in enumerate(vocab):
            for r, word in enumerate(x[:, n_num + j]):
                if word not in words:
                    words.append(word)  # an unseen category: its own code
                z[r, n_num + j] = words.index(word)
        return z

    if task == "regression":
        def model(z: np.ndarray) -> np.ndarray:
            return np.asarray(pipe.predict(decode(z)), dtype=np.float64)
    else:
        def model(z: np.ndarray) -> np.ndarray:
            return np.asarray(pipe.predict_proba(decode(z)), dtype=np.float64)

    kernel = shap.KernelExplainer(model, encode(bg))
    samples = min(2 ** len(schema.names), KERNEL_SAMPLES)
    # Raw rows in the order of the object arrays: numeric block, then categorical block.
    order = [*schema.numeric_names, *schema.categorical_names]
    back = [order.index(n) for n in schema.names]

    def run(batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        from .models import combine

        z = encode(combine(batch.num.astype(np.float64), batch.cat))
        vals = _per_class(kernel.shap_values(z, nsamples=samples, silent=True))
        return vals[:, back, :], _bases(kernel.expected_value, len(batch))

    return _Cloud("shap.KernelExplainer", space, run)


def _per_class(values: Any) -> np.ndarray:
    """shap's values as ``[N, P, K]`` (a list per class, or one array)."""
    if isinstance(values, list):
        return np.stack([np.asarray(v, dtype=np.float64) for v in values], axis=-1)
    arr = np.asarray(values, dtype=np.float64)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _bases(expected: Any, n: int) -> np.ndarray:
    return np.tile(np.atleast_1d(np.asarray(expected, dtype=np.float64)).reshape(1, -1), (n, 1))


def _group(col_raw: np.ndarray, n_raw: int) -> np.ndarray:
    g = np.zeros((len(col_raw), n_raw))
    g[np.arange(len(col_raw)), col_raw] = 1.0
    return g


def _raw(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Transformed columns summed onto their raw column (block order -> schema order is the
    caller's ``names``: raw_columns numbers raw columns in schema order)."""
    return np.einsum("npk,pf->nfk", values, group)


__all__ = ["MAX_ROWS", "METHODS", "Explanations"]
