"""Monitoring end to end on a real gunicorn server: devices upload summaries and feedback over
HTTP, ``hybridml-cloud monitor`` reads the store, ``/metrics`` serves Prometheus text."""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from hybridml.cloud.cli import main
from hybridml.cloud.registry import Registry
from hybridml.cloud.telemetry import TelemetryStore
from hybridml.cloud.tokens import TokenStore
from hybridml.shared.clock import utc_iso
from tests.conftest import CloudServer, start_cloud
from tests.summarykit import Span, records, shifted, summary

HOUR = 3600
STEADY, MOVED = "5eadf00d01", "0dd5a1e502"  # two devices' store ids


def order_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Orders as typed rows, drawn like the training CSV (tests.conftest.write_orders_csv)."""
    rng = np.random.default_rng(seed)
    return [{"restaurant": f"r{rng.integers(0, 5):03d}", "hour": int(rng.integers(8, 23)),
             "distance_km": None if rng.random() < 0.05 else
             round(float(rng.uniform(0.5, 9.0)), 2),
             "rain": str(rng.choice(["yes", "no", ""])), "items": int(rng.integers(1, 8))}
            for _ in range(n)]


@dataclass
class Site:
    """A server over a private registry, the eta manifest, and the hours uploaded."""

    cloud: CloudServer
    registry: Path
    manifest: dict[str, Any]
    now: float  # the end of the newest window (the hour before the test started)

    def hour(self, k: int) -> Span:
        """The k-th hour before :attr:`now` (0: the newest)."""
        return Span(start=self.now - (k + 1) * HOUR, end=self.now - k * HOUR)

    def iso(self, k: int) -> str:
        """The start of hour k, ISO."""
        return utc_iso(self.hour(k)["start"])

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        """POST JSON to the server."""
        return requests.post(self.cloud.url + path, json=body, timeout=30, **kw)


@pytest.fixture(scope="module")
def site(trained_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """gunicorn over a copy of the trained registry. Uploaded before the tests: the steady
    device's two hours, and the moved device's hour 1 with ``distance_km`` (the feature
    that matters most for eta) shifted by 6 km."""
    root = tmp_path_factory.mktemp("monitor") / "reg"
    shutil.copytree(trained_registry, root)
    server = start_cloud(root)
    s = Site(server, root, Registry(root).manifest("eta"), time.time() // HOUR * HOUR)
    steady = [summary(s.manifest, order_rows(1500, k), **s.hour(k),
                      by_source={"edge": 1400, "precomputed": 100}) for k in (1, 0)]
    moved = summary(s.manifest, shifted(order_rows(1500, 7), "distance_km", 6.0), **s.hour(1),
                    by_source={"edge": 1450, "cloud": 50})
    for r in (s.post("/v1/telemetry", {"records": records(STEADY, steady)}),
              s.post("/v1/telemetry", {"records": records(MOVED, [moved]),
                                       "dropped": {"sample": 5}})):
        assert r.status_code == 200 and not r.json()["refused"], r.text
    yield s
    server.stop()


def monitor_json(site: Site, capsys: pytest.CaptureFixture[str], *extra: str
                 ) -> dict[str, Any]:
    """``hybridml-cloud monitor eta --json`` over the site's registry."""
    assert main(["monitor", "eta", "--registry", str(site.registry), "--json",
                 *extra]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_an_upload_sent_twice_is_stored_once(site: Site) -> None:
    body = {"records": records("1de3907300", [summary(site.manifest, order_rows(20, 99),
                                                      **site.hour(5))])}
    first, again = site.post("/v1/telemetry", body), site.post("/v1/telemetry", body)
    assert first.status_code == again.status_code == 200
    assert first.json() == {"accepted": ["1de3907300:1"], "duplicates": [], "refused": []}
    assert again.json() == {"accepted": [], "duplicates": ["1de3907300:1"], "refused": []}


def test_refused_records_name_their_field_and_the_rest_is_stored(site: Site) -> None:
    good = summary(site.manifest, order_rows(10, 98), **site.hour(6))
    bad = {**good, "rows": -3}
    unseen = {**good, "features": {**good["features"], "colour": {"counts": [1], "missing": 0}}}
    r = site.post("/v1/telemetry", {"records": records("abcdef0123", [good, bad, unseen])})
    assert r.status_code == 200
    out = r.json()
    assert out["accepted"] == ["abcdef0123:1"]
    assert [(x["id"], x["field"]) for x in out["refused"]] == [
        ("abcdef0123:2", "body.rows"), ("abcdef0123:3", "body.features.colour")]


BAD_BODIES = [
    (b"[]", 400, "body"), (b'{"records": {}}', 400, "records"),
    (b'{"records": [], "extra": 1}', 400, "extra"), (b"{", 400, "body"),
    (b'{"records": [], "dropped": {"summary": -1}}', 400, "dropped.summary"),
    (b'{"records": [], "dropped": []}', 400, "dropped"), (b'{"records": NaN}', 400, "records"),
    (json.dumps({"records": [{}] * 501}).encode(), 413, "records"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_BODIES)
def test_a_malformed_upload_is_4xx_json_naming_the_field(site: Site, body: bytes, status: int,
                                                         field: str) -> None:
    for path, want in (("/v1/telemetry", field),  # feedback takes no "dropped" at all:
                       ("/v1/models/eta/feedback", re.sub(r"^dropped.*", "dropped", field))):
        r = requests.post(site.cloud.url + path, data=body, timeout=30,
                          headers={"Content-Type": "application/json"})
        assert r.status_code == status, r.text
        assert r.json()["error"]["details"]["field"] == want


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
    | st.text(max_size=8) | st.sampled_from(["\ud800", "2026-12-01T16:00:00Z", "edge", ""]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3), max_leaves=10)
COLUMNS = ["restaurant", "hour", "distance_km", "rain", "items"]
feedback_bodies = st.fixed_dictionaries(
    {"format": st.just(1) | json_values, "label": st.floats() | json_values},
    optional={"prediction_id": st.text(max_size=20) | json_values,
              "prediction": json_values, "version": st.sampled_from([1, 2, 99]) | json_values,
              "features": st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=5)
              | json_values, "created": json_values, "model": st.just("eta") | json_values})
