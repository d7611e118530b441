"""Fairness reports (docs/quality.md §4): group metrics on the test split from the shipped
model's answers, --sensitive-only, the parity-gap gate, the CLI, and monitor from feedback."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.cli import main
from hybridml.cloud.data import load_csv, split
from hybridml.cloud.fairness import MIN_GROUP, MISSING_GROUP, column_report, retrain_options
from hybridml.cloud.monitor import monitor, table
from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.registry import Registry
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, DataError, FairnessError, NotFoundError
from hybridml.shared.schema import InputSchema

NOW = 1_800_000_000.0


def write_loans(path: Path, n: int = 600, seed: int = 0) -> Path:
    """x1, x2, group (A/B), approved (yes/no): B has a higher x1 and so more approvals."""
    rng = np.random.default_rng(seed)
    group = rng.choice(["A", "B"], size=n, p=[0.6, 0.4])
    x1 = rng.normal(size=n) + np.where(group == "B", 0.8, 0.0)
    x2 = rng.normal(size=n)
    p = 1 / (1 + np.exp(-(1.5 * x1 + 0.5 * x2 - 0.5)))
    approved = np.where(rng.random(n) < p, "yes", "no")
    with path.open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["x1", "x2", "group", "approved"])
        for row in zip(x1, x2, group, approved):
            out.writerow([f"{row[0]:.4f}", f"{row[1]:.4f}", row[2], row[3]])
    return path


@pytest.fixture(scope="module")
def loans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_loans(tmp_path_factory.mktemp("fair") / "loans.csv")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, loans: Path) -> Path:
    """A registry with loan v1 (--sensitive group) and v2 (--sensitive-only group)."""
    root = tmp_path_factory.mktemp("fair-reg") / "reg"
    reg = Registry(root)
    train(reg, "loan", data=loans, target="approved", model="logreg",
          quality=QualityOptions(sensitive=("group",)))
    train(reg, "loan", data=loans, target="approved", model="logreg",
          quality=QualityOptions(sensitive_only=("group",)))
    reg.close()
    return root


def shipped_labels(reg: Registry, version: int, loans: Path, sensitive_only: bool
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the shipped model answers on the test rows, their labels and their groups,
    rebuilt independently of the report."""
    ds = load_csv(loans, "approved", drop=["group"] if sensitive_only else (),
                  extras=["group"])
    test = split(ds, 0).test
    m = reg.manifest("loan", version)
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    schema = InputSchema.from_json(m["schema"])
    num, cat, y = ds.take(test)
    out = ModelSession(reg.blob_path(model["sha256"]), schema, "binary").run(
        schema.encode_blocks(num, cat))
    assert out.labels is not None
    return out.labels, y, ds.extras["group"][test]


def test_sensitive_column_reports_each_group_with_its_n_and_rates(trained: Path,
                                                                  loans: Path) -> None:
    reg = Registry(trained)
    fair = reg.manifest("loan", 1)["fairness"]
    assert fair["columns"] == ["group"] and fair["excluded"] == []
    assert fair["positive"] == "yes" and fair["passed"] is None
    labels, y, group = shipped_labels(reg, 1, loans, sensitive_only=False)
    report = fair["by_column"]["group"]
    assert sorted(report["groups"]) == ["A", "B"]
    for g in ("A", "B"):
        row = report["groups"][g]
        mine = group == g
        assert row["n"] == int(mine.sum())
        assert row["selection_rate"] == pytest.approx(float(np.mean(labels[mine] == 1)),
                                                      abs=1e-6)
        positives = mine & (y == 1)
        assert row["tpr"] == pytest.approx(float(np.mean(labels[positives] == 1)), abs=1e-6)
        assert set(row) >= {"fpr", "balanced_accuracy"} and "small" not in row
    a, b = report["groups"]["A"], report["groups"]["B"]
    assert report["demographic_parity_difference"] == pytest.approx(
        abs(a["selection_rate"] - b["selection_rate"]), abs=1e-6)
    assert report["equalized_odds_difference"] == pytest.approx(
        max(abs(a["tpr"] - b["tpr"]), abs(a["fpr"] - b["fpr"])), abs=1e-6)
    # The generated data has unequal base rates: B is answered "yes" far more often.
    assert b["selection_rate"] > a["selection_rate"] + 0.1


