"""ONNX export of a fitted pipeline, and the parity gate that must pass before it ships.

:func:`export_onnx` turns ``Pipeline(ColumnTransformer, estimator)`` into a graph that takes the
schema's raw ``num`` (float32 ``[N, n_num]``) and ``cat`` (string ``[N, n_cat]``) inputs. The
ColumnTransformer selects columns by integer index over the two inputs joined in that order,
which is exactly how :func:`hybridml.cloud.models.combine` lays out the training array. Outputs:
classifiers ``label`` (int64 class index) and ``probabilities`` (float32 ``[N, C]``, ZipMap
off); regressors ``variable`` (float32 ``[N, 1]``).

:func:`check_parity` runs scikit-learn and onnxruntime on the same rows and refuses the export
(:class:`ParityError`) when they disagree:

* classification: a row *differs* when any probability differs by more than ``tolerance``
  (default :data:`PROB_TOLERANCE`), or when the labels differ and the decision is not a tie
  within it (a *tie*: the top two classes' probabilities within ``tolerance`` of each other,
  or, with a decision threshold, the positive class's probability within ``tolerance`` of it;
  float32 may break a tie either way, so it counts as agreement and is reported as ``ties``);
  the gate fails when the share of rows that agree is below ``min_agreement``;
* regression: a row differs when ``|sklearn - onnx|`` exceeds ``tolerance``; the gate fails on
  any such row. The default is ``REG_RTOL * max(1, max|prediction|)``: float32 keeps ~7 digits,
  so a relative 1e-4 leaves room for ~800 float32 rounding steps (tree sums, matrix products)
  while a wrong split or a wrong coefficient still shows.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.base import is_classifier
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import DataError, ExportError, ParityError, SchemaError
from hybridml.shared.manifest import TASKS
from hybridml.shared.schema import CAT_INPUT, NUM_INPUT, InputSchema

from . import calibration
from . import threshold as decision_threshold
from .converters import register_converters
from .models import FAMILIES, combine

log = logging.getLogger("hybridml.cloud.export")

# Fixed, so an export does not change with the skl2onnx release; both load on onnxruntime
# >= 1.12, below our minimum. Converters pick the newest op version <= these.
TARGET_OPSET: dict[str, int] = {"": 17, "ai.onnx.ml": 3}
CLASSIFIER_OUTPUTS = ("label", "probabilities")
REGRESSOR_OUTPUTS = ("variable",)
PROB_TOLERANCE = 1e-4
REG_RTOL = 1e-4
_MAX_REASON = 400
# What to try when a family fails to convert.
_FIX = {
    "hgb": "leave categorical_features unset and keep the default loss (our converter in "
           "hybridml.cloud.converters handles the rest)",
    "sgd": "use loss='log_loss' or 'modified_huber' so the model has probabilities",
}
_FIX_DEFAULT = ("use a family from hybridml.cloud.models with its default parameters, or "
                "register a converter in hybridml.cloud.converters")


def export_onnx(pipeline: Pipeline, schema: InputSchema, task: str) -> bytes:
    """Convert a fitted pipeline to serialized ONNX taking the schema's ``num``/``cat`` inputs.

    Raises :class:`ExportError` naming the model family and what to change when the pipeline is
    unfitted, does not match ``task`` or ``schema``, or skl2onnx cannot convert it.
    """
    est = _estimator(pipeline)
    fam = family_of(est)
    _check_task(est, task, fam)
    try:
        check_is_fitted(pipeline)
    except NotFittedError as exc:
        raise ExportError(f"the {fam} pipeline is not fitted; fit it before export") from exc
    n_in = getattr(pipeline, "n_features_in_", None)
    n_schema = schema.n_numeric + schema.n_categorical
    if n_in is not None and n_in != n_schema:
        raise SchemaError(
            f"the {fam} pipeline was fitted on {n_in} columns but the schema has {n_schema} "
            f"({', '.join(schema.names)}); export with the schema it was trained with",
            field="schema")
    initial_types: list[tuple[str, Any]] = []
    if schema.n_numeric:
        initial_types.append((NUM_INPUT, FloatTensorType([None, schema.n_numeric])))
    if schema.n_categorical:
        initial_types.append((CAT_INPUT, StringTensorType([None, schema.n_categorical])))
    options = {id(est): {"zipmap": False}} if task != "regression" else None
    register_converters()
    try:
        onx: ModelProto = convert_sklearn(pipeline, initial_types=initial_types,
                                          target_opset=TARGET_OPSET, options=options)
    except ExportError as exc:  # our converters explain themselves; add the family
        raise ExportError(f"cannot convert the {fam} model ({type(est).__name__}) to ONNX: "
                          f"{exc.message}", **{"family": fam, **exc.details}) from exc
    except Exception as exc:  # skl2onnx raises RuntimeError/ValueError/NotImplementedError/...
        # skl2onnx messages can dump whole attribute lists: keep the start.
        reason = str(exc) if len(str(exc)) <= _MAX_REASON else str(exc)[:_MAX_REASON] + " ..."
        raise ExportError(
            f"cannot convert the {fam} model ({type(est).__name__}) to ONNX: {reason}. Fix: "
            f"{_FIX.get(fam, _FIX_DEFAULT)}", family=fam) from exc
    _check_outputs(onx, task, fam)
    data = onx.SerializeToString()
    log.info("exported %s %s model to ONNX: %d bytes, opset %s", fam, task, len(data),
             TARGET_OPSET)
    return data


@dataclass(frozen=True)
class ParityReport:
    """How closely the ONNX model reproduces scikit-learn on the checked rows.

    ``agreement`` is the share of rows whose outputs agree (label and probabilities within
    ``tolerance``, or value within ``tolerance``); ``label_agreement`` and ``max_prob_diff``
    are set for classifiers, ``max_abs_diff`` for regressors. ``ties`` counts the rows whose
    labels differ on a decision tied within ``tolerance`` (they agree); ``threshold`` is the
    decision threshold scikit-learn's labels were taken at (None: argmax).
    """

    task: str
    n_rows: int
    n_differing: int
    agreement: float
    label_agreement: float | None
    max_prob_diff: float | None
    max_abs_diff: float | None
    tolerance: float
    min_agreement: float
    passed: bool
    ties: int = 0
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the JSON form stored in manifests."""
        return asdict(self)


