"""The binary decision threshold: the one rule, how it is chosen, and how it enters the graph.

A binary classifier's label is the positive class (``manifest["metrics"]["positive"]``: the
minority class of the training rows, :func:`hybridml.cloud.metrics.positive_index`; index 1,
``classes[1]``, for versions from before) when that class's probability reaches the
threshold, else the other class. The comparison is made in float32, as the ONNX graph makes it,
so scikit-learn's side of the parity gate and every route that runs the graph draw the line at
exactly the same number:

* :func:`apply` is the Python rule (scikit-learn's side: metrics, the parity gate);
* :func:`add_threshold` appends the same rule to an exported graph, so the ``label`` output of
  the model every route runs (edge, fast path, precomputed table, cloud ``/predict``) is it;
* :func:`tune` chooses the threshold on the validation split for the primary metric;
* :func:`decide` turns :class:`~hybridml.cloud.quality.QualityOptions` into the version's
  :class:`Decision` (``manifest["decision"]``, docs/quality.md section 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hybridml.shared.errors import ConfigError, ExportError

from . import metrics
from .quality import QualityOptions, is_imbalanced

log = logging.getLogger("hybridml.cloud.threshold")

LABEL, PROBABILITIES = "label", "probabilities"
DEFAULT = 0.5
# Thresholds are recorded with this many decimals: the manifest, the graph's float32 constant
# and apply() then all start from the same short number.
DECIMALS = 6
# More distinct validation probabilities than this are thinned to quantiles before the scan.
MAX_CANDIDATES = 1000
_PREFIX = "hybridml_threshold"
# GreaterOrEqual exists from opset 12, Cast/Slice/Reshape as used here from 13.
MIN_OPSET = 13


def apply(proba: np.ndarray, threshold: float, positive: int = 1) -> np.ndarray:
    """Class indices (int64 ``[N]``) of a binary ``proba`` (``[N, 2]``) at ``threshold``.

    ``positive`` where ``P(classes[positive]) >= threshold`` compared in float32 (as the graph
    compares), else the other index. ``positive`` defaults to 1, the rule of versions from
    before the minority rule.
    """
    p = np.asarray(proba)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ConfigError(f"a decision threshold needs binary probabilities [N, 2], got shape "
                          f"{p.shape}; use a threshold with binary tasks only",
                          field="threshold")
    pos = _check_positive(positive)
    hit = p[:, pos].astype(np.float32) >= np.float32(threshold)
    return np.where(hit, pos, 1 - pos).astype(np.int64)


# The metrics a threshold can be tuned for, as ``metrics`` scores the version (F1 of the
# positive class: see :func:`scorer`).
SCORERS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "balanced_accuracy": metrics.balanced_accuracy,
    "accuracy": metrics.accuracy,
    "f1": partial(metrics.f1, "binary"),
}


def scorer(primary: str, positive: int = 1) -> Callable[[np.ndarray, np.ndarray], float]:
    """The scoring function of ``primary`` for class indices, F1 of the class ``positive``.
    Raises :class:`ConfigError` for a metric a threshold cannot be tuned for."""
    if primary not in SCORERS:
        raise ConfigError(f"primary metric {primary!r} cannot tune a threshold; use one of "
                          f"{', '.join(SCORERS)}", field="primary")
    if primary == "f1":
        return partial(metrics.f1, "binary", positive=_check_positive(positive))
    return SCORERS[primary]


def candidates(p1: np.ndarray) -> np.ndarray:
    """Thresholds worth trying on these positive-class probabilities: 0.5 and the midpoints
    between consecutive distinct float32 values (quantiles of them when there are more than
    :data:`MAX_CANDIDATES`), each rounded to :data:`DECIMALS` and inside (0, 1)."""
    values = np.unique(np.asarray(p1, dtype=np.float32).astype(np.float64))
    if values.size > MAX_CANDIDATES:
        values = np.unique(np.quantile(values, np.linspace(0.0, 1.0, MAX_CANDIDATES)))
    mids = (values[:-1] + values[1:]) / 2.0
    step = 10.0 ** -DECIMALS
    out = np.round(np.clip(np.append(mids, DEFAULT), step, 1.0 - step), DECIMALS)
    return np.unique(out)


def tune(y_val: np.ndarray, p1_val: np.ndarray, primary: str, positive: int = 1) -> float:
    """The threshold that scores best on the validation rows for ``primary``.

    ``y_val`` holds class indices (0/1), ``p1_val`` the probabilities of the positive class,
    index ``positive`` (F1 is that class's).
    This is a scan of the distinct candidate thresholds (:func:`candidates`) rather than
    scikit-learn's ``TunedThresholdClassifierCV``, whose grid is 100 evenly spaced points and
    whose ties go to the first grid point: here every threshold that changes a validation
    label is tried, each scored with :func:`apply` (the rule the graph runs) and the metric
    ``metrics`` uses, and ties go to the candidate nearest 0.5 (the least surprising answer
    when the validation rows cannot tell). One-class validation rows cannot tune: 0.5.
    """
    score = scorer(primary, positive)
    y = np.asarray(y_val).reshape(-1).astype(np.int64)
    p1 = np.asarray(p1_val, dtype=np.float64).reshape(-1)
    if np.unique(y).size < 2:
        log.warning("validation rows hold one class; keeping the threshold at %s", DEFAULT)
        return DEFAULT
    proba = np.column_stack([1.0 - p1, p1] if positive == 1 else [p1, 1.0 - p1])
    cands = candidates(p1)
    scores = np.array([score(y, apply(proba, float(t), positive)) for t in cands])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    chosen = float(cands[best[np.argmin(np.abs(cands[best] - DEFAULT))]])
    log.info("threshold %.6g scores %s = %.4f on %d validation rows (0.5 scores %.4f)",
             chosen, primary, float(scores.max()), y.size,
             float(scores[np.argmin(np.abs(cands - DEFAULT))]))
    return chosen


@dataclass(frozen=True)
class Decision:
    """A binary version's decision rule: ``manifest["decision"]``."""

    threshold: float
    positive: str
    source: str  # "auto" (tuned) or "fixed" (given)
    tuned_for: str | None
    validation_rows: int = 0
    index: int = 1  # the positive class's index in classes (not recorded: classes say it)

    def to_json(self) -> dict[str, Any]:
        """The manifest form: threshold, positive class, source and the metric tuned for."""
        return {"threshold": self.threshold, "positive": self.positive, "source": self.source,
                "tuned_for": self.tuned_for}

    def describe(self) -> str:
        """One line for ``train``'s output."""
        how = (f"tuned on {self.validation_rows} validation rows for {self.tuned_for}"
               if self.source == "auto" else "fixed by --threshold")
        return f"threshold: {self.threshold:g} on P({self.positive}), {how}"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Decision | None:
        """The decision a version's manifest records, or None (argmax)."""
        doc = manifest.get("decision")
        if not doc:
            return None
        rows = int(manifest.get("training", {}).get("split", {}).get("validation", 0))
        names = [str(c) for c in (manifest.get("output") or {}).get("classes") or []]
        index = names.index(str(doc["positive"])) if str(doc["positive"]) in names else 1
        return cls(float(doc["threshold"]), str(doc["positive"]), str(doc["source"]),
                   doc.get("tuned_for"), rows, index)


def labels(pipe: Any, x: np.ndarray, decision: Decision | None) -> np.ndarray:
    """scikit-learn's labels for ``x``: ``pipe.predict`` or, with a decision, :func:`apply`."""
    if decision is None:
        return np.asarray(pipe.predict(x))
    return apply(pipe.predict_proba(x), decision.threshold, decision.index)


def wanted(quality: QualityOptions, task: str, y_train: np.ndarray) -> str | float | None:
    """What the run asks for: ``"auto"``, a fixed float or None (plain argmax).

    Unasked, imbalanced binary tasks (:func:`~hybridml.cloud.quality.is_imbalanced`: the
    smallest class under 20% of the training rows) get ``"auto"``. A threshold asked for a
    task that is not binary is a :class:`ConfigError`.
    """
    if task != "binary":
        if quality.threshold is not None:
            raise ConfigError(f"--threshold {quality.threshold} applies to binary tasks only; "
                              f"this task is {task}: drop --threshold", field="threshold")
        return None
    if quality.threshold is not None:
        return quality.threshold
    counts = np.bincount(np.asarray(y_train, dtype=np.int64), minlength=2)
    return "auto" if is_imbalanced(counts) else None


def decide(quality: QualityOptions, task: str, classes: Sequence[Any] | None,
           y_train: np.ndarray, primary: str, validation: Callable[[], tuple[np.ndarray,
                                                                          np.ndarray]],
           positive: int | None = None) -> Decision | None:
    """The version's decision rule, or None for the plain argmax.

    ``validation`` returns the validation rows' class indices and ``predict_proba`` (called
    only when the threshold is tuned). ``primary`` is the metric a tuned threshold maximises.
    ``positive`` is the positive class's index (None: the minority of ``y_train``,
    :func:`hybridml.cloud.metrics.positive_index`).
    """
    asked = wanted(quality, task, y_train)
    if asked is None:
        return None
    if positive is None:
        positive = metrics.positive_index(
            np.bincount(np.asarray(y_train, dtype=np.int64), minlength=2)[:2])
    pos = _check_positive(positive)
    name = str(classes[pos]) if classes else str(pos)
    if asked == "auto":
        y_val, proba = validation()
        t = tune(y_val, np.asarray(proba)[:, pos], primary, pos)
        return Decision(t, name, "auto", primary, len(y_val), pos)
    return Decision(round(float(asked), DECIMALS), name, "fixed", None, index=pos)


def add_threshold(onnx_bytes: bytes, threshold: float, positive: int = 1) -> bytes:
    """Make the graph's ``label`` output :func:`apply`'s rule (int64): ``positive`` when
    ``P(classes[positive]) >= float32(threshold)``, else the other index.

    Appends ``Slice(probabilities, column positive) -> GreaterOrEqual(t) [-> Not, for
    positive 0] -> Cast(int64) -> Reshape(old label shape)`` and renames the converter's own
    label tensor, so the outputs keep their names, order and types and the inputs are
    unchanged. Raises :class:`ExportError` when the graph is not a binary classifier's.
    """
    pos = _check_positive(positive)
    model = onnx.load_from_string(onnx_bytes)
    g = model.graph
    names = [o.name for o in g.output]
    if names[:2] != [LABEL, PROBABILITIES]:
        raise ExportError(f"a decision threshold needs a classifier graph with outputs "
                          f"{[LABEL, PROBABILITIES]}, got {names}; export the classifier with "
                          "hybridml.cloud.export.export_onnx", field="threshold")
    dims = g.output[1].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != 2:
        raise ExportError(f"a decision threshold applies to binary classifiers; this graph has "
                          f"{dims[1].dim_value} classes: drop --threshold", field="threshold")
    if any(n.name.startswith(_PREFIX) for n in g.node):
        raise ExportError("this graph already carries a decision threshold; add it once, to "
                          "the exported graph", field="threshold")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=0)
    if opset < MIN_OPSET:
        raise ExportError(f"a decision threshold needs ONNX opset >= {MIN_OPSET} (Slice with "
                          f"inputs, GreaterOrEqual); this graph has {opset}: export with "
                          "hybridml.cloud.export.TARGET_OPSET", field="threshold")
    argmax = f"{_PREFIX}_argmax_label"
    for node in g.node:  # the converter's label becomes an unused intermediate
        node.output[:] = [argmax if o == LABEL else o for o in node.output]
        node.input[:] = [argmax if i == LABEL else i for i in node.input]
    label_rank = len(g.output[0].type.tensor_type.shape.dim) or 1
    p = _PREFIX
    g.initializer.extend([
        numpy_helper.from_array(np.array([pos], dtype=np.int64), f"{p}_starts"),
        numpy_helper.from_array(np.array([pos + 1], dtype=np.int64), f"{p}_ends"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{p}_axes"),
        numpy_helper.from_array(np.array(threshold, dtype=np.float32), f"{p}_value"),
        numpy_helper.from_array(np.array([-1] + [1] * (label_rank - 1), dtype=np.int64),
                                f"{p}_shape"),
    ])
    # Index 1 is the label where P(positive) reaches t when positive is 1, else where not.
    one = f"{p}_ge" if pos == 1 else f"{p}_lt"
    g.node.extend([
        helper.make_node("Slice", [PROBABILITIES, f"{p}_starts", f"{p}_ends", f"{p}_axes"],
                         [f"{p}_p1"], name=f"{p}_slice"),
        helper.make_node("GreaterOrEqual", [f"{p}_p1", f"{p}_value"], [f"{p}_ge"],
                         name=f"{p}_compare"),
        *([] if pos == 1 else [helper.make_node("Not", [f"{p}_ge"], [one], name=f"{p}_not")]),
        helper.make_node("Cast", [one], [f"{p}_int"], name=f"{p}_cast",
                         to=TensorProto.INT64),
        helper.make_node("Reshape", [f"{p}_int", f"{p}_shape"], [LABEL], name=f"{p}_reshape"),
    ])
    g.output[0].type.tensor_type.elem_type = TensorProto.INT64
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the thresholded graph is invalid: {str(exc)[:300]}; report this "
                          "with the model family", field="threshold") from exc
    log.info("decision threshold %.6g on class index %d added to the graph", threshold, pos)
    return model.SerializeToString()


def _check_positive(positive: int) -> int:
    """``positive`` as a binary class index; ConfigError unless it is 0 or 1."""
    if isinstance(positive, bool) or int(positive) not in (0, 1) or int(positive) != positive:
        raise ConfigError(f"positive class index {positive!r}: a binary task's class index is "
                          "0 or 1 (see hybridml.cloud.metrics.positive_index)",
                          field="positive")
    return int(positive)
