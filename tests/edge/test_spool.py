"""The spool (``<store>/telemetry.db``): ids, the byte cap, priorities, the TTL, quarantine.

Real SQLite files in the test's directory; the clock is the test's (records are dated by it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from hybridml.edge.identity import DEVICE_FILE, STORE_ID_RE, store_id
from hybridml.edge.spool import SPOOL_FILE, Spool, SpoolError, SpoolSettings
from hybridml.edge.timebase import RunningClock
from hybridml.shared.errors import ConfigError, InputError

T0 = 1_800_000_000.0  # 2027-01-15: inside the window the cloud accepts


class Clock:
    """Seconds the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(n: int, pad: int = 0) -> dict[str, Any]:
    return {"n": n, "pad": "x" * pad}


def open_spool(root: Path, clock: Clock, **limits: Any) -> Spool:
    # The test's clock is the spool's wall clock and its running clock (the TTL's) too.
    return Spool.open(root, SpoolSettings(**limits), clock=clock,
                      running=RunningClock(monotonic=clock, boot=lambda: "boot"))


def test_record_ids_are_the_store_id_and_a_sequence_that_only_grows(tmp_path: Path) -> None:
    clock = Clock()
    spool = open_spool(tmp_path, clock)
    sid = store_id(tmp_path)
    assert STORE_ID_RE.fullmatch(sid) and spool.store_id == sid
    ids = [spool.add("summary", body(i), model="m", version=1) for i in range(3)]
    seqs = [int(i.split(":")[1]) for i in ids]
    assert all(i.startswith(f"{sid}:") for i in ids) and seqs == sorted(seqs)
    spool.remove([e.seq for e in spool.queue()])
    assert int(spool.add("summary", body(9)).split(":")[1]) > seqs[-1]  # never reused
    spool.close()
    # A spool deleted and made again later does not reuse the ids the cloud already holds.
    (tmp_path / SPOOL_FILE).unlink()
    clock.now += 60
    again = open_spool(tmp_path, clock)
    assert int(again.add("summary", body(0)).split(":")[1]) > seqs[-1]
    assert again.store_id == sid  # the store keeps its id


