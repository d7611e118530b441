"""ONNX export and the parity gate: every family, every task, on messy synthetic data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import skl2onnx
from skl2onnx._supported_operators import sklearn_operator_name_map
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from hybridml.cloud.converters import CLASSIFIER_ALIAS, REGRESSOR_ALIAS, register_converters
from hybridml.cloud.export import ParityReport, check_parity, export_onnx
from hybridml.cloud.models import FAMILIES, build_pipeline, combine
from hybridml.shared.errors import ExportError, ParityError, SchemaError
from hybridml.shared.schema import CATEGORICAL, NUMERIC, Feature, InputSchema

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning", "ignore::UserWarning")

TASKS = ("binary", "multiclass", "regression")
# Small models: the file must stay fast on a 2-core machine.
SMALL: dict[str, dict[str, object]] = {
    "logreg": {},
    "rf": {"n_estimators": 15},
    "gb": {"n_estimators": 15},
    "hgb": {"max_iter": 15},
    "mlp": {"hidden_layer_sizes": (16,), "max_iter": 200},
    "sgd": {},
}
N_TRAIN, N_EVAL = 300, 200


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # HistGradientBoosting fits with OpenMP; on a busy 2-core machine spinning threads make
    # tiny fits take seconds. One thread is plenty for a few hundred rows.
    with threadpool_limits(1):
        yield


@dataclass
class Data:
    """Training and evaluation blocks for one task, plus the schema they share."""

    schema: InputSchema
    num: np.ndarray
    cat: np.ndarray
    y: np.ndarray
    eval_num: np.ndarray
    eval_cat: np.ndarray


def make_data(task: str, seed: int = 0) -> Data:
    """Numeric columns with NaNs and string categories with "" for missing, interleaved."""
    rng = np.random.default_rng(seed)
    n = N_TRAIN + N_EVAL
    num = np.column_stack([rng.normal(0, 1, n), rng.normal(5, 3, n),
                           rng.uniform(-100, 100, n)]).astype(np.float32)
    num[rng.random(num.shape) < 0.1] = np.nan
    colors = np.array(["red", "green", "blue", ""], dtype=object)
    shapes = np.array(["circle", "square", "triangle", "star", ""], dtype=object)
    cat = np.column_stack([colors[rng.choice(4, n, p=[0.35, 0.3, 0.25, 0.1])],
                           shapes[rng.choice(5, n, p=[0.3, 0.25, 0.2, 0.15, 0.1])]])
    filled = np.nan_to_num(num)
    score = (1.5 * filled[:, 0] - 0.4 * filled[:, 1] + 0.01 * filled[:, 2]
             + np.select([cat[:, 0] == "red", cat[:, 0] == "blue"], [1.5, -1.0], 0.0)
             + np.select([cat[:, 1] == "star", cat[:, 1] == "circle"], [2.0, -0.5], 0.0)
             + rng.normal(0, 0.3, n))
    if task == "binary":
        y = (score > np.median(score)).astype(np.int64)
    elif task == "multiclass":
        y = np.digitize(score, np.quantile(score, [1 / 3, 2 / 3])).astype(np.int64)
    else:
        y = 50.0 + 20.0 * score  # values up to ~150: the tolerance must scale with them
    tr = slice(0, N_TRAIN)
    features = (
        Feature("x0", NUMERIC, float(np.nanmin(num[tr, 0])), float(np.nanmax(num[tr, 0]))),
        Feature("color", CATEGORICAL, categories=("", "blue", "green", "red")),
        Feature("x1", NUMERIC, float(np.nanmin(num[tr, 1])), float(np.nanmax(num[tr, 1]))),
        Feature("x2", NUMERIC, float(np.nanmin(num[tr, 2])), float(np.nanmax(num[tr, 2]))),
        Feature("shape", CATEGORICAL, categories=("", "circle", "square", "star", "triangle")),
    )
    eval_num, eval_cat = num[N_TRAIN:].copy(), cat[N_TRAIN:].copy()
    # Rows the model never saw: an unknown category, and a row with everything missing.
    eval_cat[0, 0] = "purple"
    eval_cat[1, 1] = "hexagon"
    eval_num[2, :] = np.nan
    eval_cat[2, :] = ""
    return Data(InputSchema(features), num[tr], cat[tr], y[tr], eval_num, eval_cat)


@pytest.fixture(scope="module", params=TASKS)
def data(request: pytest.FixtureRequest) -> Data:
    return make_data(request.param)


def fit(family: str, task: str, d: Data, params: dict[str, object] | None = None,
        y: np.ndarray | None = None) -> Pipeline:
    pipe = build_pipeline(family, task, d.schema.n_numeric, d.schema.n_categorical, seed=0,
                          params=SMALL[family] if params is None else params)
    pipe.fit(combine(d.num, d.cat), d.y if y is None else y)
    return pipe


def task_of(d: Data) -> str:
    if d.y.dtype.kind == "f":
        return "regression"
    return "binary" if len(np.unique(d.y)) == 2 else "multiclass"


# ------------------------------------------------------------------------- every family

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_onnx_export_matches_sklearn_for_every_family(family: str, data: Data) -> None:
    task = task_of(data)
    pipe = fit(family, task, data)
    model = export_onnx(pipe, data.schema, task)
    report = check_parity(pipe, model, data.schema, task, data.eval_num, data.eval_cat)
    assert report.passed
    assert report.n_rows == N_EVAL
    assert report.n_differing == 0
    assert report.agreement == 1.0
    if task == "regression":
        assert report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
        assert report.label_agreement is None
    else:
        assert report.label_agreement == 1.0
        assert report.max_prob_diff is not None and report.max_prob_diff < 1e-4


def test_export_has_the_inputs_and_outputs_the_edge_reads(data: Data) -> None:
    task = task_of(data)
    graph = onnx.load_from_string(export_onnx(fit("rf", task, data), data.schema, task)).graph
    elem = {i.name: i.type.tensor_type.elem_type for i in [*graph.input, *graph.output]}
    assert [i.name for i in graph.input] == ["num", "cat"]
    assert elem["num"] == onnx.TensorProto.FLOAT
    assert elem["cat"] == onnx.TensorProto.STRING
    if task == "regression":
        assert [o.name for o in graph.output] == ["variable"]
        assert elem["variable"] == onnx.TensorProto.FLOAT
    else:
        assert [o.name for o in graph.output] == ["label", "probabilities"]
        assert elem["label"] == onnx.TensorProto.INT64
        assert elem["probabilities"] == onnx.TensorProto.FLOAT


def test_export_takes_a_schema_with_only_numeric_columns() -> None:
    d = make_data("binary")
    schema = InputSchema(tuple(f for f in d.schema.features if f.kind == NUMERIC))
    no_cat = np.empty((N_TRAIN, 0), dtype=object)
    only_num = Data(schema, d.num, no_cat, d.y, d.eval_num, np.empty((N_EVAL, 0), dtype=object))
    pipe = fit("logreg", "binary", only_num)
    model = export_onnx(pipe, schema, "binary")
    report = check_parity(pipe, model, schema, "binary", only_num.eval_num, only_num.eval_cat)
    assert report.n_differing == 0


# ------------------------------------------------------------------ HistGradientBoosting

@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_hgb_classifier_pipeline_reproduces_labels_and_probabilities(task: str) -> None:
    d = make_data(task, seed=1)
    pipe = fit("hgb", task, d, {"max_iter": 40})
    report = check_parity(pipe, export_onnx(pipe, d.schema, task), d.schema, task,
                          d.eval_num, d.eval_cat)
    assert report.label_agreement == 1.0
    assert report.max_prob_diff is not None and report.max_prob_diff < 1e-5


def test_hgb_regressor_pipeline_reproduces_predictions() -> None:
    d = make_data("regression", seed=1)
    pipe = fit("hgb", "regression", d, {"max_iter": 40})
    report = check_parity(pipe, export_onnx(pipe, d.schema, "regression"), d.schema,
                          "regression", d.eval_num, d.eval_cat)
    assert report.max_abs_diff is not None and report.max_abs_diff < 1e-4


def _bare_onnx(model: object, x: np.ndarray) -> ort.InferenceSession:
    register_converters()
    options = {"zipmap": False} if isinstance(model, HistGradientBoostingClassifier) else None
    onx = skl2onnx.to_onnx(model, x[:1], options=options,
                           target_opset={"": 17, "ai.onnx.ml": 3})
    return ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_hgb_converter_sends_nan_where_sklearn_learned_to(n_classes: int) -> None:
    # The pipelines impute, so this feeds NaN straight to the model: training saw NaNs in
    # column 0 (learned direction) and none in column 1 (sklearn sends NaN to the bigger child).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3)).astype(np.float32)
    y = np.digitize(x[:, 0] + x[:, 1], [-0.5, 0.5][: n_classes - 1])
    x[rng.random(400) < 0.2, 0] = np.nan
    y[np.isnan(x[:, 0])] = n_classes - 1  # missing means the top class
    model = HistGradientBoostingClassifier(max_iter=20, random_state=0).fit(x, y)
    test = rng.normal(size=(300, 3)).astype(np.float32)
    test[::3, 0] = np.nan
    test[1::3, 1] = np.nan
    label, proba = _bare_onnx(model, x).run(None, {"X": test})
    np.testing.assert_array_equal(label, model.predict(test))
    np.testing.assert_allclose(proba, model.predict_proba(test), atol=1e-5)


def test_hgb_converter_is_exact_for_values_at_float32_rounded_thresholds() -> None:
    # With fewer distinct values than bins, thresholds are float64 midpoints; a float32 input
    # equal to float32(t) > t must still go right, as in sklearn. Rounding t to nearest fails.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    y = 3.0 * x[:, 0] + np.sin(2.0 * x[:, 1])
    model = HistGradientBoostingRegressor(max_iter=20, random_state=0).fit(
        x.astype(np.float64), y)
    rows = []
    for (tree,) in model._predictors:
        split = tree.nodes[tree.nodes["is_leaf"] == 0]
        for feature, t in zip(split["feature_idx"], split["num_threshold"], strict=True):
            row = np.median(x, axis=0)
            row[feature] = np.float32(t)
            rows.append(row)
    test = np.array(rows, dtype=np.float32)
    assert (test.max(axis=1) >= 0).any() and len(test) > 50
    got = _bare_onnx(model, x).run(None, {"X": test})[0].ravel()
    np.testing.assert_allclose(got, model.predict(test.astype(np.float64)), atol=1e-5)


def test_hgb_poisson_regressor_applies_the_exp_link() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    y = rng.poisson(np.exp(0.5 * x[:, 0] + 1.0))
    model = HistGradientBoostingRegressor(loss="poisson", max_iter=20, random_state=0).fit(x, y)
    got = _bare_onnx(model, x).run(None, {"X": x})[0].ravel()
    np.testing.assert_allclose(got, model.predict(x), rtol=1e-5)


def test_register_converters_is_idempotent_and_owns_both_hgb_models() -> None:
    register_converters()
    register_converters()
    assert sklearn_operator_name_map[HistGradientBoostingClassifier] == CLASSIFIER_ALIAS
    assert sklearn_operator_name_map[HistGradientBoostingRegressor] == REGRESSOR_ALIAS


def test_export_names_family_and_fix_when_hgb_uses_native_categories() -> None:
    d = make_data("binary")
    n_num = d.schema.n_numeric
    # One-hot columns follow the numerics; marking them categorical makes bitset splits.
    pipe = fit("hgb", "binary", d, {"max_iter": 10, "categorical_features": [n_num, n_num + 1,
                                                                              n_num + 2]})
    with pytest.raises(ExportError) as err:
        export_onnx(pipe, d.schema, "binary")
    assert err.value.code == "export"
    assert "hgb" in err.value.message
    assert "categorical_features" in err.value.message


# ------------------------------------------------------------------------- the gate bites

def test_parity_fails_with_row_count_when_model_is_another_pipelines_export() -> None:
    d = make_data("binary")
    pipe = fit("logreg", "binary", d)
    other = fit("logreg", "binary", d, y=1 - d.y)  # same data, opposite labels
    wrong = export_onnx(other, d.schema, "binary")
    with pytest.raises(ParityError) as err:
        check_parity(pipe, wrong, d.schema, "binary", d.eval_num, d.eval_cat)
    msg = err.value.message
    assert err.value.code == "parity"
    assert f"of {N_EVAL} rows differ" in msg
    assert "color=" in msg and "x2=" in msg  # the differing row, by column name
    assert "sklearn label" in msg and "onnx label" in msg
    assert err.value.details["n_rows"] == N_EVAL
    assert err.value.details["n_differing"] > N_EVAL // 2


def test_parity_fails_for_regression_when_predictions_drift() -> None:
    d = make_data("regression")
    pipe = fit("rf", "regression", d)
    shifted = export_onnx(fit("rf", "regression", d, y=d.y + 1.0), d.schema, "regression")
    with pytest.raises(ParityError) as err:
        check_parity(pipe, shifted, d.schema, "regression", d.eval_num, d.eval_cat)
    assert f"of {N_EVAL} rows differ" in err.value.message
    assert "sklearn" in err.value.message and "onnx" in err.value.message


def test_parity_tolerates_a_few_flips_within_min_agreement() -> None:
    d = make_data("multiclass")
    pipe = fit("rf", "multiclass", d)
    other = export_onnx(fit("rf", "multiclass", d, params={"n_estimators": 15,
                                                           "random_state": 1}),
                        d.schema, "multiclass")
    with pytest.raises(ParityError):
        check_parity(pipe, other, d.schema, "multiclass", d.eval_num, d.eval_cat)
    report = check_parity(pipe, other, d.schema, "multiclass", d.eval_num, d.eval_cat,
                          min_agreement=0.0)
    assert report.passed and report.label_agreement is not None
    assert report.agreement <= report.label_agreement < 1.0
    # At tolerance 1 every probability agrees and every decision is a tie: all rows agree.
    loose = check_parity(pipe, other, d.schema, "multiclass", d.eval_num, d.eval_cat,
                         tolerance=1.0)
    assert loose.agreement == 1.0 and loose.ties == round(N_EVAL * (1 - report.label_agreement))


def test_parity_report_serialises_to_json() -> None:
    d = make_data("binary")
    pipe = fit("sgd", "binary", d)
    report = check_parity(pipe, export_onnx(pipe, d.schema, "binary"), d.schema, "binary",
                          d.eval_num, d.eval_cat)
    body = json.loads(json.dumps(report.to_json()))
    assert body["n_rows"] == N_EVAL and body["task"] == "binary" and body["passed"] is True
    with pytest.raises(AttributeError):
        report.n_rows = 0  # type: ignore[misc]
    assert isinstance(report, ParityReport)


def test_export_refuses_a_task_the_model_was_not_trained_for() -> None:
    d = make_data("binary")
    with pytest.raises(ExportError) as err:
        export_onnx(fit("logreg", "binary", d), d.schema, "regression")
    assert "logreg" in err.value.message and "'regression'" in err.value.message


def test_check_parity_refuses_blocks_that_do_not_match_the_schema() -> None:
    d = make_data("binary")
    pipe = fit("logreg", "binary", d)
    model = export_onnx(pipe, d.schema, "binary")
    with pytest.raises(SchemaError) as err:
        check_parity(pipe, model, d.schema, "binary", d.eval_num[:, :2], d.eval_cat)
    assert "num" in err.value.message
