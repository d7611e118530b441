"""Quantization candidates and the accuracy guard, on real skl2onnx graphs and onnxruntime."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, StringTensorType
from sklearn.datasets import load_diabetes, load_digits
from sklearn.exceptions import ConvergenceWarning

from hybridml.cloud.models import build_pipeline, combine
from hybridml.cloud.quantize import (
    NOT_QUANTIZABLE,
    Candidate,
    QuantizationReport,
    decide,
    quantize,
)
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, DataError, QuantizationError
from hybridml.shared.schema import CATEGORICAL, NUMERIC, EncodedBatch, Feature, InputSchema

INT8 = ("int8_dynamic", "int8_static")


@dataclass
class Case:
    """An exported model with its schema, task and data splits."""

    fp32: bytes
    schema: InputSchema
    task: str
    train: EncodedBatch
    test: EncodedBatch
    y_test: np.ndarray

    def run(self, **kwargs: Any) -> tuple[str, bytes, QuantizationReport]:
        kwargs.setdefault("calibration", self.train)
        return quantize(self.fp32, self.schema, self.task, test=self.test, y_test=self.y_test,
                        **kwargs)


def _case(family: str, task: str, num: np.ndarray, cat: np.ndarray, y: np.ndarray,
          n_train: int, params: dict[str, Any]) -> Case:
    n_num, n_cat = num.shape[1], cat.shape[1]
    pipe = build_pipeline(family, task, n_num, n_cat, 0, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(combine(num[:n_train], cat[:n_train]), y[:n_train])
    types: list[tuple[str, Any]] = []
    if n_num:
        types.append(("num", FloatTensorType([None, n_num])))
    if n_cat:
        types.append(("cat", StringTensorType([None, n_cat])))
    options = None if task == "regression" else {type(pipe.steps[-1][1]): {"zipmap": False}}
    model = to_onnx(pipe, initial_types=types, options=options,
                    target_opset={"": 17, "ai.onnx.ml": 3})
    schema = InputSchema(tuple([Feature(f"x{i}", NUMERIC) for i in range(n_num)]
                               + [Feature(f"c{i}", CATEGORICAL, categories=("a", "b", "c"))
                                  for i in range(n_cat)]))
    rows = [[*map(float, a), *b] for a, b in zip(num, cat, strict=True)]
    train, test = schema.encode(rows[:n_train]), schema.encode(rows[n_train:])
    return Case(model.SerializeToString(), schema, task, train, test, y[n_train:])


def _no_cat(n: int) -> np.ndarray:
    return np.empty((n, 0), dtype=object)


@pytest.fixture(scope="module")
def digits_mlp() -> Case:
    """A small MLP on sklearn digits: 64 numeric pixels, 10 classes."""
    x, y = load_digits(return_X_y=True)
    return _case("mlp", "multiclass", x.astype(np.float32), _no_cat(len(x)), y, 1200,
                 {"hidden_layer_sizes": (64,), "max_iter": 100})


@pytest.fixture(scope="module")
def mixed() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic binary data with 2 numeric (some missing) and 2 categorical columns."""
    rng = np.random.default_rng(0)
    num = rng.normal(size=(400, 2)).astype(np.float32)
    num[::23, 0] = np.nan
    cat = rng.choice(["a", "b", "c", ""], size=(400, 2)).astype(object)
    y = ((np.nan_to_num(num[:, 1]) + (cat[:, 0] == "a") - (cat[:, 1] == "c")) > 0.3)
    return num, cat, y.astype(np.int64)


def test_mlp_int8_candidates_are_smaller_and_one_ships_within_tolerance(digits_mlp: Case) -> None:
    variant, data, report = digits_mlp.run(tolerance=0.05)
    fp32_size = len(digits_mlp.fp32)
    for name in INT8:
        c = report.candidate(name)
        assert c.status in ("chosen", "accepted"), c
        assert c.size is not None and c.size < fp32_size * 0.6
    assert variant in INT8 and report.chosen == variant
    assert len(data) == report.candidate(variant).size
    assert len(data) == min(c.size or 0 for c in report.candidates)
    assert report.candidate("fp32").status == "accepted"
    # The shipped bytes are a working model that scores what the report says.
    out = ModelSession(data, digits_mlp.schema, "multiclass").run(digits_mlp.test)
    assert report.metric == "accuracy"
    assert np.mean(out.labels == digits_mlp.y_test) == report.candidate(variant).metric_value


