"""The parity gate knows a tie: a label that float32 may break either way agrees; a real
disagreement still fails. And every built-in dataset x every family trains and registers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from hybridml.cloud import threshold
from hybridml.cloud.data import BUILTIN, fit_schema, load_builtin, split
from hybridml.cloud.export import PROB_TOLERANCE, check_parity, export_onnx
from hybridml.cloud.models import FAMILIES, build_pipeline, combine
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ParityError

# Smaller than the defaults where size does not change how a model converts: the number of
# trees or boosting rounds and the width of a hidden layer repeat the same ONNX nodes, so they
# add time, not new ways to disagree. (The defaults were all run once: see the report of
# issue 14.) logreg and sgd are cheap and keep their defaults: digits x sgd is the tie case.
MATRIX_PARAMS: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 20},
    "gb": {"n_estimators": 20},
    "hgb": {"max_iter": 20},
    "mlp": {"hidden_layer_sizes": (32,), "max_iter": 200},
}


def _fitted(name: str, model: str, seed: int = 0) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    ds = load_builtin(name)
    sp = split(ds, 0)
    xn, xc, y = ds.take(sp.train)
    schema = fit_schema(ds.schema.names, [f.kind for f in ds.schema.features], xn, xc)
    pipe = build_pipeline(model, ds.task, schema.n_numeric, schema.n_categorical, seed)
    pipe.fit(combine(xn, xc), y)
    tn, tc, _ = ds.take(sp.test)
    return pipe, schema, tn, tc


def test_digits_sgd_registers_with_its_ties_counted(tmp_path: Path) -> None:
    parity = train(Registry(tmp_path / "reg"), "digits", dataset="digits", model="sgd"
                   ).manifest["metrics"]["parity"]
    assert parity["passed"] and parity["n_differing"] == 0 and parity["agreement"] == 1.0
    assert parity["ties"] > 0
    assert parity["label_agreement"] == 1.0 - parity["ties"] / parity["n_rows"]
    assert parity["max_prob_diff"] <= parity["tolerance"]


def test_onnx_from_another_fit_still_fails_the_gate() -> None:
    pipe, schema, tn, tc = _fitted("digits", "sgd")
    other, *_ = _fitted("digits", "sgd", seed=1)
    with pytest.raises(ParityError, match="rows differ") as err:
        check_parity(pipe, export_onnx(other, schema, "multiclass"), schema, "multiclass",
                     tn, tc)
    assert err.value.details["n_differing"] > 10  # not a few ties: most rows


def test_a_threshold_tie_agrees_and_a_threshold_mismatch_fails() -> None:
    pipe, schema, tn, tc = _fitted("breast_cancer", "logreg")
    fp32 = export_onnx(pipe, schema, "binary")
    p1 = ModelSession(fp32, schema, "binary").run(schema.encode_blocks(tn, tc)).probabilities
    assert p1 is not None
    on_row = float(np.sort(p1[:, 1])[p1.shape[0] // 2])  # a row's p1 exactly: it says 1
    model = threshold.add_threshold(fp32, on_row)
    # scikit-learn's side draws the line a hair higher: that row says 0 there, a tie.
    report = check_parity(pipe, model, schema, "binary", tn, tc,
                          threshold=on_row + PROB_TOLERANCE / 2)
    assert report.passed and report.ties >= 1 and report.threshold == on_row + PROB_TOLERANCE / 2
    # The same graph checked against another threshold: probabilities agree, labels do not.
    with pytest.raises(ParityError, match="rows differ"):
        check_parity(pipe, threshold.add_threshold(fp32, 0.3), schema, "binary", tn, tc,
                     threshold=0.7)


def test_a_threshold_on_class_zero_ties_on_class_zero_s_probability() -> None:
    pipe, schema, tn, tc = _fitted("breast_cancer", "logreg")
    fp32 = export_onnx(pipe, schema, "binary")
    proba = ModelSession(fp32, schema, "binary").run(schema.encode_blocks(tn, tc)).probabilities
    assert proba is not None
    on_row = float(np.sort(proba[:, 0])[proba.shape[0] // 2])  # a row's p0 exactly: it says 0
    model = threshold.add_threshold(fp32, on_row, 0)
    report = check_parity(pipe, model, schema, "binary", tn, tc,
                          threshold=on_row + PROB_TOLERANCE / 2, positive=0)
    assert report.passed and report.ties >= 1
    # Read as a threshold on class 1's probability, the same graph disagrees.
    with pytest.raises(ParityError, match="rows differ"):
        check_parity(pipe, model, schema, "binary", tn, tc, threshold=on_row, positive=1)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("model", sorted(FAMILIES))
@pytest.mark.parametrize("dataset", BUILTIN)
def test_every_builtin_dataset_trains_and_registers_with_every_family(
        tmp_path: Path, dataset: str, model: str) -> None:
    # One thread: on a busy 2-core machine OpenMP's spinning made hgb's fit 10x slower.
    with threadpool_limits(1):
        m = train(Registry(tmp_path / "reg"), dataset, dataset=dataset, model=model,
                  params=MATRIX_PARAMS.get(model)).manifest
    parity = m["metrics"]["parity"]
    assert parity["passed"] and parity["n_differing"] == 0, parity
    assert m["version"] == 1 and m["model"]["family"] == model
