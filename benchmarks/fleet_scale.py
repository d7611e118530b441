"""Issue 13 §5: a fleet of simulated devices against two replicas sharing PostgreSQL and
SeaweedFS, and the same workload against one embedded (SQLite) replica: the baseline.

Every device is a real :class:`~benchmarks.fleet.Device` (a ``LocalStore`` directory, a
telemetry spool and a ``CloudClient`` given both replica URLs, half the fleet in each order as
a load balancer would spread them). A fixed pool of threads drives the devices, either
closed-loop (each thread takes the next device's step as soon as it is free: the rollouts, as
fast as the devices can take a new version) or paced, open-loop, at a stated rate (steady state,
the PostgreSQL restart and the cost phases: the latency then is service time, not queueing).
Everything shares the machine's cores, the load generator too: its CPU is measured (the GIL caps
the client side), and so is the machine's, so the report says how much of it each part took.

A **tick** of a device is what it does each sync interval: one conditional sync (a 304 in
steady state; a download when a new version is out), ``records`` telemetry records spooled and
pushed, and one fallback prediction. Phases (:data:`FLEET_PHASES`):

* ``provision``: every device's first sync (the model and its table, from the bucket);
* ``cost_sync``, ``cost_push``, ``cost_predict``: one request of one kind per device, paced
  below saturation, so the replicas' and the database's CPU per request of each kind is
  measured (the capacity model of docs/scaling.md is built from these);
* ``steady``: paced ticks; ``rollout_v2``: v2 promoted through the CLI, then one tick each
  (the first ``solo`` devices one at a time: download latency without queueing);
* ``pg_restart``: ticks, with PostgreSQL restarted part-way (fault b);
* ``rollout_v3_slow``: v3 promoted while every object-store answer waits ``slow_ms`` (fault c);
* ``rollout_v4_kill``: v4 promoted, replica A SIGKILLed part-way (fault a), then restarted;
* ``drain``: every device pushes until its spool is empty; then each record id the devices made
  is looked up in the database (lost: not there; doubled: counted twice); then
  :func:`ingest_ceiling`: how many telemetry write transactions a second the store takes.

The baseline runs ``provision``, the cost phases, ``steady``, ``rollout_v2`` and ``drain``.
Results: ``fleet_scale.json``, ``fleet_scale.png`` and :func:`section` (REPORT.md).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import RESULTS, ROOT, Stats, child_env, environment, log, ratio, save
from .fleet import Device, Fleet, Recorder, Sampler, tree_cpu_seconds
from .servers import BIN, DelayProxy, Server, cloud
from .workspace import Model, provision

MODEL = "orders_hgb"  # 194 KB of ONNX and a 44 KB table: a rollout moves real bytes
KINDS = ("sync", "sync_dl", "sync_solo", "push", "predict")
P99_BOUND_MS = {"sync": 250.0, "sync_dl": 3000.0, "sync_solo": 1000.0, "push": 500.0,
                "predict": 250.0}
FAULT_GRACE_S = 3.0  # errors this long after a fault ends still belong to it
BUCKET = "hybridml-fleet"
PASSPHRASE = "bench-fleet-passphrase"  # a loopback benchmark's key passphrase, not a secret
FLEET_PHASES = ("provision", "cost_sync", "cost_push", "cost_predict", "steady", "rollout_v2",
                "pg_restart", "rollout_v3_slow", "rollout_v4_kill", "drain")
BASELINE_PHASES = ("provision", "cost_sync", "cost_push", "cost_predict", "steady",
                   "rollout_v2", "drain")


@dataclass(frozen=True)
class Profile:
    """How many devices, how many driver threads, how many ticks per phase."""

    devices: int
    threads: int
    rate: float  # ticks/s offered to the fleet in the paced phases (steady, pg_restart)
    cost_rate: float = 200.0  # requests/s of one kind in the cost phases (below saturation)
    solo: int = 20  # devices that sync alone, one after the other, first in each rollout
    ceiling_s: float = 2.0  # seconds per setting of the write-ceiling probe (0: one setting)
    steady_ticks: int = 1
    pg_ticks: int = 1
    records: int = 3  # telemetry records spooled per tick
    slow_ms: int = 100
    kill_at: float = 0.4  # share of the rollout done when replica A is killed
    pg_at: float = 0.3  # share of the pg_restart phase done when PostgreSQL restarts

    @classmethod
    def for_mode(cls, mode: str) -> Profile:
        """``full`` (1,000 devices), ``quick`` (100) or ``tiny`` (12, the smoke test)."""
        if mode == "full":
            return cls(1000, 24, rate=50.0, cost_rate=200.0)
        if mode == "quick":
            return cls(100, 16, rate=20.0, cost_rate=100.0)
        return cls(12, 6, rate=12.0, cost_rate=40.0, records=2, solo=3, ceiling_s=0.0)


# ------------------------------------------------------------------------------ phases
@dataclass
class Phase:
    """One phase's window and the readings at its ends."""

    name: str
    t0: float
    t1: float = 0.0
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------ the setup
def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> dict[str, Any]:
    """Run ``hybridml-cloud ARGS --json`` and return its JSON answer."""
    proc = subprocess.run([str(BIN / "hybridml-cloud"), *args, "--json"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"hybridml-cloud {' '.join(args[:2])} failed "
                           f"({proc.returncode}): {proc.stderr[-2000:]}")
    out = proc.stdout.strip()
    return dict(json.loads(out[out.index("{"):])) if "{" in out else {}


def _train_args(model: Model, seed: int) -> list[str]:
    """``train`` flags for another version of the benchmark's model (same data and family)."""
    csv = model.registry.parent / "data" / "orders.csv"
    params = [f"--param={k}={json.dumps(list(v) if isinstance(v, tuple) else v)}"
              for k, v in model.spec.params]
    return ["train", "--data", str(csv), "--target", "late", "--drop", "delivery_minutes",
            "--name", model.name, "--model", model.spec.family, "--seed", str(seed), "--quiet",
            *params]


def _devices(root: Path, template: Path, urls: Callable[[int], list[str]], n: int,
             name: str) -> list[Device]:
    """``n`` devices, each a copy of the provisioned ``template`` store."""
    out = []
    for i in range(n):
        d = root / f"dev{i:04d}"
        shutil.copytree(template, d)
        out.append(Device(d, urls(i), name, i, spool=True))
    return out


@contextlib.contextmanager
def _replica(registry: Path, flags: Sequence[str], env: dict[str, str], port: int = 0,
             tries: int = 20) -> Iterator[Server]:
    """A ``serve`` process; on a fixed ``port`` it retries while the port is still held."""
    server = cloud(registry, extra=flags, env=env, port=port, verbose=False)
    for i in range(tries):
        try:
            server.start()
            break
        except RuntimeError:
            if not port or i == tries - 1:
                raise
            time.sleep(0.25)
    try:
        yield server
    finally:
        server.stop()


# ------------------------------------------------------------------------------ running
class Run:
    """One run (fleet or baseline): phases, their readings, and the summary."""

    def __init__(self, label: str, fleet: Fleet, rec: Recorder, sampler: Sampler,
                 pg_stats: Callable[[], dict[str, float]] | None = None) -> None:
        self.label, self.fleet, self.rec, self.sampler = label, fleet, rec, sampler
        self.pg_stats = pg_stats

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[Phase]:
        """Mark a phase: its window and the readings at both ends."""
        log(f"fleet_scale[{self.label}]: {name}")
        p = Phase(name, self.rec.now(), before=self._reading())
        self.rec.phase = name
        self.rec.phases.append(p)
        try:
            yield p
        finally:
            p.t1 = self.rec.now()
            p.after = self._reading()
            self.rec.phase = ""

    def _reading(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cpu": self.sampler.cpu_now()}
        if self.pg_stats is not None:
            with contextlib.suppress(Exception):
                out["pg"] = self.pg_stats()
        return out

    def fault(self, name: str, fn: Callable[[], dict[str, Any]]) -> Callable[[], None]:
        """``fn`` as a fault: its window and what it returned go in the run's faults."""
        def run() -> None:
            t0 = self.rec.now()
            log(f"fleet_scale[{self.label}]: fault {name} at {t0:.1f} s")
            try:
                info = fn()
            except Exception as exc:
                info = {"failed": f"{type(exc).__name__}: {exc}"}
            self.rec.faults.append({"name": name, "phase": self.rec.phase, "t0": round(t0, 3),
                                    "t1": round(self.rec.now(), 3), **info})
        return run


def _prepare(model: Model, work: Path) -> tuple[Path, Path]:
    """A copy of the workspace registry (the source of both runs) and a provisioned store
    template the devices are copied from."""
    src = work / "source-registry"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(model.registry, src)
    template = work / "template-store"
    shutil.rmtree(template, ignore_errors=True)
    provision(template, src)
    (template / "device.json").unlink(missing_ok=True)  # each copy makes its own store id
    return src, template


def run_baseline(model: Model, work: Path, prof: Profile, src: Path, template: Path
                 ) -> dict[str, Any]:
    """The workload against one embedded (SQLite) replica."""
    reg = work / "baseline-registry"
    shutil.rmtree(reg, ignore_errors=True)
    shutil.copytree(src, reg)
    env = child_env()
    t0 = time.perf_counter()
    v2 = _cli(*_train_args(model, 1), "--registry", str(reg), env=env)["version"]
    train_s = time.perf_counter() - t0
    rec = Recorder()
    with _replica(reg, [], env) as server:
        sampler = Sampler(rec, {"replica_a": server.cpu_seconds}, None).start()
        devices = _devices(work / "baseline-devices", template, lambda i: [server.url],
                           prof.devices, model.name)
        fleet = Fleet(rec, devices, prof.threads, model.miss_row, prof.records)
        run = Run("baseline", fleet, rec, sampler)
        try:
            _common_phases(run, prof, lambda: _cli("promote", model.name, str(v2),
                                                   "--registry", str(reg), env=env))
            with run.phase("drain") as p:
                p.notes["left_pending"] = fleet.drain()
        finally:
            sampler.stop()
            for d in devices:
                d.close()
        doc = _summary(run, prof, replicas=1)
    doc["integrity"] = _integrity_sqlite(reg / "telemetry.db", devices, fleet)
    log("fleet_scale[baseline]: the telemetry write ceiling")
    shutil.rmtree(work / "ceiling-sqlite", ignore_errors=True)
    doc["ingest_ceiling"] = _ceiling(prof, None, work / "ceiling-sqlite")
    doc["setup"] = {"train_v2_s": round(train_s, 2), "storage": "sqlite + <registry>/blobs",
                    "replicas": 1, "artifact_urls": "off"}
    shutil.rmtree(work / "baseline-devices", ignore_errors=True)
    return doc


def _common_phases(run: Run, prof: Profile, promote_v2: Callable[[], Any]) -> None:
    f = run.fleet
    with run.phase("provision"):
        f.drive(f.sync)
    for kind, step in (("sync", f.sync), ("push", f.push), ("predict", f.predict)):
        with run.phase(f"cost_{kind}") as p:
            p.notes.update(f.drive(step, rate=prof.cost_rate))
    with run.phase("steady") as p:
        p.notes.update(f.drive(f.tick, prof.steady_ticks, rate=prof.rate))
    promote_s = _timed(promote_v2)
    with run.phase("rollout_v2") as p:
        p.notes["promote_cli_s"] = promote_s
        f.rollout(prof.solo)


def _timed(fn: Callable[[], Any]) -> float:
    """Seconds ``fn`` took (a CLI command, outside the phase it prepares)."""
    t0 = time.perf_counter()
    fn()
    return round(time.perf_counter() - t0, 2)


def run_fleet(model: Model, work: Path, prof: Profile, src: Path, template: Path
              ) -> dict[str, Any]:
    """The workload against two replicas on PostgreSQL + SeaweedFS, with the faults."""
    sys.path.insert(0, str(ROOT))  # tests.servers: the real servers the storage tests use
    from tests import servers  # type: ignore[attr-defined]

    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        weed_dir = work / "seaweedfs"
        shutil.rmtree(weed_dir, ignore_errors=True)
        pg = stack.enter_context(servers.postgres())
        s3 = stack.enter_context(servers.seaweedfs(weed_dir))
        s3.make_bucket(BUCKET)
        start_s = time.perf_counter() - t0
        db_url = str(pg.new_database("fleet"))
        s3_port = int(str(s3.endpoint).rsplit(":", 1)[1].split("/")[0])
        proxy = stack.enter_context(DelayProxy(s3_port))
        # The test server's own key pair (SeaweedFS checks SigV4, as AWS does).
        env = child_env(HYBRIDML_KEY_PASSPHRASE=PASSPHRASE, AWS_REGION="us-east-1",
                        **servers.CREDENTIALS)
        flags = ["--db", db_url, "--artifacts", f"s3://{BUCKET}/models", "--s3-endpoint",
                 proxy.url, "--artifact-urls", "presign"]
        cli_root = work / "fleet-cli"
        shutil.rmtree(cli_root, ignore_errors=True)
        t1 = time.perf_counter()
        migrated = _cli("migrate", "--from", str(src), "--registry", str(cli_root), *flags,
                        env=env)
        migrate_s = time.perf_counter() - t1
        versions = {}
        t1 = time.perf_counter()
        for seed in (1, 2, 3):
            got = _cli(*_train_args(model, seed), "--registry", str(cli_root), *flags, env=env)
            versions[seed] = int(got["version"])
        train_s = time.perf_counter() - t1

        def promote(version: int) -> Callable[[], Any]:
            return lambda: _cli("promote", model.name, str(version), "--registry",
                                str(cli_root), *flags, env=env)

        roots = [work / "replica-a", work / "replica-b"]
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)
        workaround = _signs(roots, flags, env, src, model.name)
        a = stack.enter_context(_replica(roots[0], flags, env))
        b = stack.enter_context(_replica(roots[1], flags, env))
        replicas = {"a": a}
        urls = [a.url, b.url]
        rec = Recorder()
        cpu: dict[str, Callable[[], float]] = {
            "replica_a": lambda: replicas["a"].cpu_seconds(), "replica_b": b.cpu_seconds,
            "postgres": _postgres_cpu(db_url), "seaweedfs": _pid_cpu(s3),
            "s3_proxy": proxy.cpu_seconds}
        sampler = Sampler(rec, cpu, db_url).start()
        stack.callback(sampler.stop)
        devices = _devices(work / "fleet-devices", template,
                           lambda i: urls if i % 2 == 0 else urls[::-1], prof.devices,
                           model.name)
        stack.callback(_close_all, devices)
        fleet = Fleet(rec, devices, prof.threads, model.miss_row, prof.records)
        run = Run("fleet", fleet, rec, sampler, lambda: _pg_stats(db_url))
        accepted0 = _pg_counter(db_url)
        _common_phases(run, prof, promote(versions[1]))

        def restart_pg() -> dict[str, Any]:
            t = time.perf_counter()
            pg.restart()
            return {"restart_s": round(time.perf_counter() - t, 2)}

        with run.phase("pg_restart") as p:
            p.notes.update(fleet.drive(fleet.tick, prof.pg_ticks, rate=prof.rate,
                                       at=(prof.pg_at, run.fault("pg_restart", restart_pg))))

        promote_s = _timed(promote(versions[2]))
        with run.phase("rollout_v3_slow") as p:
            p.notes["promote_cli_s"] = promote_s
            proxy.delay_s = prof.slow_ms / 1000.0
            before = proxy.totals()
            t_slow = rec.now()
            fleet.rollout(prof.solo)
            proxy.delay_s = 0.0
            after = proxy.totals()
            rec.faults.append({"name": "slow_object_store", "phase": p.name,
                               "t0": round(t_slow, 3), "t1": round(rec.now(), 3),
                               "delay_ms": prof.slow_ms,
                               "delayed_responses": after["delayed_responses"]
                               - before["delayed_responses"]})

        at_kill: dict[str, Any] = {}

        def kill_a() -> dict[str, Any]:
            at_kill["on_a"] = [d for d in devices if d.client.base_url == a.url]
            sampler.around(a.kill)  # no CPU reading of A half-way through its death
            at_kill["t"] = rec.now()  # A is gone: every later request must go to B
            return {"devices_on_killed_replica": len(at_kill["on_a"])}

        promote_s = _timed(promote(versions[3]))
        with run.phase("rollout_v4_kill") as p:
            p.notes["promote_cli_s"] = promote_s
            fleet.rollout(prof.solo, at=(prof.kill_at, run.fault("replica_kill", kill_a)))
            # Devices that were on A and asked the cloud again after the kill: all on B now?
            asked = [d for d in at_kill.get("on_a", [])
                     if fleet.started.get(id(d), 0.0) > at_kill["t"]]
            p.notes["devices_on_a_asking_after_kill"] = len(asked)
            p.notes["devices_failed_over"] = sum(1 for d in asked
                                                 if d.client.base_url == b.url)
        t = time.perf_counter()  # A back on its port (outside the phase: startup CPU)
        again = stack.enter_context(_replica(roots[0], flags, env, port=a.port))
        replicas["a"] = again
        p.notes["replica_a_restart_s"] = round(time.perf_counter() - t, 2)
        p.notes["replica_a_serves_again"] = _probe(again.url, model.name)
        with run.phase("drain") as p:
            p.notes["left_pending"] = fleet.drain()
        sampler.stop()
        doc = _summary(run, prof, replicas=2)
        doc["integrity"] = _integrity_pg(db_url, devices, fleet, accepted0)
        doc["storage_per_record"] = _pg_sizes(db_url)
        log("fleet_scale[fleet]: the telemetry write ceiling")
        doc["ingest_ceiling"] = _ceiling(prof, db_url, work / "ceiling-pg")
        doc["setup"] = {"servers_start_s": round(start_s, 2), "migrate_s": round(migrate_s, 2),
                        "migrated": {k: migrated.get(k) for k in ("blobs", "blob_bytes", "keys")},
                        "train_3_versions_s": round(train_s, 2), "versions": versions,
                        "storage": "postgresql (pgserver wheel) + s3 (SeaweedFS weed)",
                        "replicas": 2, "artifact_urls": "presign",
                        "signing_key_files_workaround": workaround,
                        "s3_proxy_bytes": proxy.totals()}
    shutil.rmtree(work / "fleet-devices", ignore_errors=True)
    return doc


def _signs(roots: list[Path], flags: list[str], env: dict[str, str], src: Path, name: str
           ) -> bool:
    """Check that a replica signs manifests with the key ``migrate`` moved into the
    database. If it does not, give every replica root a copy of the source registry's key
    files (so devices that trust the key can sync, as in the baseline) and return True: the
    run then says it needed this workaround. (Found by this benchmark: ``create_app`` builds
    its ``Signer`` from ``reg.root``, which reads ``<root>/keys``, not the database.)"""
    with _replica(roots[0], flags, env) as probe:
        import requests

        signed = "signature" in requests.get(f"{probe.url}/v1/models/{name}/manifest",
                                             timeout=10).json()
    if signed:
        return False
    log("fleet_scale: a replica on PostgreSQL served an UNSIGNED manifest; copying the key "
        "files into the replica roots (see the report)")
    for root in roots:
        shutil.copytree(src / "keys", root / "keys", dirs_exist_ok=True)
    return True


def ingest_ceiling(db: str | None, root: Path, *, seconds: float = 2.0,
                   procs: Sequence[int] = (1, 4), batches: Sequence[int] = (3, 100)
                   ) -> list[dict[str, Any]]:
    """Telemetry uploads per second that one store takes, whoever sends them: ``procs``
    processes (no GIL in common) each storing ``batch`` new records per transaction, through
    the cloud's own :class:`~hybridml.cloud.telemetry.SqlTelemetry`, on PostgreSQL (``db``) or
    SQLite under ``root``. Every write transaction holds the store's lock
    (docs/storage.md §2), so more writers wait rather than add throughput."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    out = []
    for batch in batches:
        for n in procs:
            q = ctx.Queue()
            go = ctx.Barrier(n + 1)
            ps = [ctx.Process(target=_ceiling_worker, daemon=True,
                              args=(db, str(root), batch, seconds, f"c{batch}x{n}p{i}", go, q))
                  for i in range(n)]
            for proc in ps:
                proc.start()
            go.wait(timeout=60)
            got = [q.get(timeout=60 + seconds) for _ in ps]
            for proc in ps:
                proc.join(timeout=10)
            lat = np.concatenate([np.asarray(g["lat_ms"]) for g in got])
            tx = sum(g["tx"] for g in got)
            out.append({"processes": n, "records_per_tx": batch,
                        "tx_per_s": round(tx / seconds, 1),
                        "records_per_s": round(tx * batch / seconds, 1),
                        "tx_ms": Stats.of(lat).to_json()})
    return out


def _ceiling(prof: Profile, db: str | None, root: Path) -> list[dict[str, Any]]:
    if prof.ceiling_s:
        return ingest_ceiling(db, root, seconds=prof.ceiling_s)
    return ingest_ceiling(db, root, seconds=0.3, procs=(2,), batches=(3,))  # the smoke test


def _ceiling_worker(db: str | None, root: str, batch: int, seconds: float, tag: str, go: Any,
                    q: Any) -> None:
    from hybridml.cloud.ingest import Event
    from hybridml.cloud.registry import Registry
    from hybridml.cloud.storage import Storage
    from hybridml.cloud.telemetry import SqlTelemetry

    tel = SqlTelemetry.open(Registry(root, storage=Storage(db=db)))
    body = json.dumps({"event": "heartbeat", "model": MODEL, "tick": 1, "part": 0})
    lat: list[float] = []
    i = 0
    go.wait(timeout=60)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        items = [(tag, Event(f"{tag}:{i + k}", "health", MODEL, None, None, body))
                 for k in range(batch)]
        t0 = time.perf_counter()
        tel.store(items, [], {}, time.time())
        lat.append((time.perf_counter() - t0) * 1000)
        i += batch
    q.put({"tx": len(lat), "lat_ms": lat})


def _push_bytes(root: Path, n: int) -> int:
    """The body of one push of a tick's records, as the device sends it."""
    from hybridml.edge.spool import Spool

    shutil.rmtree(root, ignore_errors=True)
    spool = Spool.open(root)
    try:
        ids = spool.add_many([("health", {"event": "heartbeat", "model": MODEL, "tick": 1,
                                          "part": k}, None, None) for k in range(n)])
        records = spool.records([e.seq for e in spool.queue() if e.id in ids])
        body = json.dumps({"records": [r.to_json() for r in records]}, separators=(",", ":"))
    finally:
        spool.close()
    return len(body.encode())


def _close_all(devices: list[Device]) -> None:
    for d in devices:
        d.close()


def _probe(url: str, name: str) -> bool:
    from hybridml.edge.client import CloudClient

    c = CloudClient(url)
    try:
        return c.manifest(name).body is not None
    except Exception:
        return False
    finally:
        c.close()


def _postgres_cpu(url: str) -> Callable[[], float]:
    """CPU of the PostgreSQL server: its postmaster (found again after a restart) and its
    backends."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        data = Path(str(c.execute("SHOW data_directory").fetchone()[0]))  # type: ignore[index]

    def read() -> float:
        try:
            pid = int((data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        return tree_cpu_seconds(pid)
    return read


def _pid_cpu(server: Any) -> Callable[[], float]:
    """CPU of a server started as ``server.proc`` and its children."""
    pid = server.proc.pid
    return lambda: tree_cpu_seconds(pid)


def _pg_stats(url: str) -> dict[str, float]:
    """Exact counters of the database (pg_stat_database lags by up to 10 s): the next
    transaction id (so its delta counts write transactions: only they take an id), WAL bytes
    written, and the telemetry rows (ledger and events)."""
    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=2) as c:
        row = c.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint, "
                        "pg_current_wal_lsn() - '0/0'::pg_lsn, "
                        "(SELECT count(*) FROM records), (SELECT count(*) FROM events)"
                        ).fetchone()
    assert row is not None
    return {"write_tx": float(row[0]), "wal_bytes": float(row[1]),
            "telemetry_rows": float(row[2]) + float(row[3])}


def _pg_counter(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT coalesce(sum(value), 0) FROM counters WHERE name = "
                        "'records_accepted'").fetchone()
    return int(row[0]) if row else 0


def _pg_sizes(url: str) -> dict[str, Any]:
    """Bytes on disk per stored telemetry record (the ledger row and the event row)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE records")
        c.execute("VACUUM ANALYZE events")
        rows = {t: int(c.execute(f"SELECT count(*) FROM {t}").fetchone()[0])  # type: ignore
                for t in ("records", "events")}
        size = {t: int(c.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0])  # type: ignore
                for t in ("records", "events")}
    n = max(1, rows["records"])
    return {"rows": rows, "bytes": size,
            "bytes_per_record": round((size["records"] + size["events"]) / n, 1)}


