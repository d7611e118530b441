"""Our skl2onnx converters for HistGradientBoostingClassifier and HistGradientBoostingRegressor.

:func:`register_converters` registers them, and the exact ``CalibratedClassifierCV`` converter
of :mod:`hybridml.cloud.calibrated_onnx`, for every scikit-learn model of the process: a user's
own ``skl2onnx.convert_sklearn`` calls get them too. They are written to be correct there as
well, not only inside our pipelines: the classifier honours skl2onnx's ``raw_scores`` option
(below), so the meta-estimators that ask for decision values (``CalibratedClassifierCV``,
``StackingClassifier(stack_method="decision_function")``, ``OneVsRestClassifier``) get them.
(Binary ``decision_function`` stacking still fails to run, for every family: skl2onnx's
stacking converter stacks both ``[-s, s]`` columns where scikit-learn stacks one.)

Why: with skl2onnx 1.20 and onnx 1.23 the stock converter fails with ``Unable to create node
'TreeEnsembleClassifier'``. Its attribute lists mix Python and numpy scalars (ids as
``np.uint32``/``np.int64`` next to ``0``); the fatal one is ``nodes_missing_value_tracks_true``:
Python ``False`` for leaves, ``np.uint8`` for splits, and protobuf (under onnx's
``make_attribute``) refuses a ``bool`` in an INTS attribute. The fix belongs where the
attribute lists are built, not in onnx: we reuse skl2onnx's tree walker
(``add_tree_to_attribute_pairs_hist_gradient_boosting``, which knows the predictor's node
layout) and then write every attribute ourselves as plain Python ``int``/``float``/``str``.
Patching ``onnx.helper`` globally would change every other converter too.

While we own the converter we also make it exact, which the stock one is not:

* **Thresholds.** scikit-learn compares the float64 feature value with a float64 threshold
  (``x <= num_threshold`` goes left). Our inputs are float32, and onnxruntime's TreeEnsemble
  compares a float32 input with float32 thresholds (double thresholds are only accepted with
  double inputs). Each threshold ``t`` therefore becomes the largest float32 ``w <= t``
  (skl2onnx's ``sklearn_threshold``): for every float32 ``x``, ``x <= t`` iff ``x <= w``, so
  every row takes the same path as in scikit-learn. The stock converter rounds ``t`` to
  nearest, which sends values in ``(t, float32(t)]`` the wrong way.
* **Leaf sums.** onnxruntime sums leaf values in float32 where scikit-learn uses float64; with
  a few hundred trees that differs by ~1e-7 relative, far inside the parity gate.
* **Missing values.** ``missing_go_to_left`` becomes ``nodes_missing_value_tracks_true``:
  BRANCH_LEQ's true branch is the left child, so NaN follows the side scikit-learn learned (or
  the bigger child when training saw no NaN, which scikit-learn also stores in that flag).
* **Base values.** ``_baseline_prediction`` (shape ``[1, K]``) becomes ``base_values``; leaf
  values already include the learning rate, so every tree has weight 1.
* **Binary vs multiclass.** Binary models have one tree per iteration whose leaves score class
  1 (``class_ids`` 0, ``post_transform=LOGISTIC``); onnxruntime turns the one score ``s`` into
  ``[1 - sigmoid(s), sigmoid(s)]``, as ``predict_proba`` does. Multiclass models have ``K``
  trees per iteration; tree ``k`` of iteration ``i`` gets id ``i*K + k``, scores class ``k``,
  and ``SOFTMAX`` matches scikit-learn's multinomial loss.
* **Raw scores.** With skl2onnx's ``raw_scores`` option the probabilities output carries
  ``decision_function`` instead (``post_transform=NONE``): multiclass ``[N, K]`` raw scores;
  binary ``[-s, s]``, so column 1 is scikit-learn's 1-D ``decision_function`` (the column
  skl2onnx's calibrator and ours read). Without the option declared, skl2onnx silently fed
  probabilities to calibrators fitted on decision values (probabilities off by up to 0.83).
* **Class labels.** Integer, bool and whole-number float labels (``classes_ = [0., 1.]``)
  are written as ``classlabels_int64s`` (as the stock converter does; as strings, onnxruntime
  refused the model); strings as strings; other floats raise :class:`ExportError`.
* **Regression.** The raw score is the prediction for identity-link losses (squared error,
  absolute error, quantile); log-link losses (poisson, gamma) get an ``Exp`` node after it.

Native categorical splits (``categorical_features``) use bitsets TreeEnsemble cannot express,
and double inputs would need double thresholds; both raise :class:`ExportError` instead of
exporting a wrong model. Int and bool inputs are cast to float32 first (exact below 2**24).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from skl2onnx import update_registered_converter
from skl2onnx.common._apply_operation import apply_cast
from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
from skl2onnx.common.shape_calculator import (
    calculate_linear_classifier_output_shapes,
    calculate_linear_regressor_output_shapes,
)
from skl2onnx.common.tree_ensemble import (
    add_tree_to_attribute_pairs_hist_gradient_boosting,
    get_default_tree_classifier_attribute_pairs,
    get_default_tree_regressor_attribute_pairs,
)
from skl2onnx.proto import onnx_proto
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from hybridml.shared.errors import ExportError

from .calibrated_onnx import (
    CALIBRATED_ALIAS,
    CALIBRATED_OPTIONS,
    convert_calibrated_classifier,
    int_labels,
)

log = logging.getLogger("hybridml.cloud.converters")

ML_DOMAIN = "ai.onnx.ml"
# Our own aliases: skl2onnx's converters stay registered under their names, just unused.
CLASSIFIER_ALIAS = "HybridMLHistGradientBoostingClassifier"
REGRESSOR_ALIAS = "HybridMLHistGradientBoostingRegressor"
_INT_ATTRS = frozenset({
    "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_truenodeids",
    "nodes_falsenodeids", "nodes_missing_value_tracks_true", "class_treeids", "class_nodeids",
    "class_ids", "target_treeids", "target_nodeids", "target_ids",
})
_REAL_ATTRS = frozenset({"nodes_values", "class_weights", "target_weights", "base_values"})
_registered = False


def register_converters() -> None:
    """Make skl2onnx convert HistGradientBoosting* and CalibratedClassifierCV with our
    converters, process-wide. Safe to call again."""
    global _registered
    if _registered:
        return
    # Only parser-level options: zipmap/nocl/output_class_labels are handled after our node.
    classifier_options: dict[str, Any] = {
        "zipmap": [True, False, "columns"],
        "nocl": [True, False],
        "output_class_labels": [False, True],
        "raw_scores": [True, False],
    }
    update_registered_converter(
        HistGradientBoostingClassifier, CLASSIFIER_ALIAS,
        calculate_linear_classifier_output_shapes, convert_hgb_classifier,
        options=classifier_options)
    update_registered_converter(
        HistGradientBoostingRegressor, REGRESSOR_ALIAS,
        calculate_linear_regressor_output_shapes, convert_hgb_regressor)
    update_registered_converter(
        CalibratedClassifierCV, CALIBRATED_ALIAS, calculate_linear_classifier_output_shapes,
        convert_calibrated_classifier, options=CALIBRATED_OPTIONS)
    _registered = True
    log.debug("registered HistGradientBoosting converters %s, %s",
              CLASSIFIER_ALIAS, REGRESSOR_ALIAS)


def convert_hgb_classifier(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter: a fitted HistGradientBoostingClassifier -> TreeEnsembleClassifier."""
    op = operator.raw_operator
    loss = type(op._loss).__name__
    if loss not in ("HalfBinomialLoss", "HalfMultinomialLoss"):
        raise ExportError(f"HistGradientBoostingClassifier loss {loss!r} has no ONNX form; "
                          "use loss='log_loss'", field="loss")
    attrs: dict[str, Any] = get_default_tree_classifier_attribute_pairs()
    classes = np.asarray(op.classes_)
    if classes.dtype.kind in "biuf":
        attrs["classlabels_int64s"] = [int(c) for c in int_labels(classes)]
    else:
        attrs["classlabels_strings"] = [str(c) for c in classes]
    raw = bool(container.get_options(op, dict(raw_scores=False))["raw_scores"])
    # Raw scores: decision_function values (binary [-s, s]; see the module docstring).
    attrs["post_transform"] = ("NONE" if raw else
                               "LOGISTIC" if loss == "HalfBinomialLoss" else "SOFTMAX")
    _add_trees(op, attrs, is_classifier=True)
    container.add_node(
        "TreeEnsembleClassifier", _tree_input(scope, operator, container),
        [operator.outputs[0].full_name, operator.outputs[1].full_name],
        op_domain=ML_DOMAIN, op_version=1,
        name=scope.get_unique_operator_name("TreeEnsembleClassifier"), **_plain(attrs))


