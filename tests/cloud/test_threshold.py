"""The decision threshold: the rule, its tuning, the graph that carries it, and train's choice."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest

from hybridml.cloud import metrics, threshold
from hybridml.cloud.cli import main
from hybridml.cloud.data import fit_schema, load_csv, split
from hybridml.cloud.export import check_parity, export_onnx
from hybridml.cloud.models import build_pipeline, combine
from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.quantize import quantize
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, ExportError
from hybridml.shared.schema import InputSchema
from tests.cloud.imbalanced import fraud_csv

THRESHOLDS = [round(0.05 * k, 2) for k in range(1, 20)]


@pytest.fixture(scope="module")
def fraud(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~3% "fraud" among 2,000 card payments (string labels)."""
    return fraud_csv(tmp_path_factory.mktemp("fraud") / "fraud.csv", rows=2000, seed=0)


def _fitted(path: Path, model: str, params: dict[str, object] | None = None
            ) -> tuple[object, InputSchema, np.ndarray, np.ndarray, np.ndarray]:
    ds = load_csv(path, "label")
    sp = split(ds, 0)
    xn, xc, y = ds.take(sp.train)
    schema = fit_schema(ds.schema.names, [f.kind for f in ds.schema.features], xn, xc)
    pipe = build_pipeline(model, ds.task, schema.n_numeric, schema.n_categorical, 0, params)
    pipe.fit(combine(xn, xc), y)
    tn, tc, yt = ds.take(sp.test)
    return pipe, schema, tn, tc, yt


# ----------------------------------------------------------------------------- the rule
def test_apply_says_positive_when_p1_reaches_the_threshold_in_float32() -> None:
    p1 = np.array([0.29, 0.3, 0.31, np.float32(0.3) + 1e-12, 0.0, 1.0])
    proba = np.column_stack([1 - p1, p1])
    assert threshold.apply(proba, 0.3).tolist() == [0, 1, 1, 1, 0, 1]
    # 0.1 + 1e-10 is above 0.1 in float64 but the same float32 as 0.1: it reaches it.
    assert threshold.apply(np.array([[0.9, 0.1 - 1e-10]]), 0.1).tolist() == [1]
    assert threshold.apply(proba, 0.3).dtype == np.int64


def test_apply_on_class_zero_labels_it_zero_when_p0_reaches_the_threshold() -> None:
    p0 = np.array([0.29, 0.3, 0.31, np.float32(0.3) + 1e-12, 0.0, 1.0])
    proba = np.column_stack([p0, 1 - p0])
    assert threshold.apply(proba, 0.3, 0).tolist() == [1, 0, 0, 0, 1, 0]
    assert threshold.apply(np.array([[0.1 - 1e-10, 0.9]]), 0.1, 0).tolist() == [0]
    # Positive 1 is the default (versions from before the minority rule).
    assert threshold.apply(proba, 0.3).tolist() == threshold.apply(proba, 0.3, 1).tolist()
    with pytest.raises(ConfigError, match="0 or 1") as err:
        threshold.apply(proba, 0.3, 2)
    assert err.value.details["field"] == "positive"


def test_positive_class_is_the_minority_of_the_training_rows() -> None:
    assert metrics.positive_index([360, 9640]) == 0  # ["fraud", "legit"]: fraud
    assert metrics.positive_index([9640, 360]) == 1
    assert metrics.positive_index([50, 50]) == 1  # a tie: classes[1]
    with pytest.raises(ConfigError, match="binary"):
        metrics.positive_index([1, 2, 3])
    old = {"output": {"task": "binary", "classes": ["fraud", "legit"]}, "metrics": {}}
    assert metrics.positive_of(old) == "legit" and metrics.positive_index_of(old) == 1
    new = {**old, "metrics": {"positive": "fraud"}}
    assert metrics.positive_of(new) == "fraud" and metrics.positive_index_of(new) == 0
    assert metrics.positive_of({"output": {"task": "multiclass", "classes": [0, 1, 2]}}) is None


def test_apply_refuses_probabilities_that_are_not_binary() -> None:
    with pytest.raises(ConfigError, match="binary") as err:
        threshold.apply(np.full((2, 3), 1 / 3), 0.5)
    assert err.value.details["field"] == "threshold"