def check_parity(pipeline: Pipeline, model: bytes, schema: InputSchema, task: str,
                 num: np.ndarray, cat: np.ndarray, *, min_agreement: float = 0.999,
                 tolerance: float | None = None, threshold: float | None = None,
                 positive: int = 1) -> ParityReport:
    """Compare ``pipeline`` (scikit-learn) with ``model`` (onnxruntime) on the same rows.

    ``num``/``cat`` are the encoded blocks (float32 NaN-for-missing, strings ``""``-for-missing)
    in schema order. ``tolerance`` bounds each row's largest probability difference
    (classifiers, default :data:`PROB_TOLERANCE`) or absolute difference (regressors, default
    ``REG_RTOL * max(1, max|prediction|)``). ``threshold`` (binary classifiers) takes
    scikit-learn's labels with :func:`hybridml.cloud.threshold.apply`, the rule the exported
    graph carries (:func:`hybridml.cloud.threshold.add_threshold`), on the probability of the
    class index ``positive`` (``manifest["metrics"]["positive"]``; 1 for versions from before
    the minority rule). Returns the report when
    the gate passes; raises :class:`ParityError` saying how many rows differ, with the worst
    row by column name and both outputs, when not.
    """
    fam = family_of(_estimator(pipeline))
    _check_task(_estimator(pipeline), task, fam)
    batch = schema.encode_blocks(num, cat)
    num32, cat_s = batch.num, batch.cat
    n = num32.shape[0]
    if n == 0:
        raise DataError("check_parity needs at least one row; pass the held-out test rows")
    onnx_out = ModelSession(model, schema, task).run(batch)
    x = combine(num32, cat_s)  # the float32 values the edge sends, as the pipeline was fitted
    if task == "regression":
        sk_val = np.asarray(pipeline.predict(x), dtype=np.float64).reshape(-1)
        ox_val = np.asarray(onnx_out.values, dtype=np.float64).reshape(-1)
        tol = tolerance if tolerance is not None else (
            REG_RTOL * max(1.0, float(np.nanmax(np.abs(sk_val)))))
        diff = np.abs(sk_val - ox_val)
        bad = ~(diff <= tol)  # NaN counts as differing
        report = _report(task, n, bad, tol, min_agreement, None, None, float(np.max(diff)))
        if bad.any():
            r = int(np.argmax(np.where(bad, np.nan_to_num(diff, nan=np.inf), -1.0)))
            raise _parity_error(report, fam, schema, num32, cat_s, r,
                                f"sklearn {sk_val[r]:.7g}, onnx {ox_val[r]:.7g}")
    else:
        sk_p = np.asarray(pipeline.predict_proba(x), dtype=np.float64)
        sk_lab = np.asarray(pipeline.predict(x)).reshape(-1) if threshold is None else \
            decision_threshold.apply(sk_p, threshold, positive)
        ox_lab = np.asarray(onnx_out.labels).reshape(-1)
        ox_p = np.asarray(onnx_out.probabilities, dtype=np.float64)
        if ox_p.shape != sk_p.shape:
            raise ParityError(f"the ONNX model gives probabilities of shape {ox_p.shape} but "
                              f"scikit-learn {sk_p.shape}; export this same pipeline",
                              family=fam)
        tol = PROB_TOLERANCE if tolerance is None else tolerance
        pdiff = np.abs(sk_p - ox_p).max(axis=1)
        lab_ok = sk_lab.astype(np.int64) == ox_lab
        p_ok = pdiff <= tol
        tie = ~lab_ok & p_ok & _tied(sk_p, ox_lab, tol, threshold, positive)
        bad = ~(lab_ok | tie) | ~p_ok
        report = replace(_report(task, n, bad, tol, min_agreement, float(lab_ok.mean()),
                                 float(np.max(pdiff)), None),
                         ties=int(tie.sum()), threshold=threshold)
        if report.ties:
            log.info("parity: %d of %d rows differ only on a decision tied within %.3g",
                     report.ties, n, tol)
        if not report.passed:
            # Show a label flip if there is one, else the largest probability difference.
            score = np.where(bad, np.nan_to_num(pdiff, nan=np.inf) + (~lab_ok) * 2.0, -1.0)
            r = int(np.argmax(score))
            raise _parity_error(report, fam, schema, num32, cat_s, r,
                                f"sklearn label {sk_lab[r]} p={_fmt(sk_p[r])}, onnx label "
                                f"{ox_lab[r]} p={_fmt(ox_p[r])}")
    log.info("parity passed on %d rows: %s", n, json.dumps(report.to_json()))
    return report


