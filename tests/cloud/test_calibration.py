"""Calibration (``train --calibrate``) and the calibration record of every classifier."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from threadpoolctl import threadpool_limits

from hybridml.cloud import calibration
from hybridml.cloud.cli import main
from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError
from hybridml.shared.manifest import Manifest

pytestmark = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning", "ignore::UserWarning")
SMALL = {"hgb": {"max_iter": 15}, "logreg": {}, "gb": {"n_estimators": 10}}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with threadpool_limits(1):  # small HGB fits: OpenMP spinning only slows them down
        yield


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


def _train(registry: Registry, family: str, calibrate: str, name: str = "cancer",
           **kwargs: object) -> dict:
    quality = QualityOptions(calibrate=calibrate, explainer=False)
    return train(registry, name, dataset="breast_cancer", model=family, params=SMALL[family],
                 quality=quality, **kwargs).manifest  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["hgb", "logreg"])
@pytest.mark.parametrize("method", ["sigmoid", "isotonic"])
def test_calibrated_model_registers_with_exact_onnx_probabilities(
        registry: Registry, family: str, method: str) -> None:
    m = _train(registry, family, method)
    rec = m["calibration"]
    assert (rec["method"], rec["requested"]) == (method, method)
    assert m["model"]["family"] == family and m["metrics"]["parity"]["passed"]
    # The shipped ONNX model reproduces the calibrated scikit-learn pipeline.
    meta = registry.metadata("cancer", 1)
    pipe = pickle.loads(registry.blob_path(meta["sklearn_sha256"]).read_bytes())
    assert isinstance(pipe.named_steps["est"], CalibratedClassifierCV)
    assert set(SMALL[family]) <= set(meta["params"])  # the family's own parameters
    manifest = Manifest.from_json(m)
    rows = m["golden"]["rows"]
    shipped = next(a for a in m["artifacts"] if a["role"] == "model")
    out = ModelSession(registry.blob_path(shipped["sha256"]), manifest.schema, "binary").run(
        manifest.schema.encode(rows))
    x = np.array(rows, dtype=object)
    np.testing.assert_allclose(out.probabilities, pipe.predict_proba(x), atol=1e-4)
    # The record: Brier of the shipped model (== the edge metric), the folds' uncalibrated one.
    assert rec["brier"] == pytest.approx(m["metrics"]["edge_test"]["brier"], abs=1e-6)
    assert 0.0 <= rec["brier"] < 0.25 and rec["brier_uncalibrated"] is not None
    assert sum(rec["curve"]["count"]) == m["training"]["split"]["test"]


def test_uncalibrated_classifier_still_gets_a_record(registry: Registry) -> None:
    rec = _train(registry, "logreg", "none")["calibration"]
    assert rec["method"] == "none" and rec["brier_uncalibrated"] is None
    curve = rec["curve"]
    assert curve["score"] == "positive"
    assert len(curve["mean_predicted"]) == len(curve["fraction_positive"]) == len(curve["count"])


def test_sample_weights_reach_the_calibrated_estimator(registry: Registry) -> None:
    # gb has no class_weight: balancing passes est__sample_weight through the wrapper.
    quality = QualityOptions(calibrate="sigmoid", class_weight="balanced", explainer=False)
    m = train(registry, "cancer", dataset="breast_cancer", model="gb",
              params=SMALL["gb"], quality=quality).manifest
    assert m["calibration"]["method"] == "sigmoid" and m["metrics"]["parity"]["passed"]


def test_auto_picks_isotonic_from_a_thousand_training_rows() -> None:
    few, many = np.arange(999) % 2, np.arange(1000) % 2
    assert calibration.choose("auto", "binary", "hgb", few).method == "sigmoid"
    chosen = calibration.choose("auto", "binary", "hgb", many)
    assert chosen.method == "isotonic" and "1000 training rows" in chosen.reason


def test_auto_on_a_small_dataset_trains_sigmoid(registry: Registry) -> None:
    rec = _train(registry, "logreg", "auto")["calibration"]
    assert (rec["method"], rec["requested"]) == ("sigmoid", "auto")


def test_regression_refuses_calibration_with_config_error(registry: Registry) -> None:
    with pytest.raises(ConfigError, match="regression") as err:
        train(registry, "diab", dataset="diabetes", model="logreg",
              quality=QualityOptions(calibrate="sigmoid", explainer=False))
    assert err.value.details.get("field") == "calibrate"


def test_family_without_an_exact_calibrated_form_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="the knn family") as err:
        calibration.choose("sigmoid", "binary", "knn", np.arange(30) % 2)
    assert "--calibrate none" in err.value.message


def test_a_class_with_fewer_rows_than_folds_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 3"):
        calibration.choose("isotonic", "binary", "rf", np.array([0] * 20 + [1, 1]))


def test_finetuning_a_calibrated_parent_is_refused_and_auto_retrains(
        registry: Registry) -> None:
    _train(registry, "hgb", "sigmoid")
    with pytest.raises(ConfigError, match="calibrated"):
        _train(registry, "hgb", "sigmoid", finetune_from="cancer:1", mode="finetune")
    m = train(registry, "cancer", dataset="breast_cancer", finetune_from="cancer:1",
              mode="auto").manifest
    assert m["training"]["mode"]["mode"] == "retrain"
    assert m["calibration"]["method"] == "sigmoid"  # the line's --calibrate, asked again


def test_reliability_curve_bins_positive_and_top_class_probabilities() -> None:
    y = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.95, 0.05], [0.55, 0.45], [0.5, 0.5], [0.1, 0.9], [0.0, 1.0]])
    curve = calibration.reliability_curve(y, proba)
    assert curve["count"] == [1, 1, 1, 2] and sum(curve["count"]) == 5
    assert curve["mean_predicted"] == [0.05, 0.45, 0.5, 0.95]
    assert curve["fraction_positive"] == [0.0, 0.0, 1.0, 1.0]
    # The positive class index 0 (the minority, when it sorts first): the mirror image.
    mirrored = calibration.reliability_curve(1 - y, proba[:, ::-1], positive=0)
    assert {k: mirrored[k] for k in ("count", "mean_predicted", "fraction_positive")} == \
        {k: curve[k] for k in ("count", "mean_predicted", "fraction_positive")}
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]])
    top = calibration.reliability_curve(y3, p3)
    assert top["score"] == "top" and top["count"] == [1, 1, 2]
    assert top["fraction_positive"] == [1.0, 0.0, 1.0]


def test_cli_train_prints_the_calibration_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--registry", str(tmp_path / "reg"), "--dataset", "breast_cancer",
                 "--name", "cancer", "--model", "logreg", "--calibrate", "sigmoid",
                 "--no-explainer", "--quiet"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("calibration:"))
    assert line.startswith("calibration: sigmoid, Brier 0.") and "(uncalibrated 0." in line
