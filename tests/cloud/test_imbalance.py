"""Imbalanced classes: detection, class weights per family, the classifier metrics, the chosen
primary metric, and retrains that keep the line's quality options (docs/quality.md §1).

The data is generated (tests/cloud/imbalanced.py): ~3% "fraud" among "legit" card payments.
Runs that compare class weights fix the threshold at 0.5, so the difference is the weights'
alone (the tuned threshold has its own tests).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier

from hybridml.cloud.cli import main
from hybridml.cloud.imbalance import detect, oversample
from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.shared.errors import ConfigError
from tests.cloud.imbalanced import fraud_csv
from tests.conftest import write_orders_csv

# Few iterations keep each run to a second or two; the mlp stops before it converges.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
FAST = {"logreg": None, "hgb": {"max_iter": 20}, "gb": {"n_estimators": 30},
        "mlp": {"hidden_layer_sizes": [16], "max_iter": 40}, "sgd": None}
# mlp: sample weights where MLPClassifier.fit takes them (scikit-learn 1.7 on), else
# over-sampling (test_mlp_falls_back_to_oversampling_without_sample_weight).
MLP_HOW = "sample_weight" if "sample_weight" in inspect.signature(MLPClassifier.fit).parameters \
    else "oversampling"
HOW = {"logreg": "class_weight", "hgb": "class_weight", "gb": "sample_weight", "mlp": MLP_HOW}
MARGIN = 0.1


@pytest.fixture(scope="module")
def fraud(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated fraud CSV: 6,000 rows, ~3% fraud."""
    return fraud_csv(tmp_path_factory.mktemp("fraud") / "fraud.csv")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    """An empty registry of the test's own."""
    return Registry(tmp_path / "reg")


def fit(registry: Registry, data: Path, name: str, family: str, **quality: Any
        ) -> dict[str, Any]:
    """Train ``family`` on ``data`` with the quality options given; the manifest."""
    return train(registry, name, data=data, target="label", model=family,
                 params=FAST.get(family), quality=QualityOptions(**quality)).manifest


@pytest.mark.parametrize("family", sorted(HOW))
def test_balanced_class_weight_beats_none_on_balanced_accuracy(registry: Registry, fraud: Path,
                                                               family: str) -> None:
    plain = fit(registry, fraud, "plain", family, class_weight="none", threshold=0.5)
    weighted = fit(registry, fraud, "weighted", family, class_weight="auto", threshold=0.5)
    before = plain["metrics"]["sklearn_test"]["balanced_accuracy"]
    after = weighted["metrics"]["sklearn_test"]["balanced_accuracy"]
    assert after >= before + MARGIN, (family, before, after)
    # The shipped model carries the weighting: the edge scores it the same way.
    assert weighted["metrics"]["edge_test"]["balanced_accuracy"] >= before + MARGIN
    assert weighted["training"]["imbalance"]["how"] == HOW[family]
    assert plain["training"]["imbalance"]["how"] == "none"
    assert plain["training"]["imbalance"]["class_weight"] == "none"


def test_imbalance_record_counts_the_training_rows_by_class_name(registry: Registry,
                                                                 fraud: Path) -> None:
    m = fit(registry, fraud, "fraud", "logreg", threshold=0.5)
    record = m["training"]["imbalance"]
    assert set(record["counts"]) == {"legit", "fraud"}
    assert sum(record["counts"].values()) == m["training"]["split"]["train"]
    assert record["minority_share"] == pytest.approx(
        record["counts"]["fraud"] / m["training"]["split"]["train"], abs=1e-6)
    assert 0.02 < record["minority_share"] < 0.04
    assert record["imbalanced"] is True
    assert (record["requested"], record["class_weight"], record["how"]) == \
        ("auto", "balanced", "class_weight")


def test_balanced_classes_are_not_weighted_by_auto(iris_registry: Path) -> None:
    m = Registry(iris_registry).manifest("iris", 1)
    record = m["training"]["imbalance"]
    assert record["imbalanced"] is False and record["minority_share"] > 0.2
    assert (record["class_weight"], record["how"]) == ("none", "none")


def test_balanced_class_weight_on_regression_is_refused(registry: Registry,
                                                        tmp_path: Path) -> None:
    orders = write_orders_csv(tmp_path / "orders.csv", n=300)
    with pytest.raises(ConfigError) as err:
        train(registry, "eta", data=orders, target="delivery_minutes", model="logreg",
              drop=["late"], quality=QualityOptions(class_weight="balanced"))
    assert err.value.details["field"] == "class_weight" and "regression" in err.value.message
    m = train(registry, "eta", data=orders, target="delivery_minutes", model="logreg",
              drop=["late"]).manifest
    assert "imbalance" not in m["training"]
    assert m["metrics"]["primary"] == "rmse" and "roc_auc" not in m["metrics"]["edge_test"]


