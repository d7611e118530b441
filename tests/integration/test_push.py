"""Pushing the spool to a real cloud: accepted records leave, refused ones stay quarantined,
a retried upload counts once, a cloud that cannot answer keeps everything, an offline week
arrives whole (or says what it lost), and the CLI and the agent push too.

The cloud is the real Flask app in a thread (:class:`tests.edgekit.ThreadCloud`, device
tokens on) over a private copy of the trained registry, or ``hybridml-cloud serve``
(gunicorn) for the command-line tests. Time in the device's windows and spool is the test's.
"""

from __future__ import annotations

import io
import json
import shutil
import socket
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from hybridml.cloud.config import ServeConfig
from hybridml.cloud.registry import Registry
from hybridml.edge import cli as edge_cli
from hybridml.edge.agent import Agent, AgentSettings
from hybridml.edge.client import CloudClient
from hybridml.edge.push import PushLimits, push
from hybridml.edge.runtime import EdgeRuntime
from hybridml.edge.spool import SPOOL_FILE, Spool
from hybridml.edge.store import LocalStore
from hybridml.edge.telemetry import Telemetry, TelemetrySettings
from tests.conftest import start_cloud
from tests.edgekit import ThreadCloud, install

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
ROWS = [{"restaurant": f"r00{i % 5}", "hour": 8 + i % 14, "distance_km": 1.0 + i % 7,
         "rain": ["yes", "no", ""][i % 3], "items": 1 + i % 6} for i in range(40)]


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def thread_cloud(registry_copy: Path) -> Iterator[ThreadCloud]:
    cloud = ThreadCloud(registry_copy)
    yield cloud
    cloud.close()


def device(cloud: ThreadCloud, root: Path, clock: Clock
           ) -> tuple[EdgeRuntime, Spool, CloudClient]:
    """A device store holding ``late``, a runtime counting on ``clock``, its spool and a
    client with a device token."""
    store = LocalStore(root)
    reg = Registry(cloud.registry)
    install(reg, "late", store)
    reg.close()
    tel = Telemetry("late", TelemetrySettings(window_s=0), clock=clock)
    client = CloudClient(cloud.url, token=cloud.token)
    rt = EdgeRuntime(store, "late", client=client, telemetry=tel)
    return rt, rt.monitor.spool, client


def stored(cloud: ThreadCloud, model: str = "late") -> list[dict[str, Any]]:
    """The summaries the cloud keeps for ``model``."""
    return list(cloud.app.extensions["hybridml"]["telemetry"].summaries(model))


def test_push_uploads_the_window_and_feedback_and_empties_the_spool(
        thread_cloud: ThreadCloud, tmp_path: Path) -> None:
    clock = Clock()
    rt, spool, _ = device(thread_cloud, tmp_path / "dev", clock)
    answers = rt.predict(ROWS)
    for r in ROWS[:5]:
        rt.predict([r])
    rt.feedback(answers[0].prediction_id, "late")
    rt.feedback(None, "on_time", features=ROWS[1])
    clock.now += 3600
    result = rt.push()
    assert result.ok and (result.accepted, result.duplicates, result.quarantined) == (3, 0, 0)
    assert spool.stats()["pending"] == 0 and result.pending == 0
    summaries = stored(thread_cloud)
    assert len(summaries) == 1 and summaries[0]["rows"] == len(ROWS) + 5
    assert summaries[0]["id"].startswith(rt.store_id + ":")
    again = rt.push()  # nothing new: nothing sent
    assert again.ok and again.uploads == 0


def test_a_retried_upload_counts_once(thread_cloud: ThreadCloud, tmp_path: Path) -> None:
    clock = Clock()
    rt, spool, client = device(thread_cloud, tmp_path / "dev", clock)
    rt.predict(ROWS)
    rt.flush()
    db = tmp_path / "dev" / SPOOL_FILE
    spool.close()
    saved = tmp_path / "saved.db"
    shutil.copyfile(db, saved)  # as if the answer to the upload had been lost
    first = push(opened := Spool.open(tmp_path / "dev"), client)
    opened.close()
    shutil.copyfile(saved, db)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    second = push(opened := Spool.open(tmp_path / "dev"), client)
    opened.close()
    assert (first.accepted, second.accepted, second.duplicates) == (1, 0, 1)
    assert Spool.open(tmp_path / "dev").stats()["pending"] == 0
    assert len(stored(thread_cloud)) == 1


