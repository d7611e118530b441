"""Our converters under plain ``skl2onnx.convert_sklearn``, as a user's own code calls it.

In the spirit of sklearn-onnx's HistGradientBoosting tests: each test fits, converts after
``register_converters()``, runs onnxruntime and compares with scikit-learn. Covers skl2onnx's
``raw_scores`` option (what CalibratedClassifierCV and StackingClassifier ask for), the exact
CalibratedClassifierCV converter, and float class labels.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.calibration import CalibratedClassifierCV
from sklearn.datasets import load_breast_cancer, load_iris
from sklearn.ensemble import (
    GradientBoostingClassifier,
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    StackingClassifier,
)
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from hybridml.cloud.converters import register_converters
from hybridml.shared.errors import ExportError

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning", "ignore::UserWarning")
OPSET = {"": 17, "ai.onnx.ml": 3}
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with threadpool_limits(1):  # tiny HGB fits: OpenMP spinning only slows them down
        yield


def _data(name: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = (load_breast_cancer if name == "binary" else load_iris)(return_X_y=True)
    return StandardScaler().fit_transform(x).astype(np.float32), y


def _run(model: object, x: np.ndarray, **options: object) -> list[np.ndarray]:
    """Convert with plain skl2onnx (after our registration) and run onnxruntime."""
    register_converters()
    opts = {id(model): {"zipmap": False, **options}} if hasattr(model, "classes_") else None
    onx = convert_sklearn(model, initial_types=[("X", FloatTensorType([None, x.shape[1]]))],
                          target_opset=OPSET, options=opts)
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(sess.run(None, {"X": x}))


def _assert_same(model: Any, x: np.ndarray) -> None:
    label, proba = _run(model, x)
    want = model.predict_proba(x)
    np.testing.assert_allclose(proba, want, atol=TOL)
    # A row whose two top classes tie (isotonic plateaus give exact 0.5s) may go either way
    # in float32: the parity gate's tie rule. Every other label must be equal.
    top2 = np.sort(want, axis=1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > 1e-6
    np.testing.assert_array_equal(label[decided], model.predict(x)[decided])


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_hgb_classifier_with_nans_matches_sklearn(task: str) -> None:
    x, y = _data(task)
    x = x.copy()
    x[::7, 0] = np.nan
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(x, y)
    _assert_same(model, x)


def test_hgb_regressor_with_nans_matches_sklearn() -> None:
    x, y = _data("binary")
    x = x.copy()
    x[::5, 1] = np.nan
    model = HistGradientBoostingRegressor(max_iter=15, random_state=0).fit(x, x[:, 2] * 3 + y)
    (pred,) = _run(model, x)
    np.testing.assert_allclose(pred.ravel(), model.predict(x), atol=1e-4)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_hgb_raw_scores_option_gives_decision_function(task: str) -> None:
    x, y = _data(task)
    model = HistGradientBoostingClassifier(max_iter=15, random_state=0).fit(x, y)
    label, scores = _run(model, x, raw_scores=True)
    want = model.decision_function(x)
    if task == "binary":  # skl2onnx's binary convention: [-s, s], column 1 is the 1-D score
        want = np.column_stack([-want, want])
    np.testing.assert_allclose(scores, want, atol=1e-4)
    np.testing.assert_array_equal(label, model.predict(x))


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibrated_hgb_feeds_decision_values_to_the_calibrator(task: str, method: str) -> None:
    # The trap: without raw_scores, probabilities reached calibrators fitted on decision
    # values (off by up to 0.83, 66% of labels flipped on iris).
    x, y = _data(task)
    base = HistGradientBoostingClassifier(max_iter=15, random_state=0)
    _assert_same(CalibratedClassifierCV(base, method=method, cv=3).fit(x, y), x)


@pytest.mark.parametrize("est", [
    LogisticRegression(max_iter=1000), GradientBoostingClassifier(n_estimators=10),
    MLPClassifier((8,), max_iter=200, random_state=0),
    SGDClassifier(loss="log_loss", random_state=0),
    RandomForestClassifier(n_estimators=10, random_state=0),
], ids=["logreg", "gb", "mlp", "sgd", "rf"])
def test_isotonic_calibration_interpolates_like_sklearn(est: object) -> None:
    # skl2onnx's own isotonic converter takes the nearest threshold: 2-7% of rows off by up
    # to 0.1 on this data. Ours interpolates, as IsotonicRegression.predict does.
    x, y = _data("binary")
    _assert_same(CalibratedClassifierCV(est, method="isotonic", cv=3).fit(x, y), x)


def test_stacking_with_decision_function_runs_and_matches_sklearn() -> None:
    # Multiclass: skl2onnx's stacking converter stacks the raw [N, K] scores as sklearn does.
    # (Binary decision_function stacking fails in skl2onnx's stacking converter for every
    # family, stock GradientBoosting + LogisticRegression included: it stacks [N, 2].)
    x, y = _data("multiclass")
    stack = StackingClassifier(
        [("hgb", HistGradientBoostingClassifier(max_iter=10, random_state=0)),
         ("lr", LogisticRegression(max_iter=1000))],
        stack_method="decision_function", cv=3).fit(x, y)
    _assert_same(stack, x)


def test_float_class_labels_are_written_as_int64() -> None:
    x, y = _data("binary")
    model = HistGradientBoostingClassifier(max_iter=10, random_state=0).fit(x, y.astype(float))
    assert model.classes_.dtype.kind == "f"
    label, _ = _run(model, x)
    assert label.dtype == np.int64
    np.testing.assert_array_equal(label, model.predict(x).astype(np.int64))
    calibrated = CalibratedClassifierCV(
        HistGradientBoostingClassifier(max_iter=10, random_state=0), cv=3).fit(x, y.astype(float))
    label, _ = _run(calibrated, x)
    assert label.dtype == np.int64


def test_string_labels_survive_calibration() -> None:
    x, y = _data("multiclass")
    names = np.array(["setosa", "versicolor", "virginica"])[y]
    model = CalibratedClassifierCV(LogisticRegression(max_iter=1000), cv=3).fit(x, names)
    label, proba = _run(model, x)
    np.testing.assert_allclose(proba, model.predict_proba(x), atol=TOL)
    assert list(label) == list(model.predict(x))


def test_temperature_calibration_is_refused_naming_the_methods() -> None:
    x, y = _data("binary")
    model = CalibratedClassifierCV(LogisticRegression(max_iter=1000), method="temperature",
                                   cv=3).fit(x, y)
    with pytest.raises(ExportError, match="sigmoid"):
        _run(model, x)


def test_graph_labels_are_int64_for_integer_classes() -> None:
    x, y = _data("binary")
    model = CalibratedClassifierCV(LogisticRegression(max_iter=1000), cv=3).fit(x, y)
    register_converters()
    onx = convert_sklearn(model, initial_types=[("X", FloatTensorType([None, x.shape[1]]))],
                          target_opset=OPSET, options={id(model): {"zipmap": False}})
    assert onx.graph.output[0].type.tensor_type.elem_type == TensorProto.INT64