summary_bodies = st.fixed_dictionaries(
    {"format": st.just(1), "model": st.just("eta") | json_values,
     "version": st.just(1) | json_values,
     "window": st.fixed_dictionaries({"start": json_values, "end": json_values}) | json_values,
     "rows": st.integers(-5, 10**13) | json_values},
    optional={"by_source": st.dictionaries(st.text(max_size=6), json_values, max_size=3),
              "features": st.dictionaries(st.sampled_from(COLUMNS), st.fixed_dictionaries(
                  {"counts": st.lists(st.integers(-1, 5), max_size=13) | json_values}),
                  max_size=5) | json_values, "predictions": json_values,
              "latency_ms": json_values, "stale": json_values})
record_like = st.fixed_dictionaries(
    {"id": st.sampled_from(["abcdef0123:77", "x"]) | st.text(max_size=12) | json_values,
     "kind": st.sampled_from(["summary", "feedback", "sample", "alert"]) | json_values,
     "body": summary_bodies | feedback_bodies | json_values})


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(records_=st.lists(record_like | feedback_bodies | json_values, max_size=4),
       dropped=st.none() | json_values, endpoint=st.sampled_from(["telemetry", "feedback"]))
def test_fuzzed_uploads_never_answer_5xx(site: Site, records_: list[Any], dropped: Any,
                                         endpoint: str) -> None:
    body: dict[str, Any] = {"records": records_}
    if dropped is not None:
        body["dropped"] = dropped
    path = "/v1/telemetry" if endpoint == "telemetry" else "/v1/models/eta/feedback"
    r = requests.post(site.cloud.url + path, data=json.dumps(body), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code < 500, r.text
    if r.status_code == 200:
        out = r.json()
        assert len(out["accepted"]) + len(out["duplicates"]) + len(out["refused"]) \
            == len(records_)


def test_monitor_json_flags_the_drifted_feature_only(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    out = monitor_json(site, capsys, "--since", site.iso(1), "--until",
                       utc_iso(site.hour(0)["end"]))
    status = {f["name"]: f["status"] for f in out["features"]}
    assert status.pop("distance_km") == "alert"
    assert set(status.values()) == {"ok"}, status
    assert out["dataset_drift"] is True and out["rows"] == 4500
    assert out["predictions"]["by_source"] == {"edge": 4250, "precomputed": 200, "cloud": 50}
    devices = {d["device"]: d for d in out["devices"]}
    assert devices[MOVED]["dataset_drift"] is True and devices[MOVED]["alerts"] == \
        ["distance_km"]
    assert devices[STEADY]["dataset_drift"] is False and devices[STEADY]["period_rows"] == 3000
    assert out["diagnosis"]["verdict"] == "data_drift"
    assert {"name", "kind", "psi", "status", "rows"} <= set(out["features"][0])

    newest = monitor_json(site, capsys, "--since", site.iso(0), "--until",
                          utc_iso(site.hour(0)["end"]))
    assert newest["dataset_drift"] is False and newest["rows"] == 1500


def load_labels(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                ) -> dict[str, Any]:
    """``hybridml-cloud feedback`` with 40 labels of the steady device's predictions, every
    one 12 minutes off (RMSE 12, four times the held-out RMSE). The same bytes every time,
    so the same ids: loading it again adds nothing."""
    fb = tmp_path / "labels.csv"
    with fb.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prediction_id", "prediction", "version", "label"])
        for i in range(40):
            w.writerow([f"{STEADY}:eta:{i}", 30.0, 1, 42.0 if i % 2 else 18.0])
    assert main(["feedback", "--name", "eta", "--data", str(fb), "--registry",
                 str(site.registry), "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_labels_show_performance_and_a_fall_with_stable_inputs_is_concept_drift(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    loaded = load_labels(site, tmp_path, capsys)
    assert loaded["accepted"] + loaded["duplicates"] == 40 and loaded["refused"] == 0
    assert load_labels(site, tmp_path, capsys)["duplicates"] == 40

    newest = monitor_json(site, capsys, "--since", site.iso(0), "--until",
                          utc_iso(site.hour(0)["end"]))
    realised = [p for p in newest["performance"] if not p["estimate"]]
    assert realised[-1]["metric"] == "rmse" and realised[-1]["labels"] == 40
    assert math.isclose(realised[-1]["value"], 12.0)
    assert newest["diagnosis"]["verdict"] == "concept_drift"
    assert newest["diagnosis"]["performance_falls"] is True
    both = monitor_json(site, capsys, "--since", site.iso(1), "--until",
                        utc_iso(site.hour(0)["end"]))
    assert both["diagnosis"]["verdict"] == "data_and_performance"


def test_feedback_rows_with_features_become_labelled_rows(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "labelled.csv"
    rows = order_rows(5, 11)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, [*rows[0], "delivery_minutes"])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**{k: "" if v is None else v for k, v in r.items()},
                        "delivery_minutes": "n/a?" if i == 4 else 20 + i})
    assert main(["feedback", "--name", "eta", "--data", str(path), "--registry",
                 str(site.registry), "--json"]) == 2  # one row refused
    out = json.loads(capsys.readouterr().out)
    assert (out["accepted"], out["refused"]) == (4, 1)
    assert out["refusals"][0]["index"] == 6 and out["refusals"][0]["field"] == "label"
    store = TelemetryStore(Registry(site.registry))
    got, labels = store.labelled_rows("eta")
    assert labels[-4:] == [20.0, 21.0, 22.0, 23.0]
    assert got[-1]["restaurant"] == rows[3]["restaurant"]


def test_metrics_sum_every_worker_and_read_the_store(site: Site) -> None:
    for _ in range(30):  # new connections: both workers answer some
        assert requests.get(site.cloud.url + "/healthz", timeout=10).ok
    families = {}
    for _ in range(2):
        r = requests.get(site.cloud.url + "/metrics", timeout=30)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        health = sum(s.value for s in families["hybridml_http_requests"].samples
                     if s.name.endswith("_total") and s.labels["endpoint"] == "healthz")
        assert health >= 30
    predictions = {(s.labels["model"], s.labels["source"]): s.value
                   for s in families["hybridml_predictions"].samples
                   if s.name.endswith("_total")}
    assert predictions[("eta", "edge")] >= 4250 and predictions[("eta", "cloud")] == 50
    psi = {s.labels["feature"]: s.value for s in families["hybridml_drift_psi"].samples
           if s.labels["model"] == "eta"}
    assert psi["distance_km"] > 0.25 and psi["hour"] < 0.1
    level = {s.labels["feature"]: s.value for s in families["hybridml_drift_level"].samples
             if s.labels["model"] == "eta"}
    assert level["distance_km"] == 2
    assert [s.value for s in families["hybridml_dataset_drift"].samples
            if s.labels["model"] == "eta"] == [1.0]
    assert [s.value for s in families["hybridml_spool_dropped"].samples
            if s.name.endswith("_total") and s.labels["kind"] == "sample"] == [5.0]


def test_the_html_report_is_one_file_with_its_plots_inside(
        site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_labels(site, tmp_path, capsys)
    page = tmp_path / "drift.html"
    out = monitor_json(site, capsys, "--since", site.iso(1), "--report", str(page))
    assert out["report"] == str(page)
    text = page.read_text()
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text)
    assert len(images) == 3  # drift per feature, performance over time, traffic by source
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert "distance_km" in text and MOVED in text


def test_the_device_is_the_token_name_and_metrics_are_open_on_loopback(
        site: Site, tmp_path: Path) -> None:
    root = tmp_path / "reg"
    shutil.copytree(site.registry, root)
    _, token = TokenStore(root).create("device", "kitchen-pi")
    server = start_cloud(root, insecure=False)
    try:
        auth = {"Authorization": f"Bearer {token}"}
        body = {"records": records("ffffffffff", [summary(site.manifest, order_rows(10, 5),
                                                          **site.hour(0))])}
        assert requests.post(server.url + "/v1/telemetry", json=body, timeout=30
                             ).status_code == 401
        r = requests.post(server.url + "/v1/telemetry", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and r.json()["accepted"] == ["ffffffffff:1"]
        fb = {"records": [{"format": 1, "prediction_id": "ffffffffff:eta:1", "label": 30.0}]}
        r = requests.post(server.url + "/v1/models/eta/feedback", json=fb, headers=auth,
                          timeout=30)
        assert r.status_code == 200 and len(r.json()["accepted"]) == 1
        devices = {d["device"] for d in TelemetryStore(Registry(root)).devices("eta")}
        assert "kitchen-pi" in devices and "ffffffffff" not in devices
        assert requests.get(server.url + "/metrics", timeout=30).status_code == 200
    finally:
        server.stop()