def test_binary_metrics_have_aucs_brier_f1_and_a_confusion_matrix(registry: Registry,
                                                                  fraud: Path) -> None:
    m = fit(registry, fraud, "fraud", "logreg", threshold=0.5)
    tested = m["training"]["split"]["test"]
    for side in ("sklearn_test", "edge_test"):
        block = m["metrics"][side]
        assert 0.7 < block["roc_auc"] <= 1.0
        assert 0.0 < block["pr_auc"] <= 1.0 and 0.0 < block["brier"] < 0.25
        assert 0.0 <= block["f1"] <= 1.0
        assert {"accuracy", "balanced_accuracy", "f1_macro"} <= set(block)  # kept
        confusion = block["confusion"]
        assert confusion["labels"] == m["output"]["classes"]
        matrix = np.array(confusion["matrix"])
        assert matrix.shape == (2, 2) and int(matrix.sum()) == tested
        # The diagonal is the rows labelled right: accuracy, from the same labels.
        assert np.trace(matrix) / tested == pytest.approx(block["accuracy"], abs=1e-6)
    assert m["metrics"]["edge_test"]["roc_auc"] == pytest.approx(
        m["metrics"]["sklearn_test"]["roc_auc"], abs=1e-3)


def test_multiclass_metrics_are_one_vs_rest(iris_registry: Path) -> None:
    m = Registry(iris_registry).manifest("iris", 1)
    block = m["metrics"]["edge_test"]
    assert 0.9 < block["roc_auc"] <= 1.0 and 0.0 <= block["brier"] < 0.1
    assert "pr_auc" not in block  # binary only
    assert len(block["confusion"]["labels"]) == 3
    assert int(np.array(block["confusion"]["matrix"]).sum()) == m["training"]["split"]["test"]
    assert block["f1"] == block["f1_macro"]
    assert m["metrics"]["primary"] == "accuracy"


def test_oversampling_gives_every_class_the_largest_class_rows() -> None:
    y = np.array([0] * 90 + [1] * 10)
    rows = oversample(y, seed=3)
    assert np.bincount(y[rows]).tolist() == [90, 90]
    assert set(np.flatnonzero(y == 1)) <= set(rows.tolist())  # every real row is kept
    assert np.array_equal(rows, oversample(y, seed=3))  # seeded
    counts = detect(y, ["legit", "fraud"])
    assert counts.minority == "fraud" and counts.imbalanced
    assert counts.describe() == "fraud is 10.0% of 100 training rows"


def test_chosen_primary_metric_is_recorded_and_gates_the_line(registry: Registry,
                                                             fraud: Path) -> None:
    from hybridml.cloud.gate import gate_hook

    first = fit(registry, fraud, "fraud", "logreg", primary="f1", threshold=0.5)
    assert first["metrics"]["primary"] == "f1"
    # A candidate choosing another metric is still judged on the line's (the parent's).
    second = train(registry, "fraud", data=fraud, target="label", model="logreg", seed=1,
                   quality=QualityOptions(primary="accuracy", threshold=0.5),
                   gate=gate_hook(registry, "fraud", against=1)).manifest
    assert second["metrics"]["primary"] == "accuracy"
    assert second["gate"]["metric"] == "f1"


