"""cloud.profile: the format-1 reference profile a trained version ships with, the permutation
importance in it, and the false-alarm and detection rates of drift reports made against it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.cloud.data import Dataset, load_builtin, load_csv, split
from hybridml.cloud.models import build_pipeline, combine
from hybridml.cloud.profile import (
    MAX_CATEGORIES,
    ShippedModel,
    categorical_profile,
    numeric_profile,
    permutation_importance,
)
from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.session import ModelSession
from hybridml.shared.drift import ALERT, WARN, Profile, drift_report
from hybridml.shared.errors import DataError
from hybridml.shared.manifest import Manifest
from hybridml.shared.reference import bin_index
from tests.conftest import write_orders_csv

WINDOWS = 1000
SIZES = (500, 2000)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "reg")


def shipped(reg: Registry, manifest: dict[str, Any]) -> bytes:
    sha = next(a["sha256"] for a in manifest["artifacts"] if a["role"] == "model")
    return reg.blob_path(sha).read_bytes()


def check_format(raw: dict[str, Any], schema_names: tuple[str, ...]) -> Profile:
    """Every format-1 invariant of docs/monitoring.md §1 that a parser does not check."""
    prof = Profile.of({"schema": raw["schema"], "profile": raw["profile"]})
    assert prof is not None and prof.names == schema_names
    assert raw["profile"]["format"] == 1 and set(raw["profile"]["features"]) == set(schema_names)
    for col in prof.features:
        if col.kind == "numeric":
            assert 2 <= col.edges.size <= 11 and col.n_bins == col.edges.size + 1
        else:
            assert len(col.categories) <= MAX_CATEGORIES
        assert col.proportions.sum() == pytest.approx(1.0)
    assert sum(prof.importance.values()) == pytest.approx(1.0, abs=1e-5)
    return prof


# ------------------------------------------------------------------------------ trained
def test_iris_profile_bins_inputs_classes_confidence_and_ranks_petals_first(
        registry: Registry) -> None:
    m = train(registry, "iris", dataset="iris", model="logreg").manifest
    prof = check_format(m, Manifest.from_json(m).schema.names)
    assert m["profile"]["rows"] == m["training"]["split"]["train"]
    assert prof.predictions.categories == ("setosa", "versicolor", "virginica")
    assert prof.predictions.proportions[-1] == 0.0  # "other" never happens for classes
    assert prof.confidence is not None and prof.confidence.edges[0] >= 1 / 3
    assert set(prof.top_features(2)) == {"petal_length_cm", "petal_width_cm"}
    assert "counts" not in m["profile"]["features"]["petal_length_cm"]  # no old histograms


def test_orders_profile_has_missing_shares_categories_and_numeric_predictions(
        registry: Registry, orders_csv: Path) -> None:
    late = train(registry, "late", data=orders_csv, target="late", model="hgb",
                 drop=["delivery_minutes"], params={"max_iter": 30}).manifest
    prof = check_format(late, ("restaurant", "hour", "distance_km", "rain", "items"))
    ds = load_csv(orders_csv, "late", drop=["delivery_minutes"])
    train_rows = ds.take(split(ds, 0).train)
    rain = prof.feature("rain")
    rain_col = train_rows[1][:, ds.schema.categorical_names.index("rain")]
    assert "" in rain.categories and rain.missing == pytest.approx(np.mean(rain_col == ""),
                                                                   abs=1e-6)
    assert rain.proportions[rain.categories.index("")] == pytest.approx(rain.missing)
    assert sorted(prof.feature("restaurant").categories) == [f"r00{i}" for i in range(5)]
    dist = prof.feature("distance_km")
    values = int((~np.isnan(train_rows[0][:, ds.schema.numeric_names.index("distance_km")]))
                 .sum())
    assert 0 < dist.missing < 0.15 and dist.edges.size == values // 30 + 1  # 264 values: 8 bins
    # The profile's class shares are the shipped model's predictions on the held-out rows.
    sp = split(ds, 0)
    held = np.concatenate([sp.validation, sp.test])
    out = ModelSession(shipped(registry, late), ds.schema, "binary").run(
        ds.schema.encode_blocks(ds.num[held], ds.cat[held]))
    assert out.labels is not None
    shares = np.bincount(out.labels, minlength=2) / held.size
    assert prof.predictions.proportions[:2] == pytest.approx(shares, abs=1e-6)

    eta = train(registry, "eta", data=orders_csv, target="delivery_minutes", model="logreg",
                drop=["late"]).manifest
    prof = check_format(eta, ("restaurant", "hour", "distance_km", "rain", "items"))
    assert prof.predictions.kind == "numeric" and prof.confidence is None
    assert "confidence" not in eta["profile"]
    assert prof.top_features(1) == ("distance_km",)  # 3.5 minutes a km


def test_profile_time_is_recorded_with_the_training_steps(registry: Registry) -> None:
    result = train(registry, "iris", dataset="iris", model="logreg")
    assert 0 <= result.seconds["profile"] < 5


# ------------------------------------------------------------------------------ columns
def test_numeric_edges_are_deduplicated_deciles_and_overflow_gets_one_in_n_plus_2() -> None:
    values = np.concatenate([np.zeros(700), np.arange(1, 301)]).astype(np.float32)
    col = numeric_profile("x", values)
    assert col.edges[0] == 0.0 and col.edges[-1] == 300.0
    assert col.edges.tolist() == [0.0, 100.0, 200.0, 300.0]  # 0 is 8 of the 11 deciles
    counts = np.bincount(bin_index(col.edges, values), minlength=col.n_bins)
    n = values.size
    assert col.proportions[1:-1] == pytest.approx(counts[1:-1] / (n + 2))
    assert col.proportions[0] == col.proportions[-1] == pytest.approx(1 / (n + 2))


def test_a_small_reference_gets_one_bin_per_30_values() -> None:
    rng = np.random.default_rng(0)
    assert numeric_profile("x", rng.normal(size=120).astype(np.float32)).edges.size == 5
    assert numeric_profile("x", rng.normal(size=45).astype(np.float32)).edges.size == 2
    assert numeric_profile("x", rng.normal(size=5000).astype(np.float32)).edges.size == 11


def test_constant_and_empty_numeric_columns_still_make_valid_entries() -> None:
    const = numeric_profile("c", np.full(50, 7.5, dtype=np.float32))
    assert const.edges.tolist() == [7.5, np.nextafter(np.float32(7.5), np.float32(np.inf))]
    assert bin_index(const.edges, np.array([7.5, 7.6, 7.4])).tolist() == [1, 2, 0]
    empty = numeric_profile("e", np.full(10, np.nan, dtype=np.float32))
    assert empty.edges.size == 0 and empty.missing == 1.0
    entry = {"format": 1, "rows": 10, "features": {"c": const.to_json(), "e": empty.to_json()},
             "predictions": const.to_json(), "importance": {}}
    assert Profile.from_json(entry).feature("e").proportions.tolist() == [1.0]


def test_categoricals_keep_the_50_most_frequent_values_and_other() -> None:
    values = np.array([f"c{i:02d}" for i in range(60) for _ in range(60 - i)] + [""] * 100,
                      dtype=object)
    col = categorical_profile("c", values)
    assert len(col.categories) == 50 and col.categories[:2] == ("", "c00")
    rest = sum(60 - i for i in range(49, 60))  # c49 .. c59 are "other"
    assert col.proportions[-1] == pytest.approx(rest / values.size)
    assert col.missing == pytest.approx(100 / values.size)


# ------------------------------------------------------------------------------ importance
@pytest.fixture(scope="module")
def late_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """late (hgb) trained on the 400-row orders CSV, its data, and a 20,000-row pool from
    the same generator (another seed): the population the device sees."""
    root = tmp_path_factory.mktemp("drift")
    csv = write_orders_csv(root / "orders.csv")
    reg = Registry(root / "reg")
    m = train(reg, "late", data=csv, target="late", model="hgb",
              drop=["delivery_minutes"]).manifest
    pool = load_csv(write_orders_csv(root / "pool.csv", n=20_000, seed=1), "late",
                    drop=["delivery_minutes"])
    ds = load_csv(csv, "late", drop=["delivery_minutes"])
    return {"manifest": m, "model": shipped(reg, m), "pool": pool, "ds": ds}


def test_importance_of_the_shipped_model_matches_the_pipeline_and_sums_to_1(
        late_model: dict[str, Any]) -> None:
    ds: Dataset = late_model["ds"]
    sp = split(ds, 0)
    pipe = build_pipeline("logreg", ds.task, ds.schema.n_numeric, ds.schema.n_categorical, 0)
    pipe.fit(combine(*ds.take(sp.train)[:2]), ds.y[sp.train])
    num, cat, y = ds.take(np.concatenate([sp.validation, sp.test]))
    names = [*ds.schema.numeric_names, *ds.schema.categorical_names]
    from hybridml.cloud.export import export_onnx

    onnx = ShippedModel(export_onnx(pipe, ds.schema, ds.task), ds.schema, ds.task)
    a = permutation_importance(pipe, num, cat, y, ds.task, 0, names=names)
    b = permutation_importance(onnx, num, cat, y, ds.task, 0, names=names)
    assert list(a) == names and sum(a.values()) == pytest.approx(1.0)
    assert all(v >= 0 for v in a.values())
    assert [b[n] for n in names] == pytest.approx([a[n] for n in names], abs=0.02)
    assert max(a, key=a.__getitem__) == "distance_km"


def test_a_model_that_ignores_its_inputs_gives_equal_weights() -> None:
    class Constant:
        def predict(self, x: np.ndarray) -> np.ndarray:
            return np.zeros(x.shape[0], dtype=np.int64)

        def fit(self, x: np.ndarray, y: np.ndarray) -> Constant:
            return self

    ds = load_builtin("iris")
    imp = permutation_importance(Constant(), ds.num[:40], ds.cat[:40], ds.y[:40], "multiclass",
                                 0, names=list(ds.schema.names))
    assert list(imp.values()) == [0.25] * 4
    with pytest.raises(DataError, match="3 names for 4 columns"):
        permutation_importance(Constant(), ds.num, ds.cat, ds.y, "multiclass", 0,
                               names=["a", "b", "c"])


# ------------------------------------------------------------------------------ alarms
Counts = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (counts [W, bins], missing [W])


def rates(prof: Profile, counts: Counts, rows: int) -> dict[str, float]:
    """Share of windows in alert per feature (and predictions, confidence), with dataset
    drift, and in warn (``warn:`` keys), from real drift reports."""
    names = [*prof.names, "predictions", "confidence"]
    seen = dict.fromkeys([*names, "dataset_drift", *(f"warn:{n}" for n in names)], 0)
    for w in range(WINDOWS):
        body: dict[str, Any] = {"rows": rows, "features": {}}
        for name, (c, missing) in counts.items():
            entry = {"counts": c[w].tolist(), "missing": int(missing[w])}
            if name in prof.names:
                body["features"][name] = entry
            else:
                body[name] = entry
        report = drift_report(prof, body, model="late", version=1)
        for f in [*report["features"], {**report["predictions"], "name": "predictions"},
                  {**report["confidence"], "name": "confidence"}]:
            seen[f["name"]] += f["status"] == ALERT
            seen[f"warn:{f['name']}"] += f["status"] == WARN
        seen["dataset_drift"] += report["dataset_drift"]
    return {k: v / WINDOWS for k, v in seen.items()}


def from_profile(prof: Profile, rows: int, rng: np.random.Generator) -> Counts:
    """Windows drawn from the profile's own proportions (only the window's sampling noise)."""
    out: Counts = {}
    assert prof.confidence is not None
    for col in (*prof.features, prof.predictions, prof.confidence):
        if col.kind == "numeric":
            missing = rng.binomial(rows, col.missing, size=WINDOWS)
            c = np.stack([rng.multinomial(rows - m, col.proportions) for m in missing])
        else:
            c = rng.multinomial(rows, col.proportions, size=WINDOWS)
            blank = col.categories.index("") if "" in col.categories else None
            missing = c[:, blank] if blank is not None else np.zeros(WINDOWS, np.int64)
        out[col.name] = (c, missing)
    return out


def binned_pool(prof: Profile, model: bytes, pool: Dataset, num: np.ndarray
                ) -> dict[str, np.ndarray]:
    """Each pool row's bin per feature and for the shipped model's outputs (-1: missing)."""
    schema = pool.schema
    out = ModelSession(model, schema, "binary").run(schema.encode_blocks(num, pool.cat))
    assert out.labels is not None and out.probabilities is not None and prof.confidence
    bins = {n: prof.feature(n).index(num[:, j]) for j, n in enumerate(schema.numeric_names)}
    bins.update({n: prof.feature(n).index(pool.cat[:, j])
                 for j, n in enumerate(schema.categorical_names)})
    bins["predictions"] = out.labels.astype(np.int64)
    bins["confidence"] = prof.confidence.index(out.probabilities.max(axis=1))
    return bins


def from_pool(prof: Profile, bins: dict[str, np.ndarray], rows: int, rng: np.random.Generator,
              weights: np.ndarray | None = None) -> Counts:
    """Windows of ``rows`` pool rows drawn with replacement (with ``weights``)."""
    pick = rng.choice(bins["predictions"].size, size=(WINDOWS, rows), p=weights)
    out: Counts = {}
    for name, col_bins in bins.items():
        n_bins = {"predictions": prof.predictions.n_bins,
                  "confidence": prof.confidence.n_bins if prof.confidence else 0}.get(name) \
            or prof.feature(name).n_bins
        b = col_bins[pick] + 1 + (np.arange(WINDOWS) * (n_bins + 1))[:, None]  # 0: missing
        c = np.bincount(b.ravel(), minlength=WINDOWS * (n_bins + 1)).reshape(WINDOWS, -1)
        blank = None
        if name in prof.names and prof.feature(name).kind == "categorical":
            cats = prof.feature(name).categories
            blank = cats.index("") + 1 if "" in cats else None
        out[name] = (c[:, 1:], c[:, blank] if blank is not None else c[:, 0])
    return out


def measure(make: Callable[[int], Counts], prof: Profile) -> dict[int, dict[str, float]]:
    return {rows: rates(prof, make(rows), rows) for rows in SIZES}


def show(label: str, measured: dict[int, dict[str, float]]) -> None:
    for rows, r in measured.items():
        alerts = " ".join(f"{k}={v:.3f}" for k, v in r.items() if not k.startswith("warn:"))
        warns = " ".join(f"{k[5:]}={v:.3f}" for k, v in r.items() if k.startswith("warn:") and v)
        print(f"{label:>32s}, {rows:>4d} rows. alert: {alerts}; warn: {warns or 'none'}")


def test_stable_streams_rarely_alert_and_drifted_features_always_do(
        late_model: dict[str, Any]) -> None:
    """The release note's numbers: 1,000 windows of 500 and of 2,000 rows each.

    Stable: (a) drawn from the trained profile itself (window noise only); (b) fresh rows
    from the same generator (also the noise of a 280-row reference). Drifting: distance_km
    shifted by 0.5 standard deviations and restaurant r003's share raised from 1/5 to 1/2.
    """
    m, pool = late_model["manifest"], late_model["pool"]
    prof = Profile.of(m)
    assert prof is not None
    rng = np.random.default_rng(7)
    print()
    noise = measure(lambda rows: from_profile(prof, rows, rng), prof)
    show("stable, drawn from the profile", noise)
    bins = binned_pool(prof, late_model["model"], pool, pool.num)
    fresh = measure(lambda rows: from_pool(prof, bins, rows, rng), prof)
    show("stable, fresh rows", fresh)

    j = pool.schema.numeric_names.index("distance_km")
    shifted = pool.num.copy()
    shifted[:, j] += 0.5 * np.nanstd(late_model["ds"].num[:, j])
    r003 = pool.cat[:, pool.schema.categorical_names.index("restaurant")] == "r003"
    weights = np.where(r003, 0.5 / r003.mean(), 0.5 / (1 - r003.mean()))
    drift_bins = binned_pool(prof, late_model["model"], pool, shifted)
    drifting = measure(lambda rows: from_pool(prof, drift_bins, rows, rng,
                                              weights / weights.sum()), prof)
    show("drifting (distance, restaurant)", drifting)

    for measured in (noise, fresh):
        for rows, r in measured.items():
            for name in (*prof.names, "predictions", "confidence"):
                assert r[name] < 0.01, (rows, name, r[name])  # < 1% of windows in alert
            assert r["dataset_drift"] < 0.01, (rows, r["dataset_drift"])
    for rows, r in drifting.items():
        assert r["distance_km"] >= 0.99 and r["restaurant"] >= 0.99, (rows, r)
        for name in ("hour", "items", "rain"):
            assert r[name] < 0.01, (rows, name, r[name])
        assert r["dataset_drift"] >= 0.99  # distance_km is the most important feature