def convert_hgb_regressor(scope: Any, operator: Any, container: Any) -> None:
    """skl2onnx converter: a fitted HistGradientBoostingRegressor -> TreeEnsembleRegressor."""
    op = operator.raw_operator
    link = type(op._loss.link).__name__
    if link not in ("IdentityLink", "LogLink"):
        raise ExportError(f"HistGradientBoostingRegressor link {link!r} has no ONNX form; use "
                          "loss='squared_error', 'absolute_error', 'quantile', 'poisson' or "
                          "'gamma'", field="loss")
    attrs: dict[str, Any] = get_default_tree_regressor_attribute_pairs()
    attrs["n_targets"] = 1
    _add_trees(op, attrs, is_classifier=False)
    output = operator.outputs[0].full_name
    raw = scope.get_unique_variable_name("raw_prediction") if link == "LogLink" else output
    container.add_node(
        "TreeEnsembleRegressor", _tree_input(scope, operator, container), raw,
        op_domain=ML_DOMAIN, op_version=1,
        name=scope.get_unique_operator_name("TreeEnsembleRegressor"), **_plain(attrs))
    if link == "LogLink":
        # poisson/gamma predict exp(raw score); TreeEnsemble has no exp post_transform.
        container.add_node("Exp", raw, output, name=scope.get_unique_operator_name("Exp"))


