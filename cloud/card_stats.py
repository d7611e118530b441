"""The numbers a model card computes at card time: the shipped model on the version's holdout.

:func:`holdout_stats` runs the version's shipped ONNX model
(:class:`hybridml.edge.session.ModelSession`: what devices run, the decision threshold
included, since it lives in the graph) on its stored holdout
(:func:`hybridml.cloud.labelled.holdout`) and returns:

* each metric with a **bootstrap 95% interval** (:func:`bootstrap`): rows are resampled
  with replacement, :data:`RESAMPLES` times, seeded, and the interval is the 2.5th and
  97.5th percentiles. A classifier's metrics are functions of its confusion matrix, and
  resampling n rows with replacement draws that matrix from a multinomial over its cells,
  so the resamples are drawn as confusion matrices: the same distribution, without an
  ``[resamples, n]`` index array. Regression draws row indices, in chunks, and counts how
  often each row was drawn: RMSE, MAE and R² are functions of four sums over the drawn
  rows, so a chunk of resamples is one matrix product. ROC-AUC, PR-AUC and the Brier score
  (of the probabilities) are given on the holdout without an interval.
* **permutation importance** (:func:`permutation_importance`): how much the primary metric
  gets worse when one raw column is shuffled across the rows (seeded, :data:`REPEATS`
  times). It asks only for the model's answers, so it works for every family.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hybridml.edge.session import ModelSession, Outputs
from hybridml.shared.errors import DataError
from hybridml.shared.schema import NUMERIC, EncodedBatch, InputSchema

from . import metrics
from .labelled import Labelled

RESAMPLES = 1_000
CONFIDENCE = 0.95
REPEATS = 5
IMPORTANCE_ROWS = 5_000  # permutation importance on a seeded sample of at most this many rows
LOWER_IS_BETTER = frozenset({"rmse", "mae", "brier"})
PROBABILITY_METRICS = ("roc_auc", "pr_auc", "brier")  # on the holdout, without an interval
_CHUNK_CELLS = 2_000_000  # regression: resampled indices held at once


def holdout_stats(model: bytes | os.PathLike[str], manifest: Mapping[str, Any],
                  held: Labelled, *, seed: int = 0, resamples: int = RESAMPLES
                  ) -> dict[str, Any]:
    """Metrics with bootstrap intervals and permutation importance of the shipped ``model``
    on the labelled rows ``held`` (rows its schema refuses are counted, not scored)."""
    schema = InputSchema.from_json(manifest["schema"])
    task = str(manifest["output"]["task"])
    rows = [{n: r.get(n) for n in schema.names} for r in held.rows]
    good, bad = schema.split_bad(rows)
    if not good:
        raise DataError(f"none of the {len(rows)} holdout rows can be encoded for this model",
                        field="holdout")
    batch = schema.encode([rows[i] for i in good])
    session = ModelSession(model if isinstance(model, bytes) else os.fspath(model), schema,
                           task)
    scorer = Scorer.of(manifest, [held.labels[i] for i in good])
    out = session.run(batch)
    values: dict[str, dict[str, Any]] = {
        **bootstrap(scorer, out, seed=seed, resamples=resamples),
        **_probability_metrics(scorer, out)}
    primary = scorer.primary
    return {"rows": len(good), "refused": len(bad), "seed": seed, "resamples": resamples,
            "confidence": CONFIDENCE, "primary": primary, "metrics": values,
            "importance": {"method": "permutation", "metric": primary, "repeats": REPEATS,
                           "features": permutation_importance(session, schema, batch, scorer,
                                                              seed=seed)}}


class Scorer:
    """The truth of some rows and how to score a model's answers on them."""

    def __init__(self, task: str, y: np.ndarray, primary: str, positive: int | None,
                 n_labels: int) -> None:
        self.task, self.y, self.primary = task, y, primary
        self.positive, self.n_labels = positive, n_labels

    @classmethod
    def of(cls, manifest: Mapping[str, Any], labels: Sequence[Any]) -> Scorer:
        """The scorer of a version's task, primary metric and classes for ``labels``."""
        task = str(manifest["output"]["task"])
        primary = metrics.primary_of(manifest)
        if task == "regression":
            return cls(task, np.asarray(labels, dtype=np.float64), primary, None, 0)
        names = [str(c) for c in manifest["output"]["classes"]]
        extra = sorted({str(t) for t in labels} - set(names))  # classes the model lacks
        index = {c: i for i, c in enumerate([*names, *extra])}
        y = np.array([index[str(t)] for t in labels], dtype=np.int64)
        # metrics.f1: of the version's positive class for a binary task (the minority of its
        # training rows; classes[1] for versions from before)
        return cls(task, y, primary, metrics.positive_index_of(manifest), len(index))

    def predictions(self, out: Outputs) -> np.ndarray:
        """The model's answers as class indices or values."""
        if self.task == "regression":
            assert out.values is not None
            return out.values.astype(np.float64)
        assert out.labels is not None
        return out.labels

    def confusion(self, pred: np.ndarray) -> np.ndarray:
        """``[true, predicted]`` counts over every label index."""
        k = self.n_labels
        return np.bincount(self.y * k + pred, minlength=k * k).reshape(k, k)

    def score(self, out: Outputs) -> float:
        """The primary metric of the answers ``out``."""
        pred = self.predictions(out)
        if self.task == "regression":
            return float(_regression(self.y[None, :], pred[None, :])[self.primary][0])
        return float(_from_confusion(self.confusion(pred)[None], self.positive)[self.primary][0])