def test_default_tolerance_ships_the_smallest_candidate_within_half_a_point(
        digits_mlp: Case) -> None:
    variant, _, report = digits_mlp.run()
    assert report.tolerance == 0.005
    within = [c for c in report.candidates if c.drop is not None and c.drop <= 0.005]
    assert variant == min(within, key=lambda c: c.size or 0).variant
    assert report.candidate(variant).status == "chosen"
    for c in report.candidates:
        assert c.latency_us is not None and c.latency_us > 0
        assert (c.status == "rejected") == (c.drop is not None and c.drop > 0.005)


def test_zero_tolerance_rejects_every_int8_candidate_that_drops(digits_mlp: Case) -> None:
    _, _, report = digits_mlp.run(tolerance=0.0)
    for name in INT8:
        c = report.candidate(name)
        assert c.drop is not None
        assert (c.status == "rejected") == (c.drop > 0)
        if c.status == "rejected":
            assert c.reason == f"accuracy drop {c.drop:.4f} > tolerance 0"


@pytest.mark.parametrize("tolerance", [0.0, None])
def test_badly_calibrated_static_model_is_rejected_and_fp32_ships(digits_mlp: Case,
                                                                  tolerance: float | None) -> None:
    # Calibrating on one repeated row gives activation ranges far too narrow: a real drop.
    mean_row = digits_mlp.train.num.mean(axis=0)
    calibration = digits_mlp.schema.encode(np.tile(mean_row, (8, 1)).tolist())
    variant, data, report = digits_mlp.run(calibration=calibration, tolerance=tolerance,
                                           variants=("int8_static",))
    static = report.candidate("int8_static")
    assert static.status == "rejected"
    assert static.drop is not None and static.drop > 0.05
    assert "> tolerance" in static.reason
    assert (variant, data) == ("fp32", digits_mlp.fp32)
    assert report.candidate("fp32").status == "chosen"


def test_negative_tolerance_is_a_config_error(digits_mlp: Case) -> None:
    with pytest.raises(ConfigError, match="tolerance") as err:
        digits_mlp.run(tolerance=-0.01)
    assert err.value.details["field"] == "tolerance"


@pytest.mark.parametrize("family", ["rf", "logreg"])
def test_tree_and_linear_graphs_get_not_applicable_candidates_and_ship_fp32(family: str,
                                                                           mixed: Any) -> None:
    num, cat, y = mixed
    case = _case(family, "binary", num, cat, y, 300, {"n_estimators": 5} if family == "rf"
                 else {})
    variant, data, report = case.run()
    assert (variant, data) == ("fp32", case.fp32)
    assert report.metric == "balanced_accuracy"
    assert report.candidate("fp32").status == "chosen"
    for name in INT8:
        c = report.candidate(name)
        assert (c.status, c.reason) == ("not_applicable", NOT_QUANTIZABLE)
    assert NOT_QUANTIZABLE in report.preprocess


def test_int8_that_is_not_smaller_is_not_applicable(mixed: Any) -> None:
    # A 2+6-input SGD classifier has one tiny MatMul: quantizing only adds nodes.
    num, cat, y = mixed
    case = _case("sgd", "binary", num, cat, y, 300, {})
    variant, _, report = case.run()
    assert variant == "fp32"
    for name in INT8:
        c = report.candidate(name)
        assert c.status == "not_applicable"
        assert "not smaller than fp32" in c.reason


def test_regression_mlp_is_judged_by_relative_rmse_rise() -> None:
    x, y = load_diabetes(return_X_y=True)
    case = _case("mlp", "regression", x.astype(np.float32), _no_cat(len(x)), y, 340,
                 {"hidden_layer_sizes": (64, 32), "max_iter": 200, "early_stopping": False})
    variant, _, report = case.run()
    assert report.metric == "rmse" and report.tolerance == 0.01
    base = report.candidate("fp32").metric_value
    assert base is not None and base > 0
    for name in INT8:
        c = report.candidate(name)
        assert c.metric_value is not None and c.drop is not None
        assert c.drop == pytest.approx((c.metric_value - base) / base)
        assert (c.status == "rejected") == (c.drop > 0.01)
    assert report.candidate(variant).status == "chosen"


