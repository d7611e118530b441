"""``POST /v1/models/<name>/explain`` (docs/quality.md §3) on a real gunicorn server: shap
for every family, the same values as the device where both use the same method, 4xx JSON for
bad bodies, and no shap import until the route is first called."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from hybridml.cloud.explain_api import MAX_ROWS
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from tests.conftest import CloudServer, start_cloud
from tests.edgekit import ThreadCloud
from tests.explainkit import FEATURES, ROWS, build_registry, model_output

VERSIONS = [("late_logreg", "logreg"), ("late_rf", "rf"), ("late_gb", "gb"),
            ("late_hgb", "hgb"), ("late_mlp", "mlp"), ("minutes_gb", "gb"),
            ("iris_hgb", "hgb")]
IRIS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, None, 4.2, 1.3]]


FRAUD_ROWS = [{"amount": 900.0, "hour": 3, "distance_km": 60.0, "tx_last_day": 9,
               "merchant": "electronics"},
              {"amount": 12.5, "hour": 14, "distance_km": 1.0, "tx_last_day": 1,
               "merchant": "grocery"}]


@pytest.fixture(scope="module")
def reg(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    from tests.cloud.imbalanced import fraud_csv

    root = tmp_path_factory.mktemp("explain-api")
    reg = build_registry(root, VERSIONS)
    csv = fraud_csv(root / "fraud.csv", rows=2000)  # positive "fraud" is classes[0]
    for fam, params in (("rf", {"n_estimators": 10, "max_depth": 6}),
                        ("hgb", {"max_iter": 15})):
        train(reg, f"fraud_{fam}", data=csv, target="label", model=fam, params=params)
    return reg


@pytest.fixture(scope="module")
def cloud(reg: Registry) -> Iterator[CloudServer]:
    server = start_cloud(reg.root)
    yield server
    server.stop()


def _explain(cloud: CloudServer, name: str, body: Any, query: str = "") -> requests.Response:
    return requests.post(f"{cloud.url}/v1/models/{name}/explain{query}", json=body, timeout=60)


@pytest.mark.parametrize(("name", "method"), [
    ("late_logreg", "shap.LinearExplainer"), ("late_rf", "shap.TreeExplainer"),
    ("late_gb", "shap.TreeExplainer"), ("late_hgb", "shap.TreeExplainer"),
    ("minutes_gb", "shap.TreeExplainer"), ("iris_hgb", "shap.TreeExplainer"),
    ("fraud_rf", "shap.TreeExplainer"), ("fraud_hgb", "shap.TreeExplainer")])
def test_cloud_shap_agrees_with_the_device_explainer(cloud: CloudServer, name: str,
                                                     method: str) -> None:
    rows = IRIS if name.startswith("iris") else FRAUD_ROWS if name.startswith("fraud") \
        else ROWS
    shap_r = _explain(cloud, name, {"inputs": rows})
    dev_r = _explain(cloud, name, {"inputs": rows}, "?method=device")
    assert shap_r.status_code == dev_r.status_code == 200, shap_r.text + dev_r.text
    by_shap, by_device = shap_r.json()["explanations"], dev_r.json()["explanations"]
    assert {a["method"] for a in by_shap} == {method}
    predicted = requests.post(f"{cloud.url}/v1/models/{name}/predict", json={"inputs": rows},
                              timeout=30).json()["predictions"]
    for s, d, p in zip(by_shap, by_device, predicted):
        assert s["prediction"] == d["prediction"] == p
        assert (s["space"], s["class"]) == (d["space"], d["class"])
        assert list(s["attributions"]) == list(d["attributions"])
        np.testing.assert_allclose(list(s["attributions"].values()),
                                   list(d["attributions"].values()), rtol=1e-4, atol=1e-8)
        assert s["base_value"] == pytest.approx(d["base_value"], rel=1e-4, abs=1e-8)
        if name.startswith("fraud"):  # the positive class, though it is classes[0]
            assert s["class"] == "fraud"


def test_cloud_explains_an_mlp_with_kernel_shap_additively(cloud: CloudServer,
                                                            reg: Registry) -> None:
    r = _explain(cloud, "late_mlp", {"inputs": ROWS})
    assert r.status_code == 200, r.text
    answers = r.json()["explanations"]
    assert {(a["method"], a["space"]) for a in answers} == {("shap.KernelExplainer",
                                                             "probability")}
    assert all(list(a["attributions"]) == FEATURES for a in answers)
    want = model_output(reg, "late_mlp", ROWS, "probability", [a["class"] for a in answers])
    got = [a["base_value"] + sum(a["attributions"].values()) for a in answers]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    device = _explain(cloud, "late_mlp", {"inputs": ROWS}, "?method=device")
    assert device.status_code == 404
    assert "its family is mlp" in device.json()["error"]["message"]


@pytest.mark.parametrize(("body", "query", "status", "field"), [
    ({}, "", 400, "inputs"),
    ({"inputs": []}, "", 400, "inputs"),
    ({"inputs": "nope"}, "", 400, "inputs"),
    ({"inputs": [ROWS[0]] * (MAX_ROWS + 1)}, "", 413, "inputs"),
    ({"inputs": [dict(ROWS[0], hour="late")]}, "", 400, "hour"),
    ({"inputs": [{"restaurant": "r001"}]}, "", 400, None),
    ({"inputs": ROWS, "extra": 1}, "", 400, "extra"),
    ({"inputs": ROWS, "version": "1; drop"}, "", 400, "version"),
    ({"inputs": ROWS}, "?method=lime", 400, "method"),
    ({"inputs": ROWS, "version": 99}, "", 404, None),
])
def test_bad_bodies_answer_4xx_json(cloud: CloudServer, body: dict[str, Any], query: str,
                                    status: int, field: str | None) -> None:
    r = _explain(cloud, "late_gb", body, query)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if field is not None:
        assert err["details"]["field"] == field


def test_an_unknown_model_and_a_non_json_body_answer_4xx(cloud: CloudServer) -> None:
    assert _explain(cloud, "nosuch", {"inputs": ROWS}).status_code == 404
    r = requests.post(f"{cloud.url}/v1/models/late_gb/explain", data="inputs", timeout=10)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_explain_takes_a_device_token_like_predict(reg: Registry) -> None:
    server = ThreadCloud(reg.root)
    try:
        url = f"{server.url}/v1/models/late_gb/explain"
        assert requests.post(url, json={"inputs": ROWS}, timeout=30).status_code == 401
        r = requests.post(url, json={"inputs": ROWS}, timeout=30,
                          headers={"Authorization": f"Bearer {server.token}"})
        assert r.status_code == 200 and len(r.json()["explanations"]) == len(ROWS)
    finally:
        server.close()


def test_serving_does_not_import_shap_or_sklearn_until_explain_is_called(
        reg: Registry) -> None:
    code = ("import sys; from hybridml.cloud.app import create_app; "
            f"create_app({str(reg.root)!r}); "
            "print(sorted(m for m in ('shap', 'sklearn', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
