"""``hybridml-edge`` end to end: sync, predict (JSON lines, arrays, CSV), status, rollback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from tests.conftest import CloudServer

EDGE = str(Path(sys.executable).parent / "hybridml-edge")
ROW = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}


def edge(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], input=stdin, capture_output=True, text=True,
                          timeout=60, check=False)


def test_sync_then_predict_json_lines_prints_one_object_per_row(cloud: CloudServer,
                                                                tmp_path: Path) -> None:
    store = str(cloud.trust(tmp_path / "s"))
    r = edge("sync", "--cloud", cloud.url, "--name", "late", "--store", store)
    assert r.returncode == 0 and "activated v1" in r.stdout
    r = edge("sync", "--cloud", cloud.url, "--name", "late", "--store", store)
    assert "up to date at v1" in r.stdout
    lines = "\n".join(json.dumps(x) for x in [ROW, dict(ROW, hour=13)])
    r = edge("predict", "--store", store, "--name", "late", "--json", stdin=lines)
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert r.returncode == 0 and len(out) == 2
    assert {"prediction", "source", "model_version", "probabilities"} <= set(out[0])


def test_predict_reads_json_arrays_and_csv_files(cloud: CloudServer, tmp_path: Path) -> None:
    store = str(cloud.trust(tmp_path / "s"))
    edge("sync", "--cloud", cloud.url, "--name", "late", "--store", store)
    r = edge("predict", "--store", store, "--name", "late", "--json",
             stdin=json.dumps([ROW, list(ROW.values())]))
    assert len(r.stdout.splitlines()) == 2
    csv_file = tmp_path / "rows.csv"
    csv_file.write_text("id,restaurant,hour,distance_km,rain,items\n7,r001,12,3.0,no,2\n"
                        "8,r002,9,,,1\n")
    r = edge("predict", "--store", store, "--name", "late", "--input", str(csv_file))
    assert r.returncode == 0, r.stderr
    assert "edge" in r.stdout and len(r.stdout.strip().splitlines()) == 3


def test_offline_predict_warns_once_not_per_row(cloud: CloudServer, tmp_path: Path) -> None:
    store = str(cloud.trust(tmp_path / "s"))
    edge("sync", "--cloud", cloud.url, "--name", "late", "--store", store)
    odd = "\n".join(json.dumps(dict(ROW, distance_km=100.0 + i)) for i in range(5))
    r = edge("predict", "--store", store, "--name", "late", "--json", "--cloud",
             "http://127.0.0.1:9", stdin=odd)
    assert r.returncode == 0
    assert r.stderr.count("did not answer") == 1
    assert all(json.loads(x)["degraded"] for x in r.stdout.splitlines())


def test_bad_rows_are_reported_per_row_or_fail_with_the_column(cloud: CloudServer,
                                                               tmp_path: Path) -> None:
    store = str(cloud.trust(tmp_path / "s"))
    edge("sync", "--cloud", cloud.url, "--name", "late", "--store", store)
    rows = json.dumps([ROW, dict(ROW, hour="noon")])
    r = edge("predict", "--store", store, "--name", "late", stdin=rows)
    assert r.returncode == 2 and "'hour'" in r.stderr and "Traceback" not in r.stderr
    r = edge("predict", "--store", store, "--name", "late", "--json", "--errors", "report",
             stdin=rows)
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert out[0]["source"] == "edge" and out[1]["error"]["details"]["field"] == "hour"


def test_predict_without_a_model_says_to_sync(tmp_path: Path) -> None:
    r = edge("predict", "--store", str(tmp_path / "none"), "--name", "late",
             stdin=json.dumps(ROW))
    assert r.returncode == 2 and "run 'hybridml-edge sync" in r.stderr


def test_status_and_rollback(own_cloud: CloudServer, tmp_path: Path) -> None:
    store = str(own_cloud.trust(tmp_path / "s"))
    edge("sync", "--cloud", own_cloud.url, "--name", "iris", "--store", store)
    reg = Registry(own_cloud.registry)
    train(reg, "iris", dataset="iris", model="logreg", seed=5)
    reg.set_alias("iris", "stable", 2)
    edge("sync", "--cloud", own_cloud.url, "--name", "iris", "--store", store)
    r = edge("status", "--store", store, "--cloud", own_cloud.url, "--json")
    status = json.loads(r.stdout)
    assert status["cloud_reachable"] is True
    assert status["models"][0]["active_version"] == 2
    assert status["models"][0]["previous_version"] == 1
    r = edge("rollback", "--store", store, "--name", "iris")
    assert "rolled back to v1" in r.stdout
    r = edge("status", "--store", store)
    assert "iris: active v1, previous v2" in r.stdout


def test_agent_syncs_and_keeps_going_when_cloud_is_down(own_cloud: CloudServer,
                                                        tmp_path: Path) -> None:
    store = str(own_cloud.trust(tmp_path / "s"))
    r = edge("agent", "--cloud", own_cloud.url, "--name", "iris", "--store", store,
             "--interval", "0.2", "--max-cycles", "2")
    assert r.returncode == 0
    own_cloud.stop()
    r = edge("agent", "--cloud", own_cloud.url, "--name", "iris", "--store", store,
             "--interval", "0.1", "--max-cycles", "3")
    assert r.returncode == 0 and r.stderr.count("sync of iris failed") == 3
    r = edge("predict", "--store", store, "--name", "iris", "--json",
             stdin=json.dumps([[5.1, 3.5, 1.4, 0.2]]))
    assert json.loads(r.stdout)["source"] == "edge"