def test_retrain_from_the_cli_inherits_the_quality_options(tmp_path: Path, fraud: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    reg_dir = str(tmp_path / "reg")
    assert main(["train", "--data", str(fraud), "--target", "label", "--name", "fraud",
                 "--model", "logreg", "--class-weight", "none", "--threshold", "0.5",
                 "--primary", "f1", "--registry", reg_dir]) == 0
    assert main(["train", "--data", str(fraud), "--target", "label", "--name", "fraud",
                 "--finetune-from", "fraud:1", "--mode", "retrain", "--registry",
                 reg_dir]) == 0
    capsys.readouterr()
    reg = Registry(Path(reg_dir))
    parent, child = reg.manifest("fraud", 1), reg.manifest("fraud", 2)
    assert child["training"]["mode"]["mode"] == "retrain"
    assert child["training"]["quality"] == parent["training"]["quality"]
    assert child["training"]["quality"]["class_weight"] == "none"
    assert child["training"]["imbalance"]["class_weight"] == "none"
    assert child["metrics"]["primary"] == "f1"
    assert parent["metrics"]["positive"] == child["metrics"]["positive"] == "fraud"
    # Flags given on a retrain are the caller's choice and win.
    assert main(["train", "--data", str(fraud), "--target", "label", "--name", "fraud",
                 "--finetune-from", "fraud:2", "--mode", "retrain", "--class-weight",
                 "balanced", "--threshold", "0.5", "--registry", reg_dir]) == 0
    assert reg.manifest("fraud", 3)["training"]["imbalance"]["how"] == "class_weight"


def test_finetune_keeps_the_parents_class_weight(registry: Registry, fraud: Path) -> None:
    parent = fit(registry, fraud, "fraud", "sgd", threshold=0.5)
    assert parent["training"]["imbalance"]["how"] == "class_weight"
    child = train(registry, "fraud", data=fraud, target="label", finetune_from="fraud:1",
                  mode="finetune").manifest
    assert child["lineage"] == "finetune"
    record = child["training"]["imbalance"]
    assert record["how"] == "class_weight (the parent's)" and record["imbalanced"] is True
    assert child["training"]["quality"] == parent["training"]["quality"]


def test_train_cli_says_the_task_is_imbalanced(tmp_path: Path, fraud: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--data", str(fraud), "--target", "label", "--name", "fraud",
                 "--model", "mlp", "--param", "hidden_layer_sizes=[16]", "--param",
                 "max_iter=40", "--registry", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    assert "imbalance: fraud is 3.1% of 4,200 training rows -> class_weight balanced " \
        f"({MLP_HOW})" in out
    assert "ROC-AUC 0." in out and "PR-AUC of fraud 0." in out


def test_mlp_falls_back_to_oversampling_without_sample_weight(
        registry: Registry, fraud: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An MLPClassifier.fit without ``sample_weight`` (scikit-learn < 1.7) is over-sampled."""
    from hybridml.cloud import imbalance

    monkeypatch.setattr(imbalance, "_fit_takes_sample_weight", lambda _est: False)
    m = fit(registry, fraud, "old", "mlp", threshold=0.5)
    assert m["training"]["imbalance"]["how"] == "oversampling"
    monkeypatch.undo()
    if MLP_HOW == "sample_weight":
        m = fit(registry, fraud, "new", "mlp", threshold=0.5)
        assert m["training"]["imbalance"]["how"] == "sample_weight"


@pytest.mark.parametrize(("counts", "imbalanced"), [
    ([90, 10], True),  # binary: limit 20%; 10% is under it
    ([75, 25], False),  # 25%: over 20%
    ([50, 50, 5], True),  # 3 classes: limit 20% x 2/3 = 13.3%; 4.8% is under it
    ([40, 40, 20], False),  # 20%: over 13.3% (the old rule called it imbalanced)
    ([100] * 9 + [50], False),  # 10 classes: limit 4%; 5.3% is over it
    ([100] * 9 + [30], True),  # 3.2%: under 4%
])
def test_imbalance_limit_scales_with_the_number_of_classes(counts: list[int],
                                                           imbalanced: bool) -> None:
    from hybridml.cloud.quality import imbalance_limit, is_imbalanced

    assert is_imbalanced(counts) is imbalanced
    assert detect(np.repeat(np.arange(len(counts)), counts),
                  [str(i) for i in range(len(counts))]).imbalanced is imbalanced
    assert imbalance_limit(2) == pytest.approx(0.2)
    assert imbalance_limit(10) == pytest.approx(0.04)


def test_digits_is_balanced_and_a_rare_third_class_is_not(registry: Registry,
                                                         tmp_path: Path) -> None:
    digits = train(registry, "digits", dataset="digits", model="logreg",
                   params={"max_iter": 200}).manifest["training"]["imbalance"]
    assert digits["imbalanced"] is False and digits["class_weight"] == "none"
    assert 0.08 < digits["minority_share"] < 0.12  # every digit near 1/10 > 4%
    path = tmp_path / "three.csv"
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array(["a", "b", "c"]), 1000, p=[0.475, 0.475, 0.05])
    rows = ["x,y,label"] + [f"{rng.normal():.4f},{rng.normal() + (lab == 'c'):.4f},{lab}"
                            for lab in labels]
    path.write_text("\n".join(rows) + "\n")
    rare = train(registry, "three", data=path, target="label", model="logreg"
                 ).manifest["training"]["imbalance"]
    assert rare["imbalanced"] is True and rare["class_weight"] == "balanced"
    assert rare["minority_share"] < 0.2 * 2 / 3
