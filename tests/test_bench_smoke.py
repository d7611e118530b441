"""The benchmark scripts run end to end on tiny settings, so they cannot rot.

No timing is asserted: numbers from a tiny run mean nothing. What is checked is that every
suite runs against real servers and processes, writes its JSON, and that REPORT.md is built.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("latency", "memory", "coldstart", "size", "serving", "fleet", "small_device",
          "fallback", "telemetry", "rollout", "interleaving", "explain", "sdcard")


def run_tiny(tmp_path: Path, *only: str, timeout: int = 360) -> Path:
    """``python -m benchmarks.run --tiny`` for ``only`` those suites; the results directory."""
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--no-wrk", "--only", ",".join(only),
         "--workdir", str(tmp_path / "work"), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = json.loads(proc.stdout[:proc.stdout.rindex("}") + 1])
    assert header["mode"] == "tiny"
    assert {"cpu", "cores", "versions"} <= set(header["environment"])
    for suite in only:
        doc = json.loads((results / f"{suite}.json").read_text())
        assert doc["suite"] == suite and doc["mode"] == "tiny"
    return results


# The fleet suite (PostgreSQL, SeaweedFS, three replicas) has its own module,
# tests/test_bench_fleet_smoke.py, so the two halves run on different test workers; the
# rollout suite is checked in detail below.
@pytest.mark.timeout(420)
def test_quick_path_on_tiny_settings_writes_every_result_and_the_report(tmp_path: Path) -> None:
    results = run_tiny(tmp_path, *(s for s in SUITES if s not in ("fleet", "rollout")))
    latency = json.loads((results / "latency.json").read_text())
    row = latency["single_row"][0]
    assert {"sklearn", "ort", "edge_miss", "edge_hit"} <= set(row["stats_us"])
    serving = json.loads((results / "serving.json").read_text())
    assert serving["generator"] == "python"
    assert all(s["requests"] > 0 and s["errors"] == 0 for s in serving["servers"].values())
    fallback = json.loads((results / "fallback.json").read_text())
    assert fallback["refused"]["breaker"] == "open"
    assert fallback["refused"]["cloud_failures"] == 1
    size = json.loads((results / "size.json").read_text())
    assert size["wire"]["unchanged_sync"]["changed"] is False
    sdcard = json.loads((results / "sdcard.json").read_text())
    # no write on the predict path
    assert sdcard["per_day"]["predict (a block of 300 calls)"]["wchar"] == 0
    report = (results / "REPORT.md").read_text()
    assert "## Targets" in report and "## 9. Fallback cost" in report
    assert "## SD card" in report


def test_rollout_suite_on_tiny_settings_measures_every_contender(tmp_path: Path) -> None:
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--tiny", "--only", "rollout", "--workdir",
         str(tmp_path / "work"), "--results", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((results / "rollout.json").read_text())
    assert doc["suite"] == "rollout" and doc["mode"] == "tiny"
    (model,) = doc["rollout"]
    contenders = {"none", "canary_0.1", "canary_1", "shadow_1"}
    for regime in ("tight", "spaced"):
        assert set(model[regime]) == {"hit", "miss", "rows"}
        for door, got in model[regime].items():
            assert set(got) == contenders, (regime, door)
            for label, x in got.items():
                assert x["p10"] > 0 and x["median"] > 0, (regime, door, label)
                assert isinstance(x["added_us"], float) and x["added_pct"] is not None
                if label in ("canary_1", "shadow_1"):  # 0.1 may pick none of a tiny run's
                    assert x["calls"] > 0 and x["sampled"] > 0, (regime, door, label)
    for door, worker in model["worker"].items():
        assert set(worker) == contenders - {"none"}
        for label in ("canary_1", "shadow_1"):
            w = worker[label]
            assert w["rows_compared"] > 0 and w["calls_compared"] > 0, (door, label)
            assert w["cpu_us_per_row"] is None or w["cpu_us_per_row"] > 0
            assert w["drain_wait_us_per_sampled_call"] > 0
    spaced = model["spaced"]["miss"]
    assert spaced["canary_1"]["skipped"] == 0  # drained after every call: nothing dropped
    assert spaced["canary_1"]["rows_compared"] == spaced["canary_1"]["sampled"]
    report = (results / "REPORT.md").read_text()
    assert "## 11. A rollout's shadow on the device" in report