def bootstrap(scorer: Scorer, out: Outputs, *, seed: int = 0, resamples: int = RESAMPLES
              ) -> dict[str, dict[str, float]]:
    """``{metric: {"value", "low", "high"}}``: each metric on all rows and its percentile
    interval over ``resamples`` seeded resamples of the rows (see the module docstring)."""
    rng = np.random.default_rng(seed)
    pred = scorer.predictions(out)
    n = int(pred.shape[0])
    if scorer.task == "regression":
        point = _regression(scorer.y[None, :], pred[None, :])
        # Each resample's metrics are functions of four sums over its rows.
        y = scorer.y - scorer.y.mean()  # centred: the sums of squares keep their precision
        d = y - (pred - scorer.y.mean())
        per_row = np.stack([d * d, np.abs(d), y, y * y], axis=1)
        per = max(1, _CHUNK_CELLS // max(n, 1))
        sums = np.concatenate([_times_drawn(rng, n, min(per, resamples - start)) @ per_row
                               for start in range(0, resamples, per)])
        draws = _regression_sums(sums, n)
    else:
        cm = scorer.confusion(pred)
        point = _from_confusion(cm[None], scorer.positive)
        cells = rng.multinomial(n, cm.reshape(-1) / n, size=resamples)
        draws = _from_confusion(cells.reshape(resamples, *cm.shape), scorer.positive)
    tail = 100 * (1 - CONFIDENCE) / 2
    result: dict[str, dict[str, float]] = {}
    for k, v in point.items():
        low, high = np.percentile(draws[k], [tail, 100 - tail])
        result[k] = {"value": round(float(v[0]), 6), "low": round(float(low), 6),
                     "high": round(float(high), 6)}
    return result


def permutation_importance(session: ModelSession, schema: InputSchema, batch: EncodedBatch,
                           scorer: Scorer, *, seed: int = 0, repeats: int = REPEATS
                           ) -> list[dict[str, Any]]:
    """Per raw column, most important first: the mean (and spread) over ``repeats`` seeded
    shuffles of how much the primary metric got worse (positive: the column matters)."""
    rng = np.random.default_rng(seed)
    n = len(batch.num) if schema.n_numeric else len(batch.cat)
    keep = np.arange(n)
    if n > IMPORTANCE_ROWS:
        keep = np.sort(rng.choice(n, IMPORTANCE_ROWS, replace=False))
    num, cat = batch.num[keep], batch.cat[keep]
    sub = Scorer(scorer.task, scorer.y[keep], scorer.primary, scorer.positive,
                 scorer.n_labels)
    sign = -1.0 if scorer.primary in LOWER_IS_BETTER else 1.0
    base = sub.score(session.run(schema.encode_blocks(num, cat)))
    found: list[dict[str, Any]] = []
    jn = jc = 0
    for f in schema.features:
        block, j = (num, jn) if f.kind == NUMERIC else (cat, jc)
        jn, jc = (jn + 1, jc) if f.kind == NUMERIC else (jn, jc + 1)
        drops = []
        for _ in range(repeats):
            shuffled = block.copy()
            shuffled[:, j] = block[rng.permutation(len(keep)), j]
            feeds = (shuffled, cat) if f.kind == NUMERIC else (num, shuffled)
            drops.append(sign * (base - sub.score(session.run(schema.encode_blocks(*feeds)))))
        found.append({"name": f.name, "kind": f.kind,
                      "importance": round(float(np.mean(drops)), 6),
                      "std": round(float(np.std(drops)), 6)})
    return sorted(found, key=lambda d: (-d["importance"], d["name"]))


# -------------------------------------------------------------------------------- internals
def _probability_metrics(scorer: Scorer, out: Outputs) -> dict[str, dict[str, float | None]]:
    """ROC-AUC, PR-AUC and Brier of the probabilities (:func:`hybridml.cloud.metrics.scores`),
    where the holdout defines them; without an interval (they need rows, not cells)."""
    proba = out.probabilities
    if scorer.task == "regression" or proba is None or proba.shape[1] != scorer.n_labels:
        return {}
    found = metrics.scores(scorer.task, scorer.y, scorer.predictions(out), proba,
                           positive=1 if scorer.positive is None else scorer.positive)
    return {k: {"value": found[k], "low": None, "high": None}
            for k in PROBABILITY_METRICS if found.get(k) is not None}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def _mean_defined(values: np.ndarray) -> np.ndarray:
    """Mean over the last axis of the defined (non-NaN) values: a class absent from a
    resample does not count, as in :mod:`hybridml.cloud.metrics`."""
    ok = ~np.isnan(values)
    return np.where(ok, values, 0.0).sum(-1) / np.maximum(ok.sum(-1), 1)


def _from_confusion(cm: np.ndarray, positive: int | None) -> dict[str, np.ndarray]:
    """The label metrics of :func:`hybridml.cloud.metrics.scores` of each ``[true,
    predicted]`` matrix in ``cm[B, K, K]``."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    true, predicted = cm.sum(axis=2), cm.sum(axis=1)
    out = {"accuracy": _ratio(tp.sum(1), n),
           "balanced_accuracy": _mean_defined(_ratio(tp, true)),
           "f1_macro": _mean_defined(_ratio(2 * tp, true + predicted))}
    # metrics.f1: the positive class's for a binary task, else the macro F1
    out["f1"] = out["f1_macro"] if positive is None else \
        np.nan_to_num(_ratio(2 * tp[:, positive], true[:, positive] + predicted[:, positive]))
    return out


def _times_drawn(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``[k, n]``: how often each of n rows is drawn in each of k resamples of n rows."""
    offsets = (np.arange(k, dtype=np.int32) * n)[:, None]  # k * n stays under _CHUNK_CELLS
    idx = rng.integers(0, n, size=(k, n), dtype=np.int32) + offsets
    return np.bincount(idx.ravel(), minlength=k * n).reshape(k, n).astype(np.float64)


def _regression_sums(sums: np.ndarray, n: int) -> dict[str, np.ndarray]:
    """:func:`_regression` from each resample's sums of (d², |d|, y, y²) over its n rows."""
    ss_res, abs_err, total, squares = sums.T
    ss_tot = squares - total * total / n
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), 0.0)
    return {"rmse": np.sqrt(ss_res / n), "mae": abs_err / n, "r2": r2}


def _regression(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """RMSE, MAE and R² of each row of ``y[B, n]`` against ``pred[B, n]``."""
    d = y - pred
    ss_res = np.sum(d * d, axis=1)
    ss_tot = np.sum((y - y.mean(axis=1, keepdims=True)) ** 2, axis=1)
    r2 = np.where(ss_tot > 0, 1.0 - ss_res / np.where(ss_tot > 0, ss_tot, 1.0), 0.0)
    return {"rmse": np.sqrt(ss_res / y.shape[1]), "mae": np.mean(np.abs(d), axis=1), "r2": r2}


__all__ = ["CONFIDENCE", "IMPORTANCE_ROWS", "LOWER_IS_BETTER", "PROBABILITY_METRICS", "REPEATS",
           "RESAMPLES",
           "Scorer", "bootstrap", "holdout_stats", "permutation_importance"]