def test_a_record_the_cloud_refuses_is_quarantined_and_the_rest_arrive(
        thread_cloud: ThreadCloud, tmp_path: Path) -> None:
    clock = Clock()
    rt, spool, client = device(thread_cloud, tmp_path / "dev", clock)
    rt.predict(ROWS)
    good = rt.flush()
    body = spool.records([spool.queue()[0].seq])[0].to_json()["body"]
    bad = spool.add("summary", dict(body, version=99), model="late", version=99)
    result = push(spool, client)
    assert (result.accepted, result.quarantined) == (1, 1) and result.ok
    stats = spool.stats()
    assert (stats["pending"], stats["quarantined"]) == (0, 1)
    kept = spool.records([int(bad.split(":")[1])])[0]
    assert kept.state == "quarantined" and "version" in (kept.error or "")
    assert push(spool, client).uploads == 0  # never sent again
    assert good and len(stored(thread_cloud)) == 1


def test_a_batch_refused_whole_is_split_until_the_record_at_fault(
        registry_copy: Path, tmp_path: Path) -> None:
    cloud = ThreadCloud(registry_copy, ServeConfig(max_body_bytes=64 * 1024))
    try:
        clock = Clock()
        rt, spool, client = device(cloud, tmp_path / "dev", clock)
        for k in range(10):  # ten 20 KB samples: one 256 KB batch, four times the body cap
            spool.add("sample", {"format": 1, "model": "late", "version": 1,
                                 "rows": [["x" * 1000]] * 20, "k": k}, model="late")
        spool.add("sample", {"format": 1, "model": "late", "version": 1,
                             "rows": [["y" * 1000]] * 80}, model="late")  # 80 KB alone
        rt.predict(ROWS)
        rt.flush()
        result = push(spool, client, limits=PushLimits(max_bytes=256 * 1024))
        assert result.ok, result.error
        assert (result.accepted, result.quarantined) == (11, 1)
        assert result.uploads > 2  # the first batch was split
        stats = spool.stats()
        assert (stats["pending"], stats["quarantined"]) == (0, 1)
    finally:
        cloud.close()


def test_a_cloud_that_cannot_answer_keeps_every_record(thread_cloud: ThreadCloud,
                                                        tmp_path: Path) -> None:
    clock = Clock()
    rt, spool, client = device(thread_cloud, tmp_path / "dev", clock)
    rt.predict(ROWS)
    rt.feedback(None, "late", features=ROWS[0])
    rt.flush()
    with socket.socket() as s:  # a port nothing listens on (closed before use)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = push(spool, CloudClient(f"http://127.0.0.1:{port}"))
    assert not result.ok and result.unavailable and result.pending == 2
    no_token = push(spool, CloudClient(thread_cloud.url))  # 401: not the records' fault
    assert not no_token.ok and not no_token.unavailable
    assert "Bearer" in (no_token.error or "")
    assert spool.stats()["pending"] == 2 and spool.stats()["quarantined"] == 0
    assert push(spool, client).accepted == 2