def test_sensitive_only_keeps_the_column_out_of_the_inputs_and_still_reports_it(
        trained: Path, loans: Path) -> None:
    import onnxruntime as ort

    reg = Registry(trained)
    m = reg.manifest("loan", 2)
    assert [f["name"] for f in m["schema"]] == ["x1", "x2"]
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    inputs = ort.InferenceSession(str(reg.blob_path(model["sha256"]))).get_inputs()
    assert [(i.name, i.shape[1]) for i in inputs] == [("num", 2)]  # no categorical block
    assert m["training"]["quality"]["sensitive_only"] == ["group"]
    fair = m["fairness"]
    assert fair["columns"] == ["group"] and fair["excluded"] == ["group"]
    labels, _, group = shipped_labels(reg, 2, loans, sensitive_only=True)
    row = fair["by_column"]["group"]["groups"]["B"]
    assert row["n"] == int(np.sum(group == "B"))
    assert row["selection_rate"] == pytest.approx(float(np.mean(labels[group == "B"] == 1)),
                                                  abs=1e-6)


def test_parity_gap_over_the_limit_refuses_with_the_numbers_and_registers_nothing(
        tmp_path: Path, loans: Path) -> None:
    reg = Registry(tmp_path / "reg")
    with pytest.raises(FairnessError) as caught:
        train(reg, "loan", data=loans, target="approved", model="logreg",
              quality=QualityOptions(sensitive=("group",), max_parity_gap=0.01))
    err = caught.value
    assert err.code == "fairness_gate" and err.status == 422
    assert "demographic parity difference on group is 0." in err.message
    assert "> 0.01 (selection rate A 0." in err.message and ", B 0." in err.message
    assert "raise --max-parity-gap" in err.message
    assert err.details["differences"]["group"] > 0.1
    assert reg.models() == []
    with pytest.raises(NotFoundError):
        reg.resolve("loan", "latest")


def test_a_gap_within_the_limit_registers_and_records_the_gate(tmp_path: Path,
                                                               loans: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = train(reg, "loan", data=loans, target="approved", model="logreg",
              quality=QualityOptions(sensitive=("group",), max_parity_gap=0.9)).manifest
    assert m["fairness"]["passed"] is True and m["fairness"]["max_parity_gap"] == 0.9


def test_a_sensitive_column_missing_from_the_csv_is_a_data_error_naming_it(
        tmp_path: Path, loans: Path) -> None:
    with pytest.raises(DataError, match="sensitive column 'sex' is not in") as caught:
        train(Registry(tmp_path / "reg"), "loan", data=loans, target="approved",
              model="logreg", quality=QualityOptions(sensitive_only=("sex",)))
    assert caught.value.details["field"] == "sex"


@pytest.mark.parametrize(("kwargs", "quality", "says"), [
    ({"data": "LOANS", "target": "approved"}, QualityOptions(sensitive=("approved",)),
     "is the target"),
    ({"dataset": "iris"}, QualityOptions(sensitive=("sex",)),
     "built-in datasets have no sensitive columns"),
    ({"dataset": "diabetes"}, QualityOptions(sensitive=("sex",), max_parity_gap=0.1),
     "a regression has not"),
    ({"dataset": "diabetes"}, QualityOptions(sensitive_only=("sex",)),
     "built-in datasets keep every feature"),
])
def test_impossible_fairness_requests_are_config_errors(
        tmp_path: Path, loans: Path, kwargs: dict[str, Any], quality: QualityOptions,
        says: str) -> None:
    kwargs = {k: (loans if v == "LOANS" else v) for k, v in kwargs.items()}
    with pytest.raises(ConfigError, match=says):
        train(Registry(tmp_path / "reg"), "x", model="logreg", quality=quality, **kwargs)


def test_small_groups_are_flagged_and_left_out_of_the_differences() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, size=60)
    pred = rng.integers(0, 2, size=60)
    values: list[Any] = ["A"] * 25 + ["B"] * 25 + ["C"] * (MIN_GROUP - 1) + [None]
    values[3] = " n/a "
    report = column_report("binary", y, pred, values, "balanced_accuracy")
    groups = report["groups"]
    assert groups["C"]["small"] is True and groups["C"]["n"] == MIN_GROUP - 1
    assert groups[MISSING_GROUP] == {**groups[MISSING_GROUP], "n": 2, "small": True}
    rates = [groups[g]["selection_rate"] for g in ("A", "B")]
    assert report["demographic_parity_difference"] == pytest.approx(max(rates) - min(rates),
                                                                    abs=1e-6)


