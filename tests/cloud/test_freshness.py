"""``hybridml-cloud freshness``: fresh data beats more data when the world moves, and not when
it stands still; retraining more often pays on a moving stream."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hybridml.cloud.freshness import Freshness, study
from hybridml.shared.errors import ConfigError, DataError

BIN = Path(sys.executable).parent
T0 = datetime(2026, 9, 1, tzinfo=timezone.utc)


def stream(path: Path, *, moving: bool, days: int = 60, per_day: int = 40) -> Path:
    """Orders over ``days``: ``late`` when the distance passes a cut that moves over time
    (concept drift) or stays put."""
    rng = random.Random(0)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ts", "distance_km", "hour", "rain", "late"])
        for day in range(days):
            cut = 2.0 + 6.0 * day / (days - 1) if moving else 5.0
            for _ in range(per_day):
                ts = T0 + timedelta(days=day, seconds=rng.randrange(86400))
                d, rain = rng.uniform(0.5, 10), rng.choice(["yes", "no"])
                late = d + (1.0 if rain == "yes" else 0.0) + rng.gauss(0, 0.5) > cut
                w.writerow([ts.isoformat().replace("+00:00", "Z"), round(d, 2),
                            rng.randrange(8, 23), rain, "late" if late else "on_time"])
    return path


def value(result: Freshness, what: str, fam: str, span: str) -> float:
    point = next(p for p in result.points
                 if p.study == what and p.family == fam and p.span == span)
    assert point.value is not None, point.note
    return float(point.value)


def test_on_a_moving_stream_a_recent_window_and_frequent_retraining_win(tmp_path: Path) -> None:
    data = stream(tmp_path / "moving.csv", moving=True)
    r = study(data, "late", "ts", windows=["45d", "14d", "3d"], intervals=["1d", "28d"],
              model="logreg")
    assert r.metric == "balanced_accuracy" and r.higher_is_better
    assert value(r, "window", "logreg", "3d") > value(r, "window", "logreg", "45d") + 0.05
    assert value(r, "interval", "logreg", "1d") > value(r, "interval", "logreg", "28d") + 0.02
    assert value(r, "window", "logreg", "45d") > 0.5  # every point trained and scored


def test_on_a_stable_stream_more_data_is_as_good_as_fresh_data(tmp_path: Path) -> None:
    data = stream(tmp_path / "stable.csv", moving=False)
    r = study(data, "late", "ts", windows=["45d", "3d"], model="logreg")
    assert value(r, "window", "logreg", "45d") >= value(r, "window", "logreg", "3d") - 0.02


def test_two_families_set_model_iteration_against_data_iteration_and_plot(
        tmp_path: Path) -> None:
    data = stream(tmp_path / "moving.csv", moving=True, days=30)
    out = subprocess.run(
        [str(BIN / "hybridml-cloud"), "freshness", "--data", str(data), "--target", "late",
         "--time-column", "ts", "--windows", "20d,3d", "--intervals", "7d",
         "--model", "logreg", "--compare", "rf", "--plot", str(tmp_path / "f.png"), "--json"],
        capture_output=True, text=True, timeout=120, check=True)
    doc = json.loads(out.stdout)
    assert {p["family"] for p in doc["points"]} == {"logreg", "rf"}
    assert {p["study"] for p in doc["points"]} == {"window", "interval"}
    it = doc["iteration"]
    assert it["data"]["from"] == "20d" and it["data"]["to"] == "3d" and it["data"]["gain"] > 0
    assert it["model"]["to"] == "rf" and isinstance(it["model"]["gain"], float)
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = subprocess.run(
        [str(BIN / "hybridml-cloud"), "freshness", "--data", str(data), "--target", "late",
         "--time-column", "ts", "--windows", "20d,3d", "--model", "logreg", "--compare", "rf"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert "data iteration:" in text and "model iteration:" in text


def test_bad_times_windows_and_columns_are_errors_naming_the_field(tmp_path: Path) -> None:
    data = stream(tmp_path / "s.csv", moving=False, days=5)
    with pytest.raises(ConfigError) as err:
        study(data, "late", "ts", windows=["7x"])
    assert err.value.details["field"] == "windows"
    with pytest.raises(DataError, match="no column 'when'"):
        study(data, "late", "when", windows=["1d"])
    bad = tmp_path / "bad.csv"
    bad.write_text(data.read_text().replace("2026-09-01T", "yesterday-T", 1))
    with pytest.raises(DataError, match="not a time") as err:
        study(bad, "late", "ts", windows=["1d"])
    assert err.value.details["field"] == "ts"
