"""A registry with one small version per model family, for the explanation tests.

``late_<family>`` predicts the orders CSV's binary ``late`` (numbers, categories, missing
values), ``minutes_<family>`` its ``delivery_minutes`` (regression), ``iris_<family>`` the
three iris classes. The models are small (few trees, a small MLP) to keep the tests fast.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.cloud.models import combine
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.shared.schema import InputSchema
from tests.conftest import write_orders_csv

SMALL: dict[str, dict[str, Any]] = {
    "logreg": {}, "rf": {"n_estimators": 15, "max_depth": 8}, "gb": {"n_estimators": 15},
    "hgb": {"max_iter": 15}, "mlp": {"hidden_layer_sizes": [16], "max_iter": 200},
}
FEATURES = ["restaurant", "hour", "distance_km", "rain", "items"]
ROWS: list[dict[str, Any]] = [
    {"restaurant": "r003", "hour": 19, "distance_km": 7.5, "rain": "yes", "items": 3},
    {"restaurant": "r001", "hour": 9, "distance_km": None, "rain": "", "items": 1},
    {"restaurant": "r004", "hour": 13, "distance_km": 2.25, "rain": "no", "items": 6},
    {"restaurant": "r999", "hour": 22, "distance_km": 4.0, "rain": "yes", "items": 2},
]


def build_registry(root: Path, versions: list[tuple[str, str]]) -> Registry:
    """Train each ``(name, family)`` of ``versions`` (names as in the module docstring)."""
    reg = Registry(root / "registry")
    csv = write_orders_csv(root / "orders.csv", n=300)
    for name, fam in versions:
        kind = name.split("_")[0]
        if kind == "iris":
            train(reg, name, dataset="iris", model=fam, params=SMALL[fam])
        elif kind == "minutes":
            train(reg, name, data=csv, target="delivery_minutes", model=fam,
                  params=SMALL[fam], drop=["late"])
        else:
            train(reg, name, data=csv, target="late", model=fam, params=SMALL[fam],
                  drop=["delivery_minutes"])
    return reg


def pipeline(reg: Registry, name: str) -> Any:
    """The stable version's scikit-learn pipeline, as the cloud stored it."""
    meta = reg.metadata(name, reg.resolve(name, "stable"))
    return pickle.loads(reg.blob_path(meta["sklearn_sha256"]).read_bytes())


def model_output(reg: Registry, name: str, rows: list[Any], space: str, cls: list[Any]
                 ) -> np.ndarray:
    """What the attributions of each row must add up to, from the pipeline: the explained
    class's probability, its margin (decision function), or the predicted value."""
    manifest = reg.manifest(name, "stable")
    schema = InputSchema.from_json(manifest["schema"])
    batch = schema.encode(rows)
    x = combine(batch.num.astype(np.float64), batch.cat)
    pipe = pipeline(reg, name)
    if manifest["output"]["task"] == "regression":
        return np.asarray(pipe.predict(x), dtype=np.float64)
    classes = manifest["output"]["classes"]
    k = [classes.index(c) for c in cls]
    if space == "probability":
        out = pipe.predict_proba(x)
    else:
        out = np.asarray(pipe.decision_function(x), dtype=np.float64)
        if out.ndim == 1:  # binary: the margin of classes[1]; classes[0]'s is its negation
            return np.where(np.asarray(k) == 1, out, -out)
    return out[np.arange(len(rows)), k]