def test_multiclass_reports_per_class_selection_rates_and_the_worst_class() -> None:
    y = np.array([0, 1, 2] * 20)
    pred = np.where(np.arange(60) < 30, 0, y)  # group A: always class "a"; B: always right
    groups = np.array(["A"] * 30 + ["B"] * 30)
    report = column_report("multiclass", y, pred, groups, "accuracy", ["a", "b", "c"])
    a, b = report["groups"]["A"], report["groups"]["B"]
    assert a["selection_rates"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert b["tpr"] == 1.0 and b["fpr"] == 0.0 and b["accuracy"] == 1.0
    assert a["tpr"] == pytest.approx(1 / 3) and a["fpr"] == pytest.approx(1 / 3)
    assert report["worst_class"] == "a"
    assert report["demographic_parity_difference"] == pytest.approx(1 - 1 / 3, abs=1e-6)


def test_regression_reports_the_error_per_group_without_differences() -> None:
    y = np.arange(20, dtype=np.float64)
    pred = y + np.where(np.arange(20) < 10, 1.0, 3.0)
    report = column_report("regression", y, pred, ["A"] * 10 + ["B"] * 10, "rmse")
    assert report == {"groups": {"A": {"n": 10, "rmse": 1.0}, "B": {"n": 10, "rmse": 3.0}}}


def test_cli_train_prints_the_group_table_and_models_shows_the_gap(
        tmp_path: Path, loans: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = str(tmp_path / "reg")
    assert main(["train", "--registry", reg, "--data", str(loans), "--target", "approved",
                 "--name", "loan", "--model", "logreg", "--sensitive", "group", "-q"]) == 0
    out = capsys.readouterr().out
    assert "fairness on the test split:" in out and "positive class: yes" in out
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("column"))
    assert header.split() == ["column", "group", "n", "selection_rate", "tpr", "fpr",
                              "balanced_accuracy"]
    assert any(line.split()[:2] == ["group", "A"] for line in lines)
    assert "group: demographic parity difference 0." in out
    dpd = Registry(Path(reg)).manifest("loan", 1)["fairness"]["by_column"]["group"][
        "demographic_parity_difference"]

    assert main(["models", "--registry", reg, "loan"]) == 0
    out = capsys.readouterr().out
    assert "parity gap" in out and f"{dpd:.2f} (group)" in out
    assert main(["models", "--registry", reg, "loan", "--version", "1"]) == 0
    out = capsys.readouterr().out
    assert "selection_rate" in out and "equalized odds difference" in out

    assert main(["train", "--registry", reg, "--data", str(loans), "--target", "approved",
                 "--name", "loan", "--model", "logreg", "--sensitive", "group",
                 "--max-parity-gap", "0.01", "-q"]) == 2
    assert "demographic parity difference on group" in capsys.readouterr().err
    assert [v.version for v in Registry(Path(reg)).versions("loan")] == [1]


def feedback_rows(loans: Path, n: int = 120) -> tuple[list[dict[str, Any]], list[str]]:
    with loans.open(newline="") as fh:
        rows = list(csv.DictReader(fh))[-n:]
    features = [{"x1": float(r["x1"]), "x2": float(r["x2"]), "group": r["group"]}
                for r in rows]
    return features, [r["approved"] for r in rows]


def test_monitor_shows_group_metrics_from_labelled_feedback(trained: Path, loans: Path,
                                                            tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(trained, root)
    reg = Registry(root)
    store = TelemetryStore(reg, clock=lambda: NOW)
    features, labels = feedback_rows(loans)
    sent = store.add_feedback("loan", "dev-1", [
        {"id": f"fb-{i}", "format": 1, "model": "loan", "features": f, "label": y}
        for i, (f, y) in enumerate(zip(features, labels))])
    assert len(sent.accepted) == len(features)
    result = monitor(store, "loan")  # v1: stable, group is an input
    fair = result["fairness"]
    assert fair["rows"] == len(features) and fair["device_answers"] == 0
    m = reg.manifest("loan", 1)
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    schema = InputSchema.from_json(m["schema"])
    answers = ModelSession(reg.blob_path(model["sha256"]), schema, "binary").run(
        schema.encode(features)).labels
    assert answers is not None
    group = np.array([f["group"] for f in features])
    row = fair["by_column"]["group"]["groups"]["A"]
    assert row["n"] == int(np.sum(group == "A"))
    assert row["selection_rate"] == pytest.approx(float(np.mean(answers[group == "A"] == 1)),
                                                  abs=1e-6)
    text = table(result)
    assert f"fairness from feedback: {len(features)} labelled rows" in text
    assert "group: demographic parity difference" in text


def test_monitor_says_a_sensitive_only_column_never_reaches_the_cloud(
        trained: Path, loans: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(trained, root)
    reg = Registry(root)
    reg.set_alias("loan", "stable", 2)
    store = TelemetryStore(reg, clock=lambda: NOW)
    features, labels = feedback_rows(loans, 20)
    store.add_feedback("loan", "dev-1", [
        {"id": f"fb-{i}", "format": 1, "model": "loan", "version": 2, "prediction": y,
         "features": {"x1": f["x1"], "x2": f["x2"]}, "label": y}
        for i, (f, y) in enumerate(zip(features, labels))])
    fair = monitor(store, "loan")["fairness"]
    assert fair["rows"] == 20 and fair["device_answers"] == 20
    assert fair["by_column"] == {} and "--sensitive-only" in fair["unavailable"]["group"]


def test_a_retrain_on_feedback_rows_drops_what_they_cannot_carry() -> None:
    asked = QualityOptions(sensitive=("region",), sensitive_only=("group",),
                           max_parity_gap=0.1)
    kept = retrain_options(asked, ["x1", "region"])
    assert kept.sensitive == ("region",) and kept.sensitive_only == ()
    assert kept.max_parity_gap == 0.1
    alone = retrain_options(QualityOptions(sensitive_only=("group",), max_parity_gap=0.1),
                            ["x1", "x2"])
    assert alone.sensitive == () and alone.max_parity_gap is None
    same = QualityOptions(sensitive=("region",))
    assert retrain_options(same, ["region"]) is same


def test_binary_rates_are_of_the_minority_class_even_when_it_sorts_first(tmp_path: Path
                                                                         ) -> None:
    """fraud data: classes ["fraud", "legit"]; a selection is a "fraud" answer (index 0)."""
    from tests.cloud.imbalanced import fraud_csv

    data = fraud_csv(tmp_path / "fraud.csv", rows=2000, seed=0)
    reg = Registry(tmp_path / "reg")
    m = train(reg, "fraud", data=data, target="label", model="logreg",
              quality=QualityOptions(sensitive=("merchant",))).manifest
    fair = m["fairness"]
    assert m["output"]["classes"] == ["fraud", "legit"]
    assert fair["positive"] == m["metrics"]["positive"] == "fraud"
    ds = load_csv(data, "label")
    num, cat, y = ds.take(split(ds, 0).test)
    schema = InputSchema.from_json(m["schema"])
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    labels = ModelSession(reg.blob_path(model["sha256"]), schema, "binary").run(
        schema.encode_blocks(num, cat)).labels
    assert labels is not None
    merchant = cat[:, schema.categorical_names.index("merchant")]
    rates = []
    for g, row in fair["by_column"]["merchant"]["groups"].items():
        mine = merchant == g
        assert row["selection_rate"] == pytest.approx(float(np.mean(labels[mine] == 0)),
                                                      abs=1e-6), g
        frauds = mine & (y == 0)
        if frauds.any():
            assert row["tpr"] == pytest.approx(float(np.mean(labels[frauds] == 0)), abs=1e-6)
        rates.append(row["selection_rate"])
    # Shares answered "fraud", not the shares answered "legit": low for the low-risk kinds.
    assert min(rates) < 0.1 and float(np.mean(labels == 0)) < 0.5
    assert fair["by_column"]["merchant"]["demographic_parity_difference"] == pytest.approx(
        max(rates) - min(rates), abs=1e-6)