def _check(sent: set[str], stored: list[str], counted: int, fleet: Fleet) -> dict[str, Any]:
    got = set(stored)
    return {"records_sent": len(sent), "records_stored": len(got & sent),
            "lost": len(sent - got), "unexpected": len(got - sent),
            "stored_twice": len(stored) - len(got),
            "counter_accepted": counted, "counted_twice": counted - len(got & sent),
            "accepted_answers": fleet.accepted, "duplicate_answers": fleet.duplicates,
            "accepted_twice": fleet.accepted - len(got & sent)}


def _integrity_pg(url: str, devices: list[Device], fleet: Fleet, counter0: int
                  ) -> dict[str, Any]:
    import psycopg

    sent = {i for d in devices for i in d.sent}
    with psycopg.connect(url, autocommit=True) as c:
        stored = [str(r[0]) for r in c.execute("SELECT e.id FROM events e JOIN records r "
                                               "ON r.device = e.device AND r.id = e.id "
                                               "WHERE e.kind = 'health'")]
    return _check(sent, stored, _pg_counter(url) - counter0, fleet)


def _integrity_sqlite(path: Path, devices: list[Device], fleet: Fleet) -> dict[str, Any]:
    sent = {i for d in devices for i in d.sent}
    db = sqlite3.connect(path)
    try:
        stored = [str(r[0]) for r in db.execute("SELECT e.id FROM events e JOIN records r ON "
                                                "r.device = e.device AND r.id = e.id "
                                                "WHERE e.kind = 'health'")]
        counted = int(db.execute("SELECT coalesce(sum(value), 0) FROM counters WHERE name = "
                                 "'records_accepted'").fetchone()[0])
    finally:
        db.close()
    return _check(sent, stored, counted, fleet)