def test_an_offline_week_arrives_whole_or_says_what_it_lost(
        thread_cloud: ThreadCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    rt, spool, client = device(thread_cloud, tmp_path / "dev", clock)
    hours = 7 * 24
    for h in range(hours):  # a week without the cloud: a window an hour
        rt.predict(ROWS[h % 20: h % 20 + 10])
        clock.now += 3600
        rt.flush()
    assert spool.stats()["pending"] == hours and spool.stats()["dropped"] == {}
    result = push(spool, client)
    assert result.ok and result.accepted == hours and result.uploads == 1
    got = stored(thread_cloud)
    assert len(got) == hours and sum(s["rows"] for s in got) == hours * 10

    # The same week on a device whose spool holds a third of it: the oldest windows go,
    # and the next upload says how many.
    size = len(json.dumps(spool_record_body(rt), separators=(",", ":")).encode())
    monkeypatch.setenv("HYBRIDML_SPOOL_MAX_BYTES", str(size * hours // 3))
    small, small_spool, _ = device(thread_cloud, tmp_path / "small", clock)
    for _ in range(hours):
        small.predict(ROWS[:10])
        clock.now += 3600
        small.flush()
    kept = small_spool.stats()
    lost = kept["dropped"]["summary"]
    assert kept["pending"] + lost == hours and lost >= hours // 2
    oldest_kept = min(json.loads(r.body)["window"]["start"]
                      for r in small_spool.records([e.seq for e in small_spool.queue()]))
    result = push(small_spool, client)
    assert result.ok and result.dropped_reported == {"summary": lost}
    assert small_spool.dropped() == {}
    counters = thread_cloud.app.extensions["hybridml"]["telemetry"].counters()
    assert counters.get(("dropped", "summary")) == lost
    assert oldest_kept > "2027-01-15T09:00:00Z"  # the first windows were the ones dropped


def spool_record_body(rt: EdgeRuntime) -> dict[str, Any]:
    """One summary as the device writes it (for sizing a spool in windows)."""
    assert rt.telemetry is not None and rt.loaded is not None
    return rt.telemetry.summary(rt.loaded)


def test_the_agent_pushes_after_each_sync_and_flushes_when_it_stops(
        thread_cloud: ThreadCloud, tmp_path: Path) -> None:
    clock = Clock()
    rt, spool, client = device(thread_cloud, tmp_path / "dev", clock)
    thread_cloud.trust(tmp_path / "dev")
    rt.predict(ROWS)
    agent = Agent(LocalStore(tmp_path / "dev"), client, "late",
                  AgentSettings(interval=60), spool=spool, flush=rt.flush)
    agent.step()
    assert agent.last_push is not None and agent.last_push.accepted == 1
    assert spool.stats()["pending"] == 0 and len(stored(thread_cloud)) == 1
    rt.predict(ROWS[:3])
    agent.stop()
    assert agent.run(install_signals=False) == 1  # stopped: flushed, not pushed
    assert spool.stats()["pending"] == 1


def edge(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = edge_cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_the_cli_pushes_and_status_shows_the_spool_and_drift(registry_copy: Path,
                                                              tmp_path: Path) -> None:
    server = start_cloud(registry_copy)
    try:
        store = str(server.trust(tmp_path / "dev"))
        code, _, err = edge("sync", "--cloud", server.url, "--name", "late", "--store", store)
        assert code == 0, err
        rows = tmp_path / "rows.jsonl"
        rows.write_text("\n".join(json.dumps(r) for r in ROWS))
        code, out, _ = edge("predict", "--store", store, "--name", "late", "--json",
                            "--input", str(rows))
        answers = [json.loads(x) for x in out.splitlines()]
        assert code == 0 and all(a["prediction_id"].count(":") == 2 for a in answers)
        code, out, _ = edge("status", "--store", store, "--json")
        status = json.loads(out)
        assert status["spool"]["pending"] == 1  # the predict run's window, flushed at exit
        drift = status["models"][0]["drift"]
        assert drift["model"] == "late" and drift["rows"] == len(ROWS)
        code, out, _ = edge("status", "--store", store)
        assert "spool: 1 record(s) to upload" in out and "drift: " in out
        code, out, err = edge("push", "--cloud", server.url, "--store", store, "--json")
        assert code == 0, err
        assert json.loads(out)["accepted"] == 1
        code, out, _ = edge("status", "--store", store, "--json")
        assert json.loads(out)["spool"] | {"oldest": None} == {
            "pending": 0, "quarantined": 0, "bytes": 0, "oldest": None, "dropped": {}}
        server.stop()  # the cloud is gone: push fails, exit 2, the records stay
        code, out, _ = edge("predict", "--store", store, "--name", "late", "--input",
                            str(rows))
        code, _, err = edge("push", "--cloud", server.url, "--store", store)
        assert code == 2 and "kept for the next push" in err
    finally:
        server.stop()
