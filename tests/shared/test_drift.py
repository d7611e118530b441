"""shared.drift and shared.reference: the binning rule, the distances, statuses, reports, sums,
the profile parser — and how often a stable stream raises an alarm."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from typing import Any

import numpy as np
import pytest

from hybridml.shared.drift import (
    ALERT,
    FLOOR,
    INSUFFICIENT,
    OK,
    WARN,
    Profile,
    Thresholds,
    bin_index,
    category_index,
    drift_report,
    feature_report,
    js_distance,
    ks_binned,
    linf,
    merge_counts,
    psi,
    status,
)
from hybridml.shared.errors import ConfigError, DataError, ManifestError
from hybridml.shared.reference import ColumnProfile, cut_points
from hybridml.shared.schema import InputSchema

SCHEMA = InputSchema.from_json([
    {"name": "hour", "kind": "numeric", "min": 8, "max": 22},
    {"name": "rain", "kind": "categorical", "categories": ["", "no", "yes", "hail"]},
])


def profile_json(**changes: Any) -> dict[str, Any]:
    """A small valid format-1 profile (hour numeric, rain categorical); ``changes`` replace
    top-level fields."""
    data: dict[str, Any] = {
        "format": 1, "rows": 100,
        "features": {
            "hour": {"kind": "numeric", "edges": [8.0, 12.0, 16.0, 22.0],
                     "proportions": [0.0, 0.3, 0.3, 0.4, 0.0], "missing": 0.05},
            "rain": {"kind": "categorical", "categories": ["no", "yes", ""],
                     "proportions": [0.6, 0.3, 0.1, 0.0], "missing": 0.1},
        },
        "predictions": {"kind": "categorical", "categories": ["late", "on_time"],
                        "proportions": [0.3, 0.7, 0.0]},
        "confidence": {"kind": "numeric", "edges": [0.5, 0.75, 1.0],
                       "proportions": [0.0, 0.5, 0.5, 0.0], "missing": 0.0},
        "importance": {"hour": 0.8, "rain": 0.2},
    }
    data.update(changes)
    return data


def summary(hour: list[int], rain: list[int], *, hour_missing: int = 0, unseen: int = 0,
            rain_missing: int = 0, version: int = 1, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "format": 1, "model": "late", "version": version,
        "window": {"start": "2026-12-01T15:00:00Z", "end": "2026-12-01T16:00:00Z"},
        "rows": sum(rain),
        "features": {"hour": {"counts": hour, "missing": hour_missing},
                     "rain": {"counts": rain, "missing": rain_missing, "unseen": unseen}},
        "predictions": {"counts": [300, 700, 0]}, "confidence": {"counts": [0, 500, 500, 0]},
    }
    out.update(extra)
    return out


# ------------------------------------------------------------------------------ bin_index
def test_bin_index_puts_min_max_below_above_and_nan_where_the_contract_says() -> None:
    edges = [1.0, 2.0, 3.0]
    values = np.array([0.5, 1.0, 1.5, 2.0, 2.999, 3.0, 3.0001, np.nan, np.inf, -np.inf])
    assert bin_index(edges, values).tolist() == [0, 1, 1, 2, 2, 2, 3, -1, 3, 0]


def test_bin_index_compares_float32_as_the_model_sees_values() -> None:
    # 0.1 is not a float32; a float64 0.1 and the float32 the model sees share a bin.
    edges = [0.1, 0.2, 0.3]
    assert bin_index(edges, np.array([0.1, np.float32(0.1), 0.3])).tolist() == [1, 1, 2]
    assert bin_index(edges, np.array([0.3], dtype=np.float32)).tolist() == [2]
    assert bin_index(edges, np.array([np.nextafter(np.float32(0.3), np.float32(1))])) \
        .tolist() == [3]


def test_bin_index_of_a_constant_column_holds_the_value_in_its_one_inner_bin() -> None:
    c = np.float32(5.0)
    edges = [c, np.nextafter(c, np.float32(np.inf))]
    assert bin_index(edges, np.array([4.9, 5.0, 5.1, np.nan])).tolist() == [0, 1, 2, -1]


def test_bin_index_without_edges_is_one_bin_and_a_single_edge_is_refused() -> None:
    assert bin_index([], np.array([1.0, np.nan, -3.0])).tolist() == [0, -1, 0]
    with pytest.raises(DataError, match="one edge"):
        bin_index([2.0], np.array([1.0]))


def test_cut_points_move_only_the_last_edge() -> None:
    cuts = cut_points([1.0, 2.0, 3.0])
    assert cuts.dtype == np.float32 and cuts[:2].tolist() == [1.0, 2.0] and cuts[2] > 3.0


def test_category_index_sends_unknown_missing_and_unhashable_values_to_other() -> None:
    values = np.array(["yes", "no", "hail", "", None, ["x"]], dtype=object)
    assert category_index(["no", "yes"], values).tolist() == [1, 0, 2, 2, 2, 2]
    assert category_index(["no", "", "yes"], ["", "yes"]).tolist() == [1, 2]


def test_binning_1000_rows_of_5_features_costs_tens_of_microseconds() -> None:
    rng = np.random.default_rng(0)
    num = rng.normal(size=(1000, 3)).astype(np.float32)
    num[rng.random(num.shape) < 0.05] = np.nan
    cat = np.array([[f"r{i}", ("yes", "no", "")[i % 3]] for i in rng.integers(0, 5, 1000)],
                   dtype=object)
    prof = Profile.from_json({
        "format": 1, "rows": 1000,
        "features": {
            **{f"x{j}": {"kind": "numeric",
                         "edges": np.unique(np.nanquantile(num[:, j], np.linspace(0, 1, 11)))
                         .astype(float).tolist(),
                         "proportions": [0.0] + [0.1] * 10 + [0.0]} for j in range(3)},
            "restaurant": {"kind": "categorical", "categories": [f"r{i}" for i in range(5)],
                           "proportions": [0.2] * 5 + [0.0]},
            "rain": {"kind": "categorical", "categories": ["yes", "no", ""],
                     "proportions": [0.3, 0.3, 0.4, 0.0]}},
        "predictions": {"kind": "categorical", "categories": ["a", "b"],
                        "proportions": [0.5, 0.5, 0.0]},
        "importance": {}})
    cols = [num[:, j] for j in range(3)] + [cat[:, 0], cat[:, 1]]

    def best(fn: Any, n: int = 300) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times) * 1e6

    numeric = best(lambda: [prof.features[j].index(cols[j]) for j in range(3)])
    categorical = best(lambda: [prof.features[j].index(cols[j]) for j in (3, 4)])
    tally = best(lambda: [f.tally(c) for f, c in zip(prof.features, cols)])
    print(f"\nbinning 1,000 rows: 3 numeric {numeric:.0f} µs, 2 categorical {categorical:.0f} "
          f"µs; tally of all 5 {tally:.0f} µs")
    # ~4 µs a numeric column and ~25 µs a categorical one here; the bound leaves room for a
    # loaded machine.
    assert numeric < 150 and categorical < 300


# ------------------------------------------------------------------------------ distances
def test_psi_js_ks_linf_of_known_distributions() -> None:
    ref, counts = [0.5, 0.5], [75, 25]  # q = 0.75, 0.25
    assert psi(ref, counts) == pytest.approx(0.25 * math.log(1.5) + 0.25 * math.log(2))
    m = (0.625, 0.375)
    js = 0.5 * (0.5 * math.log2(0.5 / m[0]) + 0.5 * math.log2(0.5 / m[1])) \
        + 0.5 * (0.75 * math.log2(0.75 / m[0]) + 0.25 * math.log2(0.25 / m[1]))
    assert js_distance(ref, counts) == pytest.approx(math.sqrt(js))  # 0.2209
    three, shifted = [0.2, 0.3, 0.5], [50, 30, 20]  # cdfs 0.2 0.5 1 and 0.5 0.8 1
    assert ks_binned(three, shifted) == pytest.approx(0.3)
    assert linf(three, shifted) == pytest.approx(0.3)


def test_equal_distributions_are_at_distance_zero() -> None:
    ref = [0.1, 0.2, 0.3, 0.4]
    for fn in (psi, js_distance, ks_binned, linf):
        assert fn(ref, [10, 20, 30, 40]) == pytest.approx(0.0, abs=1e-12)


def test_empty_bins_are_floored_at_1e4_then_renormalised() -> None:
    # reference 0.5 0.5 0 -> 0.5, 0.5, 1e-4 over 1.0001; window 0.45 0.45 0.1
    p = [0.5 / 1.0001, 0.5 / 1.0001, FLOOR / 1.0001]
    q = [0.45, 0.45, 0.1]
    want = sum((b - a) * math.log(b / a) for a, b in zip(p, q))
    assert psi([0.5, 0.5, 0.0], [45, 45, 10]) == pytest.approx(want)  # 0.7006
    assert psi([0.5, 0.5, 0.0], [50, 50, 0]) == pytest.approx(0.0)
    assert 0.999 < js_distance([1.0, 0.0], [0, 10]) <= 1.0  # disjoint: JS distance ~1


def test_distances_refuse_counts_of_another_profile_or_an_empty_window() -> None:
    with pytest.raises(DataError, match="3 counts for 2 reference bins") as err:
        psi([0.5, 0.5], [1, 2, 3])
    assert err.value.code == "data"
    with pytest.raises(DataError, match="no counts"):
        js_distance([0.5, 0.5], [0, 0])
    with pytest.raises(DataError, match="non-negative"):
        linf([0.5, 0.5], [-1, 2])


# ------------------------------------------------------------------------------ statuses
def test_status_thresholds_are_inclusive_from_below() -> None:
    assert status(0.0999, 500) == OK
    assert status(0.1, 500) == WARN
    assert status(0.2499, 500) == WARN
    assert status(0.25, 500) == ALERT
    assert status(5.0, 499) == INSUFFICIENT
    assert status(None, 10_000) == INSUFFICIENT
    assert status(0.15, 100, warn=0.2, alert=0.3, min_rows=100) == OK


def test_thresholds_refuse_bad_combinations_and_load_from_env() -> None:
    with pytest.raises(ConfigError, match="warn <= alert"):
        Thresholds(warn=0.3, alert=0.2)
    with pytest.raises(ConfigError, match="min_rows"):
        Thresholds(min_rows=0)
    with pytest.raises(ConfigError, match="unseen_alert"):
        Thresholds(unseen_alert=1.5)
    t = Thresholds.from_env({"HYBRIDML_DRIFT_ALERT": "0.3", "HYBRIDML_DRIFT_MIN_ROWS": "1000"})
    assert (t.warn, t.alert, t.min_rows) == (0.1, 0.3, 1000)


def test_feature_report_of_a_numeric_feature_has_psi_js_ks_and_the_missing_share() -> None:
    ref = profile_json()["features"]["hour"]
    entry = feature_report("hour", ref, [0, 300, 300, 400, 0], missing=50)
    assert entry == {"name": "hour", "kind": "numeric", "rows": 1000, "psi": 0.0, "js": 0.0,
                     "ks": 0.0, "status": OK, "missing": round(50 / 1050, 6)}
    moved = feature_report("hour", ref, [0, 100, 300, 400, 200], missing=0)
    assert moved["psi"] > 0.25 and moved["status"] == ALERT


def test_a_dead_sensor_is_an_alert_though_psi_never_sees_nan() -> None:
    ref = profile_json()["features"]["hour"]  # 5% missing in training
    entry = feature_report("hour", ref, [0, 60, 60, 80, 0], missing=800)
    assert entry["rows"] == 200 and entry["psi"] == pytest.approx(0.0, abs=1e-9)
    assert entry["missing"] == 0.8 and entry["status"] == ALERT


def test_an_unseen_share_of_a_tenth_is_an_alert_whatever_psi_says() -> None:
    ref = profile_json()["features"]["rain"]
    calm = feature_report("rain", ref, [600, 300, 100, 0], missing=100, unseen=0)
    assert calm["status"] == OK and calm["unseen"] == 0.0 and calm["missing"] == 0.1
    # A tenth of the reference is "other" (known, rare values); the window's "other" is the
    # same tenth, but made of values the model never saw: PSI 0, unseen share 0.1.
    rare = {"kind": "categorical", "categories": ["no", "yes"], "proportions": [0.6, 0.3, 0.1]}
    unseen = feature_report("rain", rare, [600, 300, 100], missing=0, unseen=100)
    assert unseen["psi"] == pytest.approx(0.0, abs=1e-9)
    assert unseen["unseen"] == 0.1 and unseen["status"] == ALERT
    assert feature_report("rain", rare, [600, 300, 100], 0, unseen=99)["status"] == OK


def test_small_windows_and_wide_features_are_insufficient() -> None:
    ref = profile_json()["features"]["hour"]
    assert feature_report("hour", ref, [0, 100, 100, 200, 0], 0)["status"] == INSUFFICIENT
    wide = {"kind": "categorical", "categories": [f"c{i}" for i in range(50)],
            "proportions": [0.02] * 50 + [0.0]}
    shifted = [0] * 25 + [40] * 25 + [0]  # half the categories gone: PSI ~3.8
    assert feature_report("wide", wide, shifted, 0)["status"] == INSUFFICIENT  # 1,000 < 2,000
    assert feature_report("wide", wide, [2 * c for c in shifted], 0)["status"] == ALERT
    assert feature_report("hour", ref, [0, 0, 0, 0, 0], 0)["psi"] is None


# ------------------------------------------------------------------------------ reports
def test_drift_report_has_the_contract_shape() -> None:
    report = drift_report(profile_json(), summary([0, 300, 300, 400, 0], [600, 300, 100, 0]))
    assert report["format"] == 1 and (report["model"], report["version"]) == ("late", 1)
    assert report["rows"] == 1000 and report["window"]["start"] == "2026-12-01T15:00:00Z"
    assert [f["name"] for f in report["features"]] == ["hour", "rain"]
    assert report["predictions"]["status"] == OK and report["confidence"]["status"] == OK
    assert report["dataset_drift"] is False
    other = drift_report(Profile.from_json(profile_json()), summary([0, 300, 300, 400, 0],
                         [600, 300, 100, 0]), model="eta", version=3, window={"start": "x"})
    assert (other["model"], other["version"], other["window"]) == ("eta", 3, {"start": "x"})


def test_dataset_drift_when_half_the_judged_features_alert() -> None:
    imp = {"hour": 0.0, "rain": 0.0}  # no important feature: only the share rule
    prof = profile_json(importance=imp)
    one = drift_report(prof, summary([0, 300, 300, 400, 0], [100, 300, 600, 0]))
    assert [f["status"] for f in one["features"]] == [OK, ALERT]
    assert one["dataset_drift"] is True  # 1 of 2 judged
    hour_small = drift_report(prof, summary([0, 30, 30, 40, 0], [100, 300, 600, 0]))
    assert hour_small["features"][0]["status"] == INSUFFICIENT
    assert hour_small["dataset_drift"] is True  # 1 of 1 judged


def test_dataset_drift_when_one_of_the_three_most_important_alerts() -> None:
    names = [f"f{i}" for i in range(6)]
    entry = {"kind": "categorical", "categories": ["a", "b"], "proportions": [0.5, 0.5, 0.0]}
    imp = {"f0": 0.05, "f1": 0.4, "f2": 0.3, "f3": 0.2, "f4": 0.05, "f5": 0.0}
    prof = profile_json(features={n: entry for n in names}, importance=imp)
    calm = {"counts": [500, 500, 0]}
    drifted = {"counts": [900, 100, 0]}

    def report(alerting: str) -> dict[str, Any]:
        feats = {n: drifted if n == alerting else calm for n in names}
        return drift_report(prof, summary([], [], features=feats, rows=1000))

    assert Profile.from_json(prof).top_features(3) == ("f1", "f2", "f3")
    assert report("f3")["dataset_drift"] is True  # third most important
    assert report("f0")["dataset_drift"] is False  # 1 of 6, not important
    assert report("f5")["dataset_drift"] is False


def test_drift_report_refuses_counts_made_with_another_profile() -> None:
    with pytest.raises(DataError, match="4 counts for 5 reference bins") as err:
        drift_report(profile_json(), summary([0, 300, 300, 400], [600, 300, 100, 0]))
    assert err.value.details["field"] == "hour"
    no_rain = summary([0, 300, 300, 400, 0], [600, 300, 100, 0])
    del no_rain["features"]["rain"]
    with pytest.raises(DataError, match=r"no counts for features\.rain"):
        drift_report(profile_json(), no_rain)


# ------------------------------------------------------------------------------ merging
def test_merge_counts_sums_every_count_and_spans_the_windows() -> None:
    a = summary([0, 300, 300, 400, 0], [600, 300, 100, 0], hour_missing=5, unseen=2,
                by_source={"edge": 900, "cloud": 100},
                latency_ms={"edges": [0.1, 1.0], "counts": [5, 3, 1]})
    b = summary([1, 2, 3, 4, 5], [1, 1, 1, 2], hour_missing=1, unseen=1,
                window={"start": "2026-12-01T14:00:00Z", "end": "2026-12-01T15:00:00Z"},
                by_source={"edge": 5}, degraded={"out_of_range": 2}, stale=True,
                latency_ms={"edges": [0.1, 1.0], "counts": [1, 1, 1]})
    m = merge_counts([a, b])
    assert m["features"]["hour"] == {"counts": [1, 302, 303, 404, 5], "missing": 6}
    assert m["features"]["rain"] == {"counts": [601, 301, 101, 2], "missing": 0, "unseen": 3}
    assert m["predictions"] == {"counts": [600, 1400, 0]}
    assert m["rows"] == 1005 and m["by_source"] == {"edge": 905, "cloud": 100}
    assert m["degraded"] == {"out_of_range": 2} and m["stale"] is True
    assert m["latency_ms"] == {"edges": [0.1, 1.0], "counts": [6, 4, 2]}
    assert m["window"] == {"start": "2026-12-01T14:00:00Z", "end": "2026-12-01T16:00:00Z"}
    assert drift_report(profile_json(), m)["rows"] == 1005


def test_merge_counts_refuses_summaries_of_different_profiles_or_versions() -> None:
    a = summary([0, 300, 300, 400, 0], [600, 300, 100, 0])
    with pytest.raises(DataError, match="lengths") as err:
        merge_counts([a, summary([0, 300, 300, 400, 0, 0], [600, 300, 100, 0])])
    assert err.value.details["field"] == "features.hour"
    with pytest.raises(DataError, match="different versions"):
        merge_counts([a, summary([0, 300, 300, 400, 0], [600, 300, 100, 0], version=2)])
    with pytest.raises(DataError, match="different features"):
        merge_counts([a, summary([0, 300, 300, 400, 0], [600, 300, 100, 0],
                                 features={"hour": a["features"]["hour"]})])
    with pytest.raises(DataError, match="different edges"):
        merge_counts([dict(a, latency_ms={"edges": [1.0], "counts": [1, 1]}),
                      dict(a, latency_ms={"edges": [2.0], "counts": [1, 1]})])
    with pytest.raises(DataError, match="no summaries"):
        merge_counts([])
    with pytest.raises(DataError, match="summary format 2") as err:
        merge_counts([a, dict(a, format=2)])
    assert err.value.details["field"] == "format"
    with pytest.raises(DataError, match="summary format 2"):
        drift_report(profile_json(), dict(a, format=2))


# ------------------------------------------------------------------------------ the profile
def test_profile_parses_in_schema_order_and_round_trips() -> None:
    data = profile_json()
    prof = Profile.from_json({**data, "features": dict(reversed(data["features"].items()))},
                             SCHEMA)
    assert prof.names == ("hour", "rain") and prof.rows == 100
    hour = prof.feature("hour")
    assert hour.edges.dtype == np.float32 and hour.n_bins == 5 and hour.missing == 0.05
    assert prof.confidence is not None and prof.predictions.categories == ("late", "on_time")
    assert Profile.from_json(prof.to_json(), SCHEMA).to_json() == prof.to_json()
    with pytest.raises(DataError, match="no feature 'wind'"):
        prof.feature("wind")


def test_profile_of_an_old_manifest_is_none_and_of_a_new_one_follows_its_schema() -> None:
    old = {"schema": SCHEMA.to_json(), "profile": {"rows": 3, "features": {"hour": {}}}}
    assert Profile.of(old) is None
    assert Profile.of({"schema": SCHEMA.to_json()}) is None
    prof = Profile.of({"schema": SCHEMA.to_json(), "profile": profile_json()})
    assert prof is not None and prof.names == SCHEMA.names
    with pytest.raises(ManifestError) as err:
        Profile.of({"schema": SCHEMA.to_json(), "profile": profile_json(format=2)})
    assert err.value.details["field"] == "profile.format"


def test_tally_counts_bins_missing_and_unseen_values() -> None:
    prof = Profile.from_json(profile_json(), SCHEMA)
    hour = prof.feature("hour").tally(np.array([7, 8, 12, 22, 23, np.nan], dtype=np.float32))
    assert hour.counts.tolist() == [1, 1, 1, 1, 1] and (hour.missing, hour.unseen) == (1, 0)
    rain = prof.feature("rain").tally(np.array(["no", "", "", "hail", "snow", "yes"], object))
    # hail is known but not among the profile's categories: other; snow is unseen: other too
    assert rain.counts.tolist() == [1, 1, 2, 2] and (rain.missing, rain.unseen) == (2, 1)
    assert prof.feature("rain").index(["snow", "hail", "yes"]).tolist() == [3, 3, 1]
    rare_blank = ColumnProfile("c", "categorical", np.array([1.0, 0.0]), categories=("a",),
                               known=frozenset({"a", ""}))
    assert rare_blank.tally(["", "a", "b"]) == (pytest.approx([1, 2]), 1, 1)


@pytest.mark.parametrize(("path", "value", "field", "message"), [
    (("features", "hour", "proportions"), [0.5, 0.5], "profile.features.hour.proportions",
     "needs len"),
    (("features", "hour", "proportions"), [0.0, 0.3, 0.3, 0.3, 0.0],
     "profile.features.hour.proportions", "summing to 1"),
    (("features", "hour", "proportions"), [0.0, 0.3, -0.3, 1.0, 0.0],
     "profile.features.hour.proportions", "summing to 1"),
    (("features", "hour", "edges"), [8.0, 16.0, 12.0, 22.0], "profile.features.hour.edges",
     "strictly increasing"),
    (("features", "hour", "edges"), [8.0, 8.0, 16.0, 22.0], "profile.features.hour.edges",
     "strictly increasing"),
    (("features", "hour", "edges"), [8.0], "profile.features.hour.edges", "one edge"),
    (("features", "hour", "edges"), [8.0, "x", 16.0, 22.0], "profile.features.hour.edges",
     "finite number"),
    (("features", "hour", "missing"), 1.5, "profile.features.hour.missing", "in \\[0, 1\\]"),
    (("features", "hour", "kind"), "text", "profile.features.hour.kind", "numeric"),
    (("features", "rain", "kind"), "numeric", "profile.features.rain.edges", "list"),
    (("features", "rain", "categories"), ["no", "no", ""],
     "profile.features.rain.categories", "twice"),
    (("features", "rain"), None, "profile.features.rain", "no entry"),
    (("features", "wind"), {"kind": "numeric", "edges": [], "proportions": [1.0]},
     "profile.features.wind", "not in the schema"),
    (("predictions",), None, "profile.predictions", "object"),
    (("importance", "wind"), 0.1, "profile.importance.wind", "not a feature"),
    (("importance", "hour"), -0.1, "profile.importance.hour", "clipped"),
    (("rows",), -1, "profile.rows", "row count"),
])
def test_malformed_profiles_are_manifest_errors_naming_the_field(
        path: tuple[str, ...], value: Any, field: str, message: str) -> None:
    data = profile_json()
    target = data
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    with pytest.raises(ManifestError, match=message) as err:
        Profile.from_json(data, SCHEMA)
    assert err.value.details["field"] == field and err.value.code == "manifest"


def test_a_profile_feature_of_the_wrong_kind_is_refused() -> None:
    data = profile_json()
    data["features"]["hour"] = data["features"]["rain"]
    with pytest.raises(ManifestError, match="schema says numeric") as err:
        Profile.from_json(data, SCHEMA)
    assert err.value.details["field"] == "profile.features.hour.kind"


def test_drift_imports_nothing_heavier_than_numpy() -> None:
    code = ("import sys, hybridml.shared.drift; "
            "heavy = [m for m in ('sklearn', 'onnxruntime', 'scipy', 'requests', 'pandas') "
            "if m in sys.modules]; print(heavy); sys.exit(bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------------------ noise
def test_min_rows_500_is_where_a_stable_12_bin_psi_stops_being_noise() -> None:
    """Thresholds' claim, measured: 5,000 windows drawn from a 12-bin reference."""
    rng = np.random.default_rng(0)
    ref = np.array([0.0] + [0.1] * 10 + [0.0])
    p999 = {}
    for n in (100, 200, 440, 500, 2000):
        values = np.array([psi(ref, c) for c in rng.multinomial(n, ref, size=5000)])
        p999[n] = float(np.quantile(values, 0.999))
    wide = np.append(np.full(50, 0.98 / 50), 0.02)  # a 50-category feature + other
    wide_warn = {n: float(np.mean([psi(wide, c) >= 0.1 for c in
                                   rng.multinomial(n, wide, size=2000)])) for n in (500, 2000)}
    print(f"\nstable 12-bin PSI, 99.9th percentile by window: "
          f"{ {n: round(v, 3) for n, v in p999.items()} }; 51-bin share of windows in warn: "
          f"{wide_warn}")
    assert p999[100] > 0.25  # 100 rows: a stable feature alerts 1 window in 1,000
    assert p999[440] < 0.1 and p999[500] < 0.07 and p999[2000] < 0.02
    assert wide_warn[500] > 0.3 and wide_warn[2000] < 0.001  # why rows_per_bin exists
