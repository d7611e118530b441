"""The gate: real candidates, scored with their ONNX models against the active version."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.data import load_csv
from hybridml.cloud.gate import Margin, evaluate, gate_hook, score
from hybridml.cloud.labelled import Labelled, from_dataset, holdout
from hybridml.cloud.lineage import describe, gate_summary
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from tests.conftest import write_orders_csv

SMALL_HGB = {"max_iter": 20}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_orders_csv(tmp_path_factory.mktemp("gate") / "fresh.csv", n=300, seed=5)


def _recent(path: Path) -> Labelled:
    ds = load_csv(path, "late", drop=["delivery_minutes"])
    return from_dataset(ds, np.arange(len(ds)))


def _shuffled(src: Path, dst: Path, column: str) -> Path:
    """``src`` with ``column`` shuffled: labels that say nothing about the features."""
    with src.open() as fh:
        rows = list(csv.DictReader(fh))
    labels = [r[column] for r in rows]
    np.random.default_rng(3).shuffle(labels)
    with dst.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r, y in zip(rows, labels):
            w.writerow({**r, column: y})
    return dst


def test_a_better_finetune_is_blessed_and_its_numbers_are_in_its_manifest(
        registry: Registry, orders_csv: Path, fresh: Path) -> None:
    train(registry, "late", data=orders_csv, target="late", drop=["delivery_minutes"],
          model="mlp", params={"hidden_layer_sizes": [16], "max_iter": 300})
    recent = _recent(fresh)
    m = train(registry, "late", data=fresh, target="late", drop=["delivery_minutes"],
              finetune_from="late:1",
              gate=gate_hook(registry, "late", against=1, recent=recent)).manifest
    gate = m["gate"]
    assert gate["against"] == 1 and gate["metric"] == "balanced_accuracy"
    assert gate["margin"] == {"kind": "points", "value": 0.005}
    # The original holdout (v1's test rows); the recent rows minus the 210 it trained on.
    assert gate["holdout"]["rows"] == 80 and "trained" not in gate["holdout"]
    assert gate["recent"]["rows"] == 90 and gate["recent"]["trained"] == 210
    for part in ("holdout", "recent"):
        c = gate[part]
        assert c["passed"] == (c["candidate"] >= c["active"] - 0.005)
    assert gate["blessed"] == (gate["holdout"]["passed"] and gate["recent"]["passed"])
    assert gate["blessed"], gate
    assert registry.aliases("late") == {"stable": 1}  # registered, not promoted
    # The numbers are what the shipped ONNX models give on the same rows.
    held = holdout(registry, "late", 1)
    assert held is not None
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    assert score(registry.blob_path(model["sha256"]), m, held) == gate["holdout"]["candidate"]
    listed = describe(registry, "late")
    assert [v["label"] for v in listed] == ["v1", "v1.1"]
    assert gate_summary(listed[1]["gate"]).startswith("blessed vs v1: holdout ")


def test_a_candidate_trained_on_shuffled_labels_is_registered_but_not_blessed(
        registry: Registry, orders_csv: Path, fresh: Path, tmp_path: Path) -> None:
    train(registry, "late", data=orders_csv, target="late", drop=["delivery_minutes"],
          model="hgb", params=SMALL_HGB)
    noise = _shuffled(fresh, tmp_path / "noise.csv", "late")
    m = train(registry, "late", data=noise, target="late", drop=["delivery_minutes"],
              finetune_from="late:1", mode="retrain",
              gate=gate_hook(registry, "late", against=1, recent=_recent(fresh))).manifest
    gate = m["gate"]
    assert gate["blessed"] is False and gate["holdout"]["passed"] is False
    assert gate["holdout"]["candidate"] < gate["holdout"]["active"] - 0.1
    assert gate["reason"].startswith("holdout: ") and "more than 0.5 points below" in \
        gate["reason"]
    assert m["version"] == 2 and registry.aliases("late") == {"stable": 1}


def test_an_equal_candidate_passes_and_the_first_version_needs_no_comparison(
        registry: Registry) -> None:
    first = train(registry, "iris", dataset="iris", model="logreg",
                  gate=gate_hook(registry, "iris", against=None)).manifest
    assert first["gate"]["blessed"] is True and first["gate"]["against"] is None
    # The same data, seed and family: the same model, which is not worse.
    m = train(registry, "iris", dataset="iris", finetune_from="iris:1", mode="retrain",
              gate=gate_hook(registry, "iris", against=1)).manifest
    gate = m["gate"]
    assert gate["holdout"]["candidate"] == gate["holdout"]["active"]
    assert gate["blessed"] is True
    assert gate["recent"] == {"rows": 0, "candidate": None, "active": None, "passed": True,
                              "note": "no recent labelled rows: judged on the holdout alone"}


def test_rows_the_candidate_trained_on_are_left_out_of_both_slices(registry: Registry
                                                                   ) -> None:
    train(registry, "iris", dataset="iris", model="logreg")
    m = train(registry, "iris", dataset="iris", model="logreg", seed=1)
    version = m.manifest["version"]
    trained = Labelled(holdout(registry, "iris", 1).rows[:10],  # type: ignore[union-attr]
                       holdout(registry, "iris", 1).labels[:10])  # type: ignore[union-attr]
    model = next(a for a in m.manifest["artifacts"] if a["role"] == "model")
    report = evaluate(registry, "iris", registry.blob_path(model["sha256"]), m.manifest,
                      against=1, recent=trained, trained=trained)
    assert (report.holdout.rows, report.holdout.trained) == (20, 10)
    assert (report.recent.rows, report.recent.trained) == (0, 10)
    assert report.recent.passed and "judged on the holdout alone" in report.recent.note
    assert version == 2


def test_margins_are_points_for_classifiers_and_relative_for_rmse() -> None:
    points, relative = Margin.for_task("binary"), Margin.for_task("regression")
    assert points.allows(0.900, 0.905) and not points.allows(0.8999, 0.905)
    assert relative.allows(10.1, 10.0) and not relative.allows(10.11, 10.0)
    assert relative.allows(9.0, 10.0)  # lower RMSE is better
    assert Margin.for_task("multiclass", 0.02).allows(0.88, 0.9)