def _tied(sk_p: np.ndarray, ox_lab: np.ndarray, tol: float, threshold: float | None,
          positive: int = 1) -> np.ndarray:
    """Rows whose decision is a tie within ``tol``: the positive class's (index ``positive``)
    probability that close to the threshold, or (argmax) the ONNX label's scikit-learn
    probability that close to the top one, i.e. the top two classes tied."""
    if threshold is not None:
        return np.asarray(np.abs(sk_p[:, positive] - threshold) <= tol)
    picked = np.take_along_axis(sk_p, np.clip(ox_lab, 0, sk_p.shape[1] - 1)[:, None], 1)[:, 0]
    in_range = (ox_lab >= 0) & (ox_lab < sk_p.shape[1])
    return np.asarray(in_range & (sk_p.max(axis=1) - picked <= tol))


def family_of(estimator: Any) -> str:
    """The family name of ``estimator`` (``"logreg"``, ``"hgb"`` ...) or its class name; a
    calibrated estimator reports the family it calibrates."""
    estimator = calibration.inner(estimator)
    for fam in FAMILIES.values():
        if type(estimator) in (fam.classifier, fam.regressor):
            return fam.name
    return type(estimator).__name__


def _estimator(pipeline: Pipeline) -> Any:
    return pipeline.steps[-1][1] if isinstance(pipeline, Pipeline) else pipeline


def _check_task(est: Any, task: str, fam: str) -> None:
    if task not in TASKS:
        raise ExportError(f"unknown task {task!r}; use one of {', '.join(TASKS)}", field="task")
    if (task == "regression") == is_classifier(est):
        kind = "classifier" if is_classifier(est) else "regressor"
        raise ExportError(f"the {fam} model is a {kind} but task is {task!r}; export it with "
                          "the task it was trained for", field="task")


def _check_outputs(onx: ModelProto, task: str, fam: str) -> None:
    """The graph must expose the outputs ModelSession and the edge rely on, by name and type."""
    names = tuple(o.name for o in onx.graph.output)
    want = REGRESSOR_OUTPUTS if task == "regression" else CLASSIFIER_OUTPUTS
    if names[: len(want)] != want:
        raise ExportError(f"the {fam} export has outputs {list(names)}, expected {list(want)}; "
                          f"{_FIX_DEFAULT}", family=fam)
    if task != "regression":
        elem = onx.graph.output[0].type.tensor_type.elem_type
        if elem != TensorProto.INT64:
            raise ExportError(f"the {fam} export's label is {TensorProto.DataType.Name(elem)}, "
                              "not INT64; fit classifiers on class indices 0..C-1", family=fam)


def _report(task: str, n: int, bad: np.ndarray, tol: float, min_agreement: float,
            label_agreement: float | None, max_prob_diff: float | None,
            max_abs_diff: float | None) -> ParityReport:
    n_bad = int(bad.sum())
    agreement = 1.0 - n_bad / n
    passed = agreement >= min_agreement if task != "regression" else n_bad == 0
    return ParityReport(task, n, n_bad, agreement, label_agreement, max_prob_diff, max_abs_diff,
                        float(tol), float(min_agreement), bool(passed))


def _parity_error(report: ParityReport, fam: str, schema: InputSchema, num: np.ndarray,
                  cat: np.ndarray, r: int, outputs: str) -> ParityError:
    # float32 holds ~7 digits: more would print noise, fewer could hide the difference.
    values = dict(zip(schema.numeric_names, (float(f"{v:.7g}") for v in num[r]), strict=True))
    values.update(zip(schema.categorical_names, (str(v) for v in cat[r]), strict=True))
    row = ", ".join(f"{k}={values[k]!r}" for k in schema.names)
    gate = (f"max diff {report.max_abs_diff:.3g} > tolerance {report.tolerance:.3g}"
            if report.task == "regression" else
            f"agreement {report.agreement:.4f} < required {report.min_agreement}, max "
            f"probability diff {report.max_prob_diff:.3g}")
    return ParityError(
        f"ONNX parity failed ({report.task}): {report.n_differing} of {report.n_rows} rows "
        f"differ ({gate}). Row {r} {{{row}}}: {outputs}. Do not ship this export: re-export "
        f"this pipeline, or fix how {fam} converts (hybridml.cloud.converters)",
        family=fam, n_rows=report.n_rows, n_differing=report.n_differing, row=r,
        report=report.to_json())


def _fmt(p: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in p) + "]"