# ------------------------------------------------------------------------------ summaries
def _in_fault(t: float, faults: list[dict[str, Any]]) -> str | None:
    for f in faults:
        if f["t0"] <= t <= f["t1"] + FAULT_GRACE_S:
            return str(f["name"])
    return None


def _summary(run: Run, prof: Profile, replicas: int) -> dict[str, Any]:
    rec = run.rec
    ops = rec.ops
    phases = []
    for p in rec.phases:
        mine = [o for o in ops if o[1] == p.name]
        wall = max(p.t1 - p.t0, 1e-9)
        kinds: dict[str, Any] = {}
        for k in KINDS:
            ok = np.asarray([o[3] for o in mine if o[2] == k and o[4] is None])
            err = [o for o in mine if o[2] == k and o[4] is not None]
            if not ok.size and not err:
                continue
            st = Stats.of(ok).to_json()
            kinds[k] = {"ok": int(ok.size), "errors": len(err),
                        "per_s": round(ok.size / wall, 1), "latency_ms": st,
                        "p99_bound_ms": P99_BOUND_MS[k],
                        "p99_held": bool(ok.size and st["p99"] <= P99_BOUND_MS[k])}
        errors: dict[str, dict[str, int]] = {}
        for o in mine:
            if o[4] is not None:
                where = _in_fault(o[0], rec.faults) or "outside_faults"
                errors.setdefault(where, {})
                key = f"{o[2]}:{o[4]}"
                errors[where][key] = errors[where].get(key, 0) + 1
        c0, c1 = p.before["cpu"], p.after["cpu"]
        cpu = {k: round(c1[k] - c0.get(k, 0.0), 2) for k in c1
               if k not in ("machine_busy", "machine_total")}
        busy = (c1["machine_busy"] - c0["machine_busy"]) / max(
            1.0, c1["machine_total"] - c0["machine_total"])
        requests = len(mine)
        replica_cpu = sum(v for k, v in cpu.items() if k.startswith("replica"))
        doc: dict[str, Any] = {
            "name": p.name, "t0": round(p.t0, 2), "t1": round(p.t1, 2),
            "wall_s": round(wall, 2), "requests": requests, "kinds": kinds,
            "requests_per_s": round(requests / wall, 1), "errors": errors,
            "bytes": rec.bytes.get(p.name, {}), "cpu_s": cpu,
            "machine_busy_pct": round(100 * busy, 1),
            "client_cores": round(cpu.get("client", 0.0) / wall, 2),
            "replica_cpu_ms_per_request": round(1000 * replica_cpu / requests, 3)
            if requests else None,
            "notes": p.notes}
        if "pg" in p.before and "pg" in p.after:
            d = {k: p.after["pg"][k] - p.before["pg"][k] for k in p.after["pg"]}
            doc["db"] = {k: int(v) for k, v in d.items()}
            if requests:
                doc["db_per_request"] = {k: round(v / requests, 2) for k, v in d.items()}
            if "postgres" in cpu and requests:
                doc["postgres_cpu_ms_per_request"] = round(1000 * cpu["postgres"] / requests, 3)
        conns = [n for t, n, _ in run.sampler.connections if p.t0 <= t <= p.t1]
        if conns:
            doc["pg_connections"] = {"max": max(conns), "mean": round(float(np.mean(conns)), 1),
                                     "samples": len(conns)}
        phases.append(doc)
    outside = sum(n for p in phases for n in p["errors"].get("outside_faults", {}).values())
    return {"devices": prof.devices, "threads": prof.threads, "replicas": replicas,
            "phases": phases, "faults": rec.faults, "errors_outside_faults": outside,
            "timeline": _timeline(ops), "pg_connections_by_app": _by_app(run.sampler),
            "error_examples": rec.examples}