def _add_trees(op: Any, attrs: dict[str, Any], *, is_classifier: bool) -> None:
    """Append every tree of ``op`` and its base values to ``attrs`` (skl2onnx's list layout)."""
    per_iter = int(op.n_trees_per_iteration_)
    for it, predictors in enumerate(op._predictors):
        for k, tree in enumerate(predictors):
            if tree.nodes["is_categorical"].any():
                raise ExportError(
                    "HistGradientBoosting native categorical splits cannot be exported to "
                    "ONNX; leave categorical_features unset (the pipeline one-hot encodes "
                    "categories)", field="categorical_features")
            # Tree it*K+k scores class k; adjust=True moves each threshold to the largest
            # float32 <= t (see the module docstring); weight 1: leaves include the shrinkage.
            add_tree_to_attribute_pairs_hist_gradient_boosting(
                attrs, is_classifier, tree, it * per_iter + k, 1.0, k, False,
                adjust_threshold_for_sklearn=True, dtype=np.float32)
    attrs["base_values"] = np.ravel(op._baseline_prediction)


def _plain(attrs: dict[str, Any]) -> dict[str, Any]:
    """Return ``attrs`` with plain Python ``int``/``float``/``str`` values onnx accepts."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if key == "nodes_hitrates":
            continue  # optional and all 1.0: dropping it saves a float per node
        if key in _INT_ATTRS:
            out[key] = [int(v) for v in value]  # also turns bool/np.uint8 flags into 0/1
        elif key == "nodes_modes":
            out[key] = [str(v) for v in value]
        elif key in _REAL_ATTRS:
            out[key] = [float(v) for v in np.asarray(value, dtype=np.float32)]
        else:
            out[key] = value
    return out


def _tree_input(scope: Any, operator: Any, container: Any) -> str:
    """The float32 input of the tree node; refuses double, casts int/bool to float32."""
    var = operator.inputs[0]
    if isinstance(var.type, FloatTensorType):
        return str(var.full_name)
    if isinstance(var.type, DoubleTensorType):
        raise ExportError(
            "HistGradientBoosting export takes float32 inputs (thresholds are exact for "
            "float32); feed FloatTensorType", field="initial_types")
    cast = scope.get_unique_variable_name("cast_input")
    apply_cast(scope, var.full_name, cast, container, to=onnx_proto.TensorProto.FLOAT)
    return str(cast)