def test_tune_finds_the_threshold_that_separates_the_minority() -> None:
    y = np.array([0] * 95 + [1] * 5)
    p1 = np.concatenate([np.linspace(0.0, 0.08, 95), [0.12, 0.15, 0.2, 0.25, 0.3]])
    t = threshold.tune(y, p1, "balanced_accuracy")
    assert 0.08 < t <= 0.12
    assert threshold.apply(np.column_stack([1 - p1, p1]), t).tolist() == y.tolist()
    # At 0.5 every row is "0": balanced accuracy 0.5; tuned, 1.0.
    assert threshold.tune(y, p1, "f1") == t


def test_tune_for_class_zero_scores_its_f1() -> None:
    # The same rows with the class indices swapped: class 0 is now the minority.
    y = np.array([1] * 95 + [0] * 5)
    p0 = np.concatenate([np.linspace(0.0, 0.08, 95), [0.12, 0.15, 0.2, 0.25, 0.3]])
    t = threshold.tune(y, p0, "f1", positive=0)
    assert 0.08 < t <= 0.12
    assert threshold.apply(np.column_stack([p0, 1 - p0]), t, 0).tolist() == y.tolist()


def test_tune_breaks_ties_toward_one_half() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])  # every threshold in (0.3, 0.7] is perfect
    assert threshold.tune(y, p1, "accuracy") == 0.5
    assert threshold.tune(np.zeros(4), np.array([0.1, 0.2, 0.3, 0.4]), "f1") == 0.5


def test_tune_refuses_a_metric_it_cannot_tune_for() -> None:
    with pytest.raises(ConfigError, match="rmse"):
        threshold.tune(np.array([0, 1]), np.array([0.2, 0.8]), "rmse")