def test_categorical_string_input_still_quantizes_and_stays_out_of_int8(mixed: Any) -> None:
    num, cat, y = mixed
    case = _case("mlp", "binary", num, cat, y, 300,
                 {"hidden_layer_sizes": (64, 32), "max_iter": 100})
    _, _, report = case.run(tolerance=1.0)  # accept all: this test checks the graphs
    assert report.metric == "balanced_accuracy"
    for name in INT8:
        assert report.candidate(name).status in ("chosen", "accepted"), report.candidate(name)
    for name in INT8:
        variant, data, _ = case.run(tolerance=1.0, variants=(name,))
        assert variant == name
        model = onnx.load_from_string(data)
        assert [i.name for i in model.graph.input] == ["num", "cat"]
        ml_ops = [n for n in model.graph.node if n.domain == "ai.onnx.ml"]
        assert {n.op_type for n in ml_ops} >= {"OneHotEncoder", "Imputer", "Scaler"}
        dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        assert not any(dq.intersection(n.input) for n in ml_ops)
        assert any(n.op_type in ("MatMulInteger", "DequantizeLinear") for n in model.graph.node)
        out = ModelSession(data, case.schema, "binary").run(case.test)
        assert out.labels is not None and len(out.labels) == len(case.test)


def test_static_candidate_without_calibration_rows_fails_without_breaking(digits_mlp: Case) -> None:
    variant, _, report = digits_mlp.run(calibration=digits_mlp.train.take([]), tolerance=0.05)
    static = report.candidate("int8_static")
    assert static.status == "failed"
    assert "no calibration rows" in static.reason
    assert variant == "int8_dynamic"


def test_report_json_round_trips(digits_mlp: Case) -> None:
    _, _, report = digits_mlp.run(calibration=digits_mlp.train.take([]))
    text = json.dumps(report.to_json(), allow_nan=False)
    again = QuantizationReport.from_json(json.loads(text))
    assert again == report
    assert [c["variant"] for c in json.loads(text)["candidates"]] == ["fp32", *INT8]


def test_report_to_table_lists_every_candidate_with_its_reason(digits_mlp: Case) -> None:
    _, _, report = digits_mlp.run(tolerance=0.0)
    table = report.to_table()
    lines = table.splitlines()
    assert "accuracy" in lines[0] and "tolerance 0" in lines[0]
    for c in report.candidates:
        assert any(line.strip().startswith(c.variant) and c.reason in line for line in lines)


def test_from_json_names_what_is_missing() -> None:
    with pytest.raises(QuantizationError, match="not a quantization report"):
        QuantizationReport.from_json({"metric": "accuracy"})


def test_guard_prefers_fp32_on_size_tie_and_rejects_non_finite_metrics() -> None:
    base = Candidate("fp32", "accepted", "baseline", size=100, metric_value=2.0, drop=0.0)
    same = Candidate("int8_dynamic", "accepted", "", size=100, metric_value=2.0)
    nan = Candidate("int8_static", "accepted", "", size=10, metric_value=math.nan)
    report = decide("rmse", 0.01, base, [base, same, nan])
    assert report.chosen == "fp32"
    assert report.candidate("int8_dynamic").status == "accepted"
    assert report.candidate("int8_static").status == "rejected"
    assert report.to_json()["candidates"][2]["metric_value"] is None


def test_bad_arguments_name_the_field(digits_mlp: Case) -> None:
    with pytest.raises(ConfigError, match="int4") as err:
        digits_mlp.run(variants=("int4",))
    assert err.value.details["field"] == "variants"
    with pytest.raises(ConfigError, match="task"):
        quantize(digits_mlp.fp32, digits_mlp.schema, "ranking", calibration=digits_mlp.train,
                 test=digits_mlp.test, y_test=digits_mlp.y_test)
    with pytest.raises(DataError, match="y_test"):
        quantize(digits_mlp.fp32, digits_mlp.schema, "multiclass", calibration=digits_mlp.train,
                 test=digits_mlp.test, y_test=digits_mlp.y_test[:-1])
