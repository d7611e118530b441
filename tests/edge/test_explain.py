"""Explanations on the device (docs/quality.md §3): the explainer artifact, ``rt.explain`` and
``hybridml-edge predict --explain``, checked against the model and against shap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shap

from hybridml.cloud.explainers import raw_columns
from hybridml.cloud.models import combine
from hybridml.cloud.quality import QualityOptions
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge import explain as device
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.store import LocalStore
from hybridml.shared.errors import IntegrityError, NoModelError
from hybridml.shared.schema import InputSchema
from tests.conftest import start_cloud, write_orders_csv
from tests.edgekit import install
from tests.explainkit import FEATURES, ROWS, build_registry, model_output, pipeline

EDGE = str(Path(sys.executable).parent / "hybridml-edge")
VERSIONS = [("late_logreg", "logreg"), ("late_rf", "rf"), ("late_gb", "gb"),
            ("late_hgb", "hgb"), ("late_mlp", "mlp"), ("minutes_logreg", "logreg"),
            ("minutes_gb", "gb"), ("iris_logreg", "logreg"), ("iris_hgb", "hgb")]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return build_registry(tmp_path_factory.mktemp("explain"), VERSIONS)


def _runtime(reg: Registry, name: str, tmp_path: Path) -> EdgeRuntime:
    store = LocalStore(tmp_path / f"store-{name}")
    install(reg, name, store)
    return EdgeRuntime(store, name, telemetry=False)


def _rows(name: str) -> list[Any]:
    if name.startswith("iris"):
        return [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, None, 4.2, 1.3]]
    return list(ROWS)


@pytest.mark.parametrize("name", ["late_logreg", "late_rf", "late_gb", "late_hgb",
                                  "minutes_logreg", "minutes_gb", "iris_logreg", "iris_hgb"])
def test_base_value_plus_attributions_reproduce_the_model_output(reg: Registry, name: str,
                                                                 tmp_path: Path) -> None:
    rt = _runtime(reg, name, tmp_path)
    rows = _rows(name)
    answers = rt.explain(rows)
    manifest = reg.manifest(name, "stable")
    assert [a["prediction"] for a in answers] == [p.prediction for p in rt.predict(rows)]
    space = answers[0]["space"]
    assert {a["space"] for a in answers} == {space} == {manifest["explain"]["space"]}
    assert answers[0]["method"] == manifest["explain"]["method"]
    want = model_output(reg, name, rows, space, [a["class"] for a in answers])
    got = np.array([a["base_value"] + sum(a["attributions"].values()) for a in answers])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    if manifest["output"]["task"] == "multiclass":  # the predicted class is explained
        assert [a["class"] for a in answers] == [a["prediction"] for a in answers]
    if manifest["output"]["task"] == "binary":  # the positive class, whatever its index
        assert {a["class"] for a in answers} == {manifest["metrics"]["positive"]}


def test_spaces_and_methods_are_named_per_family(reg: Registry) -> None:
    expect = {"late_logreg": ("linear", "log_odds"), "late_rf": ("tree_shap", "probability"),
              "late_gb": ("tree_shap", "log_odds"), "late_hgb": ("tree_shap", "log_odds"),
              "minutes_gb": ("tree_shap", "raw"), "iris_hgb": ("tree_shap", "raw")}
    for name, (method, space) in expect.items():
        block = reg.manifest(name, "stable")["explain"]
        assert (block["method"], block["space"]) == (method, space), name
        assert block["output"]


@pytest.mark.parametrize("name", ["late_rf", "late_gb", "late_hgb", "minutes_gb",
                                  "iris_hgb"])
def test_device_tree_shap_equals_shap_tree_path_dependent(reg: Registry, name: str,
                                                          tmp_path: Path) -> None:
    _agrees_with_shap(reg, name, tmp_path, linear=False)


@pytest.mark.parametrize("name", ["late_logreg", "minutes_logreg", "iris_logreg"])
def test_device_linear_equals_shap_linear_explainer_on_the_same_background(
        reg: Registry, name: str, tmp_path: Path) -> None:
    _agrees_with_shap(reg, name, tmp_path, linear=True)


def _agrees_with_shap(reg: Registry, name: str, tmp_path: Path, *, linear: bool,
                     rows: list[Any] | None = None) -> None:
    from hybridml.cloud.explainers import background

    rt = _runtime(reg, name, tmp_path)
    rows = _rows(name) if rows is None else rows
    answers = rt.explain(rows)
    schema = InputSchema.from_json(reg.manifest(name, "stable")["schema"])
    pipe = pipeline(reg, name)
    batch = schema.encode(rows)
    xt = pipe.named_steps["pre"].transform(combine(batch.num.astype(np.float64), batch.cat))
    est = pipe.named_steps["est"]
    if linear:
        bg = background(reg, reg.metadata(name, reg.resolve(name, "stable")), schema)
        sv = shap.LinearExplainer(est, pipe.named_steps["pre"].transform(bg)).shap_values(xt)
    else:
        sv = shap.TreeExplainer(est, feature_perturbation="tree_path_dependent"
                                ).shap_values(xt)
    sv = np.asarray(sv)
    sv = sv[:, :, None] if sv.ndim == 2 else sv
    group = np.zeros((xt.shape[1], len(schema.names)))
    group[np.arange(xt.shape[1]), raw_columns(pipe, schema)] = 1.0
    per_raw = np.einsum("npk,pf->nfk", sv, group)
    classes = reg.manifest(name, "stable")["output"]["classes"]
    for r, a in enumerate(answers):
        k = 0 if per_raw.shape[2] == 1 else classes.index(a["class"])
        # One shap output is classes[1]'s margin; the positive class classes[0] mirrors it.
        sign = -1.0 if per_raw.shape[2] == 1 and classes and a["class"] == classes[0] else 1.0
        np.testing.assert_allclose([a["attributions"][n] for n in schema.names],
                                   sign * per_raw[r, :, k], rtol=1e-4, atol=1e-8)


def test_one_hot_categories_are_summed_onto_their_raw_column(reg: Registry,
                                                              tmp_path: Path) -> None:
    rt = _runtime(reg, "late_logreg", tmp_path)
    answers = rt.explain(ROWS)
    assert all(list(a["attributions"]) == FEATURES for a in answers)
    # restaurant's attribution is the sum over its one-hot columns of coef * (x - mean)
    from hybridml.cloud.explainers import background

    name = "late_logreg"
    schema = InputSchema.from_json(reg.manifest(name, "stable")["schema"])
    pipe = pipeline(reg, name)
    pre, est = pipe.named_steps["pre"], pipe.named_steps["est"]
    bg = pre.transform(background(reg, reg.metadata(name, 1), schema)).mean(axis=0)
    batch = schema.encode(ROWS)
    xt = pre.transform(combine(batch.num.astype(np.float64), batch.cat))
    cols = raw_columns(pipe, schema) == schema.names.index("restaurant")
    assert cols.sum() == 5  # r000..r004
    want = ((xt - bg)[:, cols] * est.coef_[0][cols]).sum(axis=1)
    np.testing.assert_allclose([a["attributions"]["restaurant"] for a in answers], want,
                               rtol=1e-9)
    # r999 was never seen: its one-hot columns are all zero, explained like any row
    assert np.isfinite(answers[3]["attributions"]["restaurant"])


def test_text_columns_are_explained_like_typed_rows(reg: Registry, tmp_path: Path) -> None:
    rt = _runtime(reg, "late_gb", tmp_path)
    cols = {"restaurant": ["r003"], "hour": ["19"], "distance_km": ["7.5"], "rain": ["yes"],
            "items": ["3"]}
    assert rt.explain(cols) == rt.explain(ROWS[:1])


def test_mlp_has_no_device_explainer_and_says_to_ask_the_cloud(reg: Registry,
                                                                tmp_path: Path) -> None:
    manifest = reg.manifest("late_mlp", "stable")
    assert "explain" not in manifest
    assert [a["role"] for a in manifest["artifacts"]] == ["model", "model_fp32"]
    rt = _runtime(reg, "late_mlp", tmp_path)
    with pytest.raises(NoModelError) as err:
        rt.explain(ROWS)
    assert "its family is mlp" in err.value.message
    assert "POST /v1/models/late_mlp/explain" in err.value.message


def test_a_version_trained_without_explainer_has_no_artifact(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "r")
    csv = write_orders_csv(tmp_path / "o.csv", n=200)
    m = train(reg, "plain", data=csv, target="late", model="logreg",
              drop=["delivery_minutes"], quality=QualityOptions(explainer=False)).manifest
    assert "explain" not in m and all(a["role"] != "explainer" for a in m["artifacts"])


def test_an_explainer_that_does_not_match_its_sha256_is_refused(reg: Registry,
                                                               tmp_path: Path) -> None:
    art = next(a for a in reg.manifest("late_gb", "stable")["artifacts"]
               if a["role"] == "explainer")
    data = bytearray(reg.blob_path(art["sha256"]).read_bytes())
    data[-1] ^= 1
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        device.load(bad, "0" * 64)


def test_a_real_edge_syncs_the_explainer_and_predict_explain_prints_it(
        reg: Registry, tmp_path: Path) -> None:
    cloud = start_cloud(reg.root)
    try:
        store = str(cloud.trust(tmp_path / "s"))
        sync = _edge("sync", "--cloud", cloud.url, "--name", "late_hgb", "--store", store,
                     "--json")
        assert sync.returncode == 0, sync.stderr
        assert "explainer" in json.loads(sync.stdout)["downloaded"]
    finally:
        cloud.stop()
    art = next(a for a in reg.manifest("late_hgb", "stable")["artifacts"]
               if a["role"] == "explainer")
    assert LocalStore(store).has_artifact(art["sha256"], art["size"])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    text = _edge("predict", "--explain", "--name", "late_hgb", "--store", store, "--input",
                 str(rows))
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("row 0: prediction ")
    assert "tree_shap, log_odds of class" in text.stdout and "distance_km" in text.stdout
    js = _edge("predict", "--explain", "--json", "--name", "late_hgb", "--store", store,
               "--input", str(rows))
    answers = [json.loads(line) for line in js.stdout.splitlines()]
    assert len(answers) == 2 and list(answers[0]["attributions"]) == FEATURES
    assert {a["method"] for a in answers} == {"tree_shap"}


def _edge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def fraud_reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """Versions whose positive class is ``classes[0]`` ("fraud" sorts before "legit")."""
    from tests.cloud.imbalanced import fraud_csv

    root = tmp_path_factory.mktemp("explain-fraud")
    reg = Registry(root / "registry")
    csv = fraud_csv(root / "fraud.csv", rows=2000)
    for fam, params in (("logreg", {}), ("rf", {"n_estimators": 10, "max_depth": 6}),
                        ("hgb", {"max_iter": 15})):
        train(reg, f"fraud_{fam}", data=csv, target="label", model=fam, params=params)
    return reg


@pytest.mark.parametrize("name", ["fraud_logreg", "fraud_rf", "fraud_hgb"])
def test_a_positive_class_at_index_0_is_explained_exactly_on_device_and_cloud(
        fraud_reg: Registry, name: str, tmp_path: Path) -> None:
    manifest = fraud_reg.manifest(name, "stable")
    assert manifest["output"]["classes"][0] == manifest["metrics"]["positive"] == "fraud"
    rt = _runtime(fraud_reg, name, tmp_path)
    rows = [{"amount": 900.0, "hour": 3, "distance_km": 60.0, "tx_last_day": 9,
             "merchant": "electronics"},
            {"amount": 12.5, "hour": 14, "distance_km": 1.0, "tx_last_day": 1,
             "merchant": "grocery"}]
    answers = rt.explain(rows)
    assert {a["class"] for a in answers} == {"fraud"}
    assert "'fraud'" in manifest["explain"]["output"]
    want = model_output(fraud_reg, name, rows, answers[0]["space"], ["fraud", "fraud"])
    got = np.array([a["base_value"] + sum(a["attributions"].values()) for a in answers])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)
    # The risky row pushes towards fraud, the plain one away from it.
    assert got[0] > got[1]
    _agrees_with_shap(fraud_reg, name, tmp_path / "shap", linear=name == "fraud_logreg",
                      rows=rows)