# ---------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("positive", [0, 1])
def test_graph_labels_equal_apply_for_every_threshold(fraud: Path, positive: int) -> None:
    pipe, schema, tn, tc, _ = _fitted(fraud, "logreg")
    fp32 = export_onnx(pipe, schema, "binary")
    batch = schema.encode_blocks(tn, tc)
    proba = ModelSession(fp32, schema, "binary").run(batch).probabilities
    assert proba is not None
    p = proba[:, positive]
    for t in [*THRESHOLDS, float(np.sort(p)[p.size // 2])]:  # a row sits on this one
        model = threshold.add_threshold(fp32, t, positive)
        out = ModelSession(model, schema, "binary").run(batch)
        assert out.labels is not None and out.probabilities is not None
        want = threshold.apply(out.probabilities, t, positive)
        assert out.labels.tolist() == want.tolist(), t
        assert out.labels.dtype == np.int64
        if 0.2 <= t <= 0.8:  # both labels occur: the graph labels the positive class itself
            assert set(want[p >= np.float32(t)].tolist()) <= {positive}
    graph = onnx.load_from_string(model).graph
    assert [o.name for o in graph.output][:2] == ["label", "probabilities"]
    assert [i.name for i in graph.input] == [i.name for i in onnx.load_from_string(fp32)
                                             .graph.input]


def test_graph_threshold_is_refused_twice_and_on_multiclass(fraud: Path,
                                                            tmp_path: Path) -> None:
    pipe, schema, *_ = _fitted(fraud, "logreg")
    once = threshold.add_threshold(export_onnx(pipe, schema, "binary"), 0.2)
    with pytest.raises(ExportError, match="already"):
        threshold.add_threshold(once, 0.3)
    pipe3, schema3, *_ = _fitted(_three(tmp_path), "logreg")
    with pytest.raises(ExportError, match="binary"):
        threshold.add_threshold(export_onnx(pipe3, schema3, "multiclass"), 0.5)


def _three(tmp_path: Path) -> Path:
    path = tmp_path / "three.csv"
    rows = ["a,b,label"] + [f"{i % 7},{i % 5},{'xyz'[i % 3]}" for i in range(60)]
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(("positive", "t"), [(1, 0.97), (0, 0.03)])
def test_quantized_variants_of_a_thresholded_mlp_keep_the_rule(fraud: Path, positive: int,
                                                               t: float) -> None:
    pipe, schema, tn, tc, yt = _fitted(fraud, "mlp", {"hidden_layer_sizes": (48, 48),
                                                      "max_iter": 20})
    # On P(legit) (index 1) or P(fraud) (index 0): the rule must hold wherever the rows fall.
    fp32 = threshold.add_threshold(export_onnx(pipe, schema, "binary"), t, positive)
    check_parity(pipe, fp32, schema, "binary", tn, tc, threshold=t, positive=positive)
    batch = schema.encode_blocks(tn, tc)
    for variant in ("int8_dynamic", "int8_static"):
        chosen, model, report = quantize(fp32, schema, "binary", calibration=batch, test=batch,
                                         y_test=yt, tolerance=1.0, variants=(variant,))
        assert chosen == variant, report.to_json()
        out = ModelSession(model, schema, "binary").run(batch)
        assert out.labels is not None and out.probabilities is not None
        want = threshold.apply(out.probabilities, t, positive)
        assert out.labels.tolist() == want.tolist(), variant


# ------------------------------------------------------------------------- train's choice
def test_imbalanced_binary_training_tunes_and_ships_the_threshold(fraud: Path,
                                                                  tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg")
    m = train(reg, "fraud", data=fraud, target="label", model="logreg").manifest
    d = m["decision"]
    assert d["source"] == "auto" and d["tuned_for"] == "balanced_accuracy"
    # Classes sort by name, ["fraud", "legit"]: the positive class is the minority, index 0.
    assert m["output"]["classes"] == ["fraud", "legit"]
    assert d["positive"] == m["metrics"]["positive"] == "fraud"
    for side in ("sklearn_test", "edge_test"):  # PR-AUC of fraud, not of the easy "legit"
        assert 0.05 < m["metrics"][side]["pr_auc"] < 0.9, m["metrics"][side]
    assert 0.0 < d["threshold"] < 1.0 and d["threshold"] != 0.5
    assert m["metrics"]["parity"]["threshold"] == d["threshold"]
    ds = load_csv(fraud, "label")
    tn, tc, _ = ds.take(split(ds, 0).test)
    schema = InputSchema.from_json(m["schema"])
    batch = schema.encode_blocks(tn, tc)
    for a in m["artifacts"]:
        if a["role"] in ("model", "model_fp32"):
            out = ModelSession(reg.blob_path(a["sha256"]).read_bytes(), schema,
                               "binary").run(batch)
            assert out.labels is not None and out.probabilities is not None
            want = threshold.apply(out.probabilities, d["threshold"], 0)
            assert out.labels.tolist() == want.tolist(), a["role"]
            # The threshold is on P(fraud): fraud (0) exactly where P(fraud) reaches it.
            hit = out.probabilities[:, 0].astype(np.float32) >= np.float32(d["threshold"])
            assert (want == 0).tolist() == hit.tolist()
            assert (want != out.probabilities.argmax(axis=1)).any(), "the threshold matters"


def test_fixed_threshold_is_used_as_given_and_printed(fraud: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["train", "--registry", str(tmp_path / "reg"), "--name", "fraud", "--data",
                     str(fraud), "--target", "label", "--model", "logreg", "--threshold", "0.3",
                     "--quiet"]) == 0
    assert "threshold: 0.3 on P(fraud), fixed by --threshold" in out.getvalue()
    assert "PR-AUC of fraud 0." in out.getvalue()
    reg = Registry(tmp_path / "reg")
    assert reg.manifest("fraud")["decision"] == {"threshold": 0.3, "positive": "fraud",
                                                 "source": "fixed", "tuned_for": None}


def test_balanced_binary_keeps_the_argmax(tmp_path: Path) -> None:
    m = train(Registry(tmp_path / "reg"), "bc", dataset="breast_cancer", model="logreg"
              ).manifest
    assert "decision" not in m and m["metrics"]["parity"]["threshold"] is None
    assert m["metrics"]["positive"] == "malignant"  # the minority (212 of 569 rows)


@pytest.mark.parametrize("asked", ["auto", 0.3])
def test_threshold_is_refused_on_multiclass(tmp_path: Path, asked: str | float) -> None:
    with pytest.raises(ConfigError, match="--threshold") as err:
        train(Registry(tmp_path / "reg"), "iris", dataset="iris", model="logreg",
              quality=QualityOptions(threshold=asked))
    assert err.value.details["field"] == "threshold"
