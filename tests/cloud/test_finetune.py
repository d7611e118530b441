"""Fine-tuning every family that can continue, auto mode, holdouts and version labels."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.lineage import base_of, display_label, display_labels
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, DataError
from hybridml.shared.manifest import Manifest
from tests.conftest import write_orders_csv

SMALL = {"rf": {"n_estimators": 12}, "gb": {"n_estimators": 12}, "hgb": {"max_iter": 12},
         "mlp": {"hidden_layer_sizes": [16], "max_iter": 100}, "sgd": {}, "logreg": {}}
METHOD = {"rf": "added_trees", "gb": "boosting_rounds", "hgb": "boosting_rounds",
          "mlp": "partial_fit", "sgd": "partial_fit"}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


@pytest.fixture(scope="module")
def fresh_orders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 newer orders from the same process (another seed): the new labelled data."""
    return write_orders_csv(tmp_path_factory.mktemp("fresh") / "fresh.csv", n=200, seed=11)


def _late(registry: Registry, data: Path, **kw: object) -> dict:  # type: ignore[type-arg]
    return train(registry, "late", data=data, target="late", drop=["delivery_minutes"],
                 **kw).manifest  # type: ignore[arg-type]


def _golden_reproduces(registry: Registry, m: dict) -> bool:  # type: ignore[type-arg]
    manifest = Manifest.from_json(m)
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    out = ModelSession(registry.blob_path(model["sha256"]), manifest.schema,
                       m["output"]["task"]).run(manifest.schema.encode(m["golden"]["rows"]))
    if out.values is not None:
        return bool(np.allclose(out.values, m["golden"]["values"],
                                atol=m["golden"]["tolerance"]))
    return out.labels.tolist() == m["golden"]["labels"]  # type: ignore[union-attr]


@pytest.mark.parametrize("family", sorted(METHOD))
def test_finetune_of_each_family_registers_v1_1_that_passes_parity_and_golden_rows(
        registry: Registry, orders_csv: Path, fresh_orders: Path, family: str) -> None:
    _late(registry, orders_csv, model=family, params=SMALL[family])
    m = _late(registry, fresh_orders, finetune_from="late:1")
    assert (m["version"], m["parent"], m["lineage"]) == (2, 1, "finetune")
    assert m["model"]["family"] == family
    assert m["training"]["mode"] == {"mode": "finetune", "requested": "finetune",
                                     "reason": f"{family} continues by {METHOD[family]} and "
                                               "the schema is unchanged"}
    assert m["training"]["finetune"]["method"] == METHOD[family]
    assert m["training"]["finetune"]["from"] == 1
    assert m["metrics"]["parity"]["passed"] is True
    assert _golden_reproduces(registry, m)
    assert display_label(registry.versions("late"), 2) == "v1.1"
    # The parent's encoder is kept: the schema's categories are v1's.
    parent_schema = {f["name"]: f for f in registry.manifest("late", 1)["schema"]}
    for f in m["schema"]:
        if f["kind"] == "categorical":
            assert f["categories"] == parent_schema[f["name"]]["categories"]


@pytest.mark.parametrize(("family", "grows"), [("rf", "n_estimators"), ("gb", "n_estimators"),
                                               ("hgb", "max_iter")])
def test_warm_start_families_add_rounds_or_trees_and_keep_the_old_ones(
        registry: Registry, orders_csv: Path, fresh_orders: Path, family: str,
        grows: str) -> None:
    _late(registry, orders_csv, model=family, params=SMALL[family])
    m = _late(registry, fresh_orders, finetune_from="late:1")
    record = m["training"]["finetune"]
    assert (record["before"], record["added"], record["total"]) == (12, 5, 17)
    assert registry.metadata("late", 2)["params"][grows] == 17
    if family == "rf":
        assert "the parent's 12 trees are unchanged" in record["note"]
        old = pickle.loads(registry.blob_path(
            registry.metadata("late", 1)["sklearn_sha256"]).read_bytes())[-1]
        new = pickle.loads(registry.blob_path(
            registry.metadata("late", 2)["sklearn_sha256"]).read_bytes())[-1]
        for a, b in zip(old.estimators_, new.estimators_[:12]):
            assert np.array_equal(a.tree_.threshold, b.tree_.threshold)


def test_regression_boosting_finetune_keeps_golden_rows(registry: Registry, orders_csv: Path,
                                                       fresh_orders: Path) -> None:
    train(registry, "eta", data=orders_csv, target="delivery_minutes", drop=["late"],
          model="hgb", params=SMALL["hgb"])
    m = train(registry, "eta", data=fresh_orders, target="delivery_minutes", drop=["late"],
              finetune_from="eta:1").manifest
    assert m["lineage"] == "finetune" and m["training"]["finetune"]["method"] == \
        "boosting_rounds"
    assert _golden_reproduces(registry, m)