def _by_app(sampler: Sampler) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, _, apps in sampler.connections:
        for k, v in apps.items():
            out[k] = max(out.get(k, 0), v)
    return out


def _timeline(ops: list[tuple[float, str, str, float, str | None]], bin_s: float = 1.0
              ) -> dict[str, list[float]]:
    """Requests per second in ``bin_s`` bins: ok ones by kind, and errors."""
    if not ops:
        return {}
    n = int(max(o[0] for o in ops) / bin_s) + 1
    out: dict[str, list[float]] = {k: [0.0] * n for k in (*KINDS, "errors")}
    p99: dict[str, list[list[float]]] = {k: [[] for _ in range(n)] for k in KINDS}
    for t, _, kind, ms, err in ops:
        i = int(t / bin_s)
        if err is None:
            out[kind][i] += 1 / bin_s
            p99[kind][i].append(ms)
        else:
            out["errors"][i] += 1 / bin_s
    out["t"] = [round(i * bin_s, 1) for i in range(n)]
    for k in KINDS:
        out[f"{k}_p99_ms"] = [round(float(np.percentile(v, 99)), 1) if v else 0.0
                              for v in p99[k]]
    return out


def _ratios(fleet: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Fleet / baseline for each common phase: throughput by kind and p99."""
    out: dict[str, Any] = {}
    bp = {p["name"]: p for p in base["phases"]}
    for p in fleet["phases"]:
        b = bp.get(p["name"])
        if b is None:
            continue
        r: dict[str, Any] = {"requests_per_s": ratio(p["requests_per_s"], b["requests_per_s"])}
        for k, v in p["kinds"].items():
            if k in b["kinds"]:
                r[k] = {"per_s": ratio(v["per_s"], b["kinds"][k]["per_s"]),
                        "p99": ratio(v["latency_ms"]["p99"], b["kinds"][k]["latency_ms"]["p99"])}
        out[p["name"]] = r
    return out


def run(model: Model, work: Path, mode: str, results: Path = RESULTS) -> dict[str, Any]:
    """Both runs; writes ``fleet_scale.json`` and ``fleet_scale.png`` into ``results``."""
    prof = Profile.for_mode(mode)
    work = work / "fleet-scale"
    work.mkdir(parents=True, exist_ok=True)
    src, template = _prepare(model, work)
    row_bytes = len(json.dumps({"inputs": [model.miss_row]}))
    push_bytes = _push_bytes(work / "push-size", prof.records)
    base = run_baseline(model, work, prof, src, template)
    fleet = run_fleet(model, work, prof, src, template)
    doc = {"suite": "fleet_scale", "mode": mode, "environment": environment(),
           "model": model.name, "profile": asdict(prof),
           "p99_bounds_ms": P99_BOUND_MS, "predict_request_bytes": row_bytes,
           "push_request_bytes": push_bytes,
           "fleet": fleet, "baseline": base, "ratios": _ratios(fleet, base)}
    save("fleet_scale", doc, results)
    from .fleet_scale_report import plot

    plot(doc, results / "fleet_scale.png")
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.fleet_scale [--quick|--tiny]``: this suite alone, then its
    REPORT.md section updated in place."""
    import argparse
    import logging

    from .common import DEFAULT_WORKDIR
    from .workspace import Workspace, model_specs

    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet_scale")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    logging.getLogger("hybridml").setLevel(logging.CRITICAL)
    # Only the model this suite uses: a workspace of one trains in seconds.
    specs = [s for s in model_specs(mode) if s.name == MODEL]
    ws = Workspace(args.workdir, specs, orders_rows=1500 if mode == "tiny" else 4000)
    t0 = time.perf_counter()
    run(ws.models()[0], ws.root / "scratch", mode, args.results)
    from .fleet_scale_report import update_report

    update_report(args.results)
    log(f"fleet_scale: done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
