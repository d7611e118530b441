"""cloud.train end to end: every family, lineage, fine-tuning, and what never gets registered."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.compress import VARIANTS
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, DataError, NotFoundError
from hybridml.shared.manifest import Manifest
from hybridml.shared.schema import InputSchema

SMALL = {"rf": {"n_estimators": 15}, "gb": {"n_estimators": 15}, "hgb": {"max_iter": 15},
         "mlp": {"hidden_layer_sizes": [16], "max_iter": 200}, "logreg": {}, "sgd": {}}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize(("target", "task"), [("late", "binary"),
                                              ("delivery_minutes", "regression")])
def test_every_family_trains_exports_and_registers_on_mixed_csv(
        registry: Registry, orders_csv: Path, family: str, target: str, task: str) -> None:
    drop = ["delivery_minutes"] if target == "late" else ["late"]
    m = train(registry, "eta", data=orders_csv, target=target, model=family, drop=drop,
              params=SMALL[family]).manifest
    assert m["version"] == 1 and m["output"]["task"] == task
    manifest = Manifest.from_json(m)
    kinds = {f.name: f.kind for f in manifest.schema.features}
    assert kinds["restaurant"] == "categorical" and kinds["hour"] == "numeric"
    assert m["metrics"]["parity"]["passed"] is True
    assert m["compression"]["chosen"] in VARIANTS
    roles = {a["role"]: a for a in m["artifacts"]}
    for role in ("model", "model_fp32"):
        assert registry.has_blob(roles[role]["sha256"])
    # The golden rows reproduce with the shipped model, exactly as the edge will check them.
    session = ModelSession(registry.blob_path(roles["model"]["sha256"]), manifest.schema, task)
    out = session.run(manifest.schema.encode(m["golden"]["rows"]))
    if task == "regression":
        assert np.allclose(out.values, m["golden"]["values"], atol=m["golden"]["tolerance"])
    else:
        assert out.labels.tolist() == m["golden"]["labels"]  # type: ignore[union-attr]


def test_metadata_records_data_sha_split_seed_params_and_profile(registry: Registry,
                                                                 orders_csv: Path) -> None:
    m = train(registry, "late", data=orders_csv, target="late", model="rf", seed=7,
              drop=["delivery_minutes"], params={"n_estimators": 5}).manifest
    assert len(m["training"]["data_sha256"]) == 64
    assert m["training"]["split"]["seed"] == 7
    assert sum(m["training"]["split"][k] for k in ("train", "validation", "test")) == 400
    meta = registry.metadata("late", 1)
    assert meta["params"]["n_estimators"] == 5 and meta["family"] == "rf"
    assert registry.has_blob(meta["sklearn_sha256"])
    assert set(m["profile"]["features"]) == {"restaurant", "hour", "distance_km", "rain",
                                             "items"}
    schema = InputSchema.from_json(m["schema"])
    hour = schema.features[schema.names.index("hour")]
    assert hour.min is not None and 8 <= hour.min <= hour.max <= 22  # type: ignore[operator]


def test_retrain_records_parent_and_first_version_is_stable(registry: Registry) -> None:
    train(registry, "iris", dataset="iris", model="logreg")
    m2 = train(registry, "iris", dataset="iris", model="rf", params={"n_estimators": 5}).manifest
    assert (m2["version"], m2["parent"], m2["lineage"]) == (2, 1, "retrain")
    assert registry.aliases("iris") == {"stable": 1}


def test_finetune_continues_the_parent_and_records_lineage(registry: Registry,
                                                           orders_csv: Path) -> None:
    train(registry, "late", data=orders_csv, target="late", model="mlp",
          drop=["delivery_minutes"], params={"hidden_layer_sizes": [8], "max_iter": 50})
    m = train(registry, "late", data=orders_csv, target="late", drop=["delivery_minutes"],
              finetune_from="late:1").manifest
    assert (m["version"], m["parent"], m["lineage"]) == (2, 1, "finetune")
    assert m["model"]["family"] == "mlp"
    assert registry.manifest("late", 1)["schema"] == m["schema"] or \
        [f["name"] for f in registry.manifest("late", 1)["schema"]] == \
        [f["name"] for f in m["schema"]]


def test_finetune_refuses_models_that_cannot_continue(registry: Registry) -> None:
    train(registry, "iris", dataset="iris", model="logreg")
    with pytest.raises(ConfigError, match="cannot be fine-tuned"):
        train(registry, "iris", dataset="iris", finetune_from="iris:1")
    with pytest.raises(ConfigError, match="NAME:VERSION"):
        train(registry, "iris", dataset="iris", finetune_from="iris")


def test_finetune_refuses_other_columns_or_task(registry: Registry, orders_csv: Path) -> None:
    train(registry, "m", dataset="iris", model="sgd")
    with pytest.raises(DataError, match="columns differ"):
        train(registry, "m", dataset="wine", finetune_from="m:1")
    with pytest.raises(DataError, match="is binary but m:1 is multiclass"):
        train(registry, "m", data=orders_csv, target="late", drop=["delivery_minutes"],
              finetune_from="m:1")


def test_bad_data_registers_nothing(registry: Registry, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,y\n1,x\n2,x\n3,x\n")
    with pytest.raises(DataError):
        train(registry, "bad", data=bad, target="y")
    with pytest.raises(NotFoundError):
        registry.versions("bad")
    assert not list((registry.root / "blobs").iterdir())


def test_data_source_must_be_exactly_one(registry: Registry, orders_csv: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        train(registry, "x")
    with pytest.raises(ConfigError, match="--target"):
        train(registry, "x", data=orders_csv)
    with pytest.raises(ConfigError, match="unknown model"):
        train(registry, "x", dataset="iris", model="xgboost")