def test_the_store_id_is_made_once_and_a_damaged_one_is_refused(tmp_path: Path) -> None:
    first = store_id(tmp_path / "s")
    assert store_id(tmp_path / "s") == first
    found: list[str] = []
    threads = [threading.Thread(target=lambda: found.append(store_id(tmp_path / "t")))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1  # racing processes agree on one id
    (tmp_path / "s" / DEVICE_FILE).write_text("{not json")
    with pytest.raises(ConfigError) as err:
        store_id(tmp_path / "s")
    assert err.value.details["field"] == "store_id" and "delete it" in err.value.message


def sized(n: int, size: int) -> dict[str, Any]:
    """A body whose JSON text is exactly ``size`` bytes."""
    b = body(n)
    b["pad"] = "x" * (size - len(json.dumps(b, separators=(",", ":"))))
    return b


def test_over_the_cap_the_oldest_of_the_lowest_priority_go_first(tmp_path: Path) -> None:
    clock = Clock()
    spool = open_spool(tmp_path, clock, max_bytes=2000)
    kinds = ["summary", "feedback", "sample", "summary", "feedback", "sample"]
    ids = {}
    for i, kind in enumerate(kinds):
        clock.now += 1
        ids[i] = spool.add(kind, sized(i, 300), model="m")
    assert spool.stats() | {"oldest": None} == {
        "pending": 6, "quarantined": 0, "bytes": 1800, "oldest": None, "dropped": {}}
    spool.add("alert", sized(99, 500))  # 300 bytes over: the oldest sample goes
    left = {e.id for e in spool.queue()}
    assert ids[2] not in left and ids[5] in left
    assert spool.stats()["dropped"] == {"sample": 1}
    spool.add("alert", sized(100, 700))  # 700 over: the other sample, then feedback
    assert {e.id for e in spool.queue()} == {ids[0], ids[3]} | {
        e.id for e in spool.queue() if e.kind == "alert"}
    assert spool.stats()["dropped"] == {"sample": 2, "feedback": 2}
    assert spool.stats()["bytes"] <= 2000
    assert [e.kind for e in spool.queue()] == ["alert", "alert", "summary", "summary"]


def test_alerts_and_health_records_are_never_dropped_even_over_the_cap(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, Clock(), max_bytes=100)
    for i in range(5):
        spool.add("health", body(i, pad=100))
    spool.add("summary", body(9, pad=10))
    assert [e.kind for e in spool.queue()] == ["health"] * 5
    assert spool.stats()["dropped"] == {"summary": 1}


def test_records_older_than_the_ttl_are_dropped_and_counted(tmp_path: Path) -> None:
    clock = Clock()
    spool = open_spool(tmp_path, clock, ttl_s=3600)
    old = spool.add("summary", body(1))
    spool.add("alert", body(2))
    clock.now += 3000
    young = spool.add("feedback", body(3))
    clock.now += 1000  # the summary is 4000 s old, the feedback 1000 s
    assert spool.expire() == {"summary": 1}
    ids = {e.id for e in spool.queue()}
    assert old not in ids and young in ids and len(ids) == 2  # alerts stay
    assert spool.stats()["dropped"] == {"summary": 1}


def test_quarantined_records_are_kept_shown_and_never_queued(tmp_path: Path) -> None:
    clock = Clock()
    spool = open_spool(tmp_path, clock)
    a = spool.add("summary", body(1), model="m", version=1)
    spool.add("summary", body(2), model="m", version=1)
    seq_a = next(e.seq for e in spool.queue() if e.id == a)
    spool.quarantine({seq_a: "bad_input: window.start is not a time"})
    assert a not in {e.id for e in spool.queue()}
    record = spool.records([seq_a])[0]
    assert record.state == "quarantined" and "window.start" in (record.error or "")
    stats = spool.stats()
    assert (stats["pending"], stats["quarantined"]) == (1, 1)
    assert stats["oldest"] == "2027-01-15T08:00:00Z"


def test_quarantined_records_go_first_when_space_runs_out(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, Clock(), max_bytes=1500)
    spool.add("summary", body(1, pad=600))
    bad = spool.queue()[0].seq
    spool.quarantine({bad: "refused"})
    spool.add("sample", body(2, pad=600))
    spool.add("summary", body(3, pad=600))  # over: the quarantined one goes, not the sample
    assert spool.records([bad]) == []
    stats = spool.stats()
    assert stats["quarantined"] == 0 and stats["pending"] == 2
    assert stats["dropped"] == {}  # the cloud refused it already: not reported as lost


def test_reported_drop_counts_are_forgotten_and_later_drops_kept(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, Clock(), max_bytes=300)
    for i in range(4):
        spool.add("sample", body(i, pad=120))
    reported = spool.dropped()
    assert reported == {"sample": 2}
    spool.add("sample", body(9, pad=120))  # one more dropped after the report was read
    spool.forget_dropped(reported)
    assert spool.dropped() == {"sample": 1}


def test_records_round_trip_as_the_upload_format(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, Clock())
    rid = spool.add("feedback", {"format": 1, "model": "m", "label": "é", "created": "x"},
                    model="m")
    record = spool.records([spool.queue()[0].seq])[0]
    assert record.to_json() == {"id": rid, "kind": "feedback", "priority": 2,
                                "created": "2027-01-15T08:00:00Z",
                                "body": {"format": 1, "model": "m", "label": "é",
                                         "created": "x"}}
    with pytest.raises(InputError) as err:
        spool.add("summary", {"x": float("nan")})
    assert err.value.field == "body"
    with pytest.raises(InputError) as err:
        spool.add("diary", {})
    assert err.value.field == "kind"


def test_two_processes_worth_of_writers_share_one_spool(tmp_path: Path) -> None:
    spools = [open_spool(tmp_path, Clock()) for _ in range(2)]

    def write(s: Spool, k: int) -> None:
        for i in range(50):
            s.add("summary", body(k * 100 + i))

    threads = [threading.Thread(target=write, args=(s, k)) for k, s in enumerate(spools)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = spools[0].queue()
    assert len(entries) == 100 and len({e.id for e in entries}) == 100
    with sqlite3.connect(tmp_path / SPOOL_FILE) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        total = db.execute("SELECT SUM(bytes) FROM records").fetchone()[0]
    assert spools[1].stats()["bytes"] == total  # the trigger-kept total is exact


def test_a_spool_that_cannot_be_written_is_a_typed_error(tmp_path: Path) -> None:
    spool = open_spool(tmp_path, Clock())
    spool.add("summary", body(1))
    with sqlite3.connect(tmp_path / SPOOL_FILE) as db:
        db.execute("DROP TABLE records")
    with pytest.raises(SpoolError) as err:
        spool.add("summary", body(2))
    assert err.value.code == "spool" and str(tmp_path) in err.value.message
    json.dumps(err.value.to_json())