def test_auto_mode_retrains_logreg_and_says_why(registry: Registry, orders_csv: Path,
                                                fresh_orders: Path) -> None:
    _late(registry, orders_csv, model="logreg", params={"C": 0.5})
    m = _late(registry, fresh_orders, finetune_from="late:1", mode="auto")
    assert (m["version"], m["parent"], m["lineage"]) == (2, 1, "retrain")
    mode = m["training"]["mode"]
    assert mode["mode"] == "retrain" and mode["requested"] == "auto"
    assert "logreg model, which cannot be fine-tuned" in mode["reason"]
    assert "finetune" not in m["training"]
    # The line's family and parameters carry over; the version is the next major.
    assert m["model"]["family"] == "logreg" and registry.metadata("late", 2)["params"]["C"] == 0.5
    assert display_label(registry.versions("late"), 2) == "v2"


def test_finetune_mode_refuses_logreg(registry: Registry, orders_csv: Path) -> None:
    _late(registry, orders_csv, model="logreg")
    with pytest.raises(ConfigError, match="cannot be fine-tuned"):
        _late(registry, orders_csv, finetune_from="late:1")
    with pytest.raises(ConfigError, match="mode 'sideways'"):
        _late(registry, orders_csv, finetune_from="late:1", mode="sideways")


def test_tree_finetune_needs_every_class_in_the_new_rows(registry: Registry,
                                                         tmp_path: Path) -> None:
    from hybridml.cloud.data import load_builtin
    from hybridml.cloud.labelled import from_dataset

    train(registry, "iris", dataset="iris", model="rf", params=SMALL["rf"])
    ds = load_builtin("iris")
    two = from_dataset(ds, np.flatnonzero(ds.y < 2)).write_csv(
        tmp_path / "two.csv", ds.schema.names, "species")
    with pytest.raises(DataError, match=r"lacks classes \['virginica'\] of iris:1"):
        train(registry, "iris", data=two, target="species", finetune_from="iris:1")
    m = train(registry, "iris", data=two, target="species", finetune_from="iris:1",
              mode="auto").manifest
    assert m["lineage"] == "retrain" and "lacks classes" in m["training"]["mode"]["reason"]


def test_auto_mode_retrains_when_the_columns_changed(registry: Registry, orders_csv: Path
                                                     ) -> None:
    _late(registry, orders_csv, model="hgb", params=SMALL["hgb"])
    m = train(registry, "late", data=orders_csv, target="late",
              drop=["delivery_minutes", "items"], finetune_from="late:1", mode="auto").manifest
    assert m["lineage"] == "retrain" and "columns differ" in m["training"]["mode"]["reason"]
    assert [f["name"] for f in m["schema"]] == ["restaurant", "hour", "distance_km", "rain"]


def test_every_version_stores_a_holdout_and_a_finetune_inherits_its_parents(
        registry: Registry, orders_csv: Path, fresh_orders: Path) -> None:
    from hybridml.cloud.labelled import holdout

    _late(registry, orders_csv, model="sgd")
    _late(registry, fresh_orders, finetune_from="late:1")
    ref1, ref2 = (registry.metadata("late", v)["holdout"] for v in (1, 2))
    assert ref1 == ref2 and ref1["rows"] == 80  # 20% of 400 rows
    held = holdout(registry, "late", 2)
    assert held is not None and len(held) == 80
    assert set(held.rows[0]) == {"restaurant", "hour", "distance_km", "rain", "items"}
    assert set(held.labels) == {"late", "on_time"}


def test_holdout_of_an_older_version_is_rebuilt_from_its_source(registry: Registry) -> None:
    from hybridml.cloud.data import load_builtin, split
    from hybridml.cloud.labelled import from_dataset, holdout

    train(registry, "iris", dataset="iris", model="logreg")
    # A version registered before holdouts were stored has none in its metadata.
    manifest = registry.manifest("iris", 1)
    meta = {k: v for k, v in registry.metadata("iris", 1).items() if k != "holdout"}
    registry.create_version("iris", manifest, meta, parent=1)
    ds = load_builtin("iris")
    assert holdout(registry, "iris", 2) == from_dataset(ds, split(ds, 0).test)


@dataclass(frozen=True)
class V:
    version: int
    parent: int | None
    lineage: str


def test_labels_follow_lines_retrains_start_majors_and_finetunes_count_minors() -> None:
    versions = [V(1, None, "retrain"), V(2, 1, "finetune"), V(3, 2, "finetune"),
                V(4, 3, "retrain"), V(5, 4, "finetune"), V(6, 1, "finetune"),
                V(7, 5, "retrain")]
    assert display_labels(versions) == {1: "v1", 2: "v1.1", 3: "v1.2", 4: "v2", 5: "v2.1",
                                        6: "v1.3", 7: "v3"}
    assert display_label(versions[::-1], 5) == "v2.1"
    assert [base_of(versions, v) for v in (1, 3, 5, 6, 7)] == [1, 1, 4, 1, 7]
