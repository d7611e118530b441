"""``REPORT.md`` and PNG plots from ``benchmarks/results/*.json``.

Every number in the report is read from the JSON files of the same run; the targets table at
the top lists each target as met or missed with the measured ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hybridml.shared.text import format_table

from .common import RESULTS

Doc = dict[str, Any]


def _load(results: Path) -> dict[str, Doc]:
    docs = {}
    for p in sorted(results.glob("*.json")):
        try:
            docs[p.stem] = json.loads(p.read_text())
        except ValueError:
            continue
    return docs


def _f(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    return format_table(header, [[_f(c) for c in r] for r in rows], markdown=True)


def _mark(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**missed**")


# ----------------------------------------------------------------------------- targets
def targets(d: dict[str, Doc]) -> list[list[Any]]:
    """Rows of (item, target, measured, verdict)."""
    rows: list[list[Any]] = []
    lat = d.get("latency")
    if lat:
        singles = lat["single_row"]
        miss = [(s["model"], s["ratios"]["miss_vs_ort"]) for s in singles]
        hit_us = [(s["model"], s["stats_us"]["edge_hit"]["median"]) for s in singles]
        hit = [(s["model"], s["ratios"]["hit_vs_ort"]) for s in singles]
        sk = [(s["model"], s["ratios"]["sklearn_vs_edge_miss"]) for s in singles]
        for label, target, vals, ok in (
                ("1 edge miss vs raw ort", "≤ 1.3×", miss, lambda v: v <= 1.3),
                ("1 precomputed hit, median", "≤ 2 µs", hit_us, lambda v: v <= 2.0),
                ("1 precomputed hit vs raw ort", "≤ 0.3×", hit, lambda v: v <= 0.3),
                ("1 edge (miss) faster than sklearn", "≥ 20×", sk, lambda v: v >= 20)):
            good = [m for m, v in vals if ok(v)]
            worst = max(vals, key=lambda x: x[1]) if "≥" not in target else \
                min(vals, key=lambda x: x[1])
            rows.append([label, target, f"{len(good)}/{len(vals)} models; worst "
                         f"{worst[0]} {_f(worst[1])}", _mark(len(good) == len(vals))])
        b = [(x["model"], x["ratios"]["edge_arrays_vs_ort"]) for x in lat["batch"]]
        good = [m for m, v in b if v >= 0.9]
        worst = min(b, key=lambda x: x[1])
        rows.append(["2 batch 1,000 rows/s, edge vs raw ort", "≥ 0.9×",
                     f"{len(good)}/{len(b)} models; worst {worst[0]} {_f(worst[1])}",
                     _mark(len(good) == len(b))])
    mem = d.get("memory")
    if mem:
        r = [(m["model"], m["ratio_edge_vs_sklearn"]) for m in mem["models"]]
        worst = max(r, key=lambda x: x[1])
        rows.append(["3 peak RSS edge vs joblib+sklearn", "≤ 0.5×",
                     f"worst {worst[0]} {_f(worst[1])}", _mark(all(v <= 0.5 for _, v in r))])
        t = mem.get("table")
        if t:
            rows.append([f"3 RSS added by a {t['rows']:,}-row table vs its file size", "≤ 0.3×",
                         f"{_f(t['added_mb'])} MB of {_f(t['table_file_mb'])} MB = "
                         f"{_f(t['ratio_added_vs_file'], 3)}",
                         _mark(t["ratio_added_vs_file"] <= 0.3)])
    cold = d.get("coldstart")
    if cold:
        r = [(m["model"], m["ratio_edge_vs_sklearn"]) for m in cold["models"]]
        worst = max(r, key=lambda x: x[1])
        rows.append(["4 cold start edge vs sklearn", "≤ 0.25×",
                     f"worst {worst[0]} {_f(worst[1])}", _mark(all(v <= 0.25 for _, v in r))])
    size = d.get("size")
    if size and size.get("wire"):
        u = size["wire"]["unchanged_sync"]["total"]
        rows.append(["5 bytes on the wire, unchanged sync", "< 1 KB", f"{u} B", _mark(u < 1024)])
    srv = d.get("serving")
    if srv:
        r = srv["ratio_gunicorn_vs_floor"]
        rows.append(["6 our API (gunicorn 2w) vs bare floor, req/s", "≥ 0.8×", _f(r),
                     _mark(r >= 0.8)])
    tel = d.get("telemetry")
    if tel and tel.get("telemetry"):
        tel_hit = max(float(t["us_per_call"]["hit"]["added_us"]) for t in tel["telemetry"])
        tel_miss = max(float(t["us_per_call"]["miss"]["added_pct"]) for t in tel["telemetry"])
        rows.append(["10 telemetry added to a table hit", "≤ 0.2 µs", f"{_f(tel_hit, 3)} µs",
                     _mark(tel_hit <= 0.2)])
        rows.append(["10 telemetry added to a single-row miss", "≤ 5 %",
                     f"{_f(tel_miss, 1)} %", _mark(tel_miss <= 5)])
    fb = d.get("fallback")
    if fb:
        for k in ("refused", "hung"):
            r = fb[f"ratio_{k}_later_vs_local"]
            rows.append([f"9 cloud down ({k}): later calls vs local", "≈ 1× (breaker)", _f(r),
                         _mark(r <= 1.5)])
    return rows


# ------------------------------------------------------------------------------ sections
def _latency(d: Doc, title: str = "1. Single-row latency (µs, median / p99)") -> str:
    rows = []
    for s in d["single_row"]:
        st = s["stats_us"]

        def mp(k: str, st: dict[str, Any] = st) -> str:
            return f"{_f(st[k]['median'])} / {_f(st[k]['p99'])}" if k in st else "–"
        rows.append([s["model"], s["variant"], mp("sklearn"), mp("ort"), mp("ort_iobinding"),
                     mp("ort_fp32"), mp("edge_miss"), mp("edge_hit"),
                     s["ratios"]["miss_vs_ort"], s["ratios"]["hit_vs_ort"],
                     _f(s["ratios"]["sklearn_vs_edge_miss"], 0) + "×"])
    head = ["model", "shipped", "sklearn", "raw ort", "ort IO-binding", "ort fp32",
            "edge miss", "edge hit", "miss/ort", "hit/ort", "sklearn/edge"]
    bat = [[b["model"], b["rows_per_s"]["ort"]["median"], b["rows_per_s"]["edge_arrays"]["median"],
            b["rows_per_s"]["edge_rows"]["median"], b["ratios"]["edge_arrays_vs_ort"],
            b["ratios"]["edge_rows_vs_ort"]] for b in d["batch"]]
    return (f"## {title}\n\n{_table(head, rows)}\n\n"
            "raw ort = `session.run(None, feeds)` with prebuilt feeds; ort IO-binding = the same "
            "session with inputs bound once (numeric-only models; the floor from Python); ort "
            "fp32 = the fp32 model when the shipped one is int8; edge miss/hit = "
            "`EdgeRuntime.predict([row])` on a row outside / inside the precomputed table "
            "(row as a dict for orders/eta, a list for digits).\n\n"
            f"## 2. Batch throughput (rows/s at batch {d['batch'][0]['batch']:,}, median)\n\n"
            + _table(["model", "raw ort", "edge predict_arrays", "edge predict(rows)",
                      "arrays/ort", "rows/ort"], bat)
            + "\n\nRows outside the table (the model path). `predict_arrays` takes the same numpy "
              "arrays as raw ort; `predict(rows)` takes dicts/lists and returns one Prediction "
              "per row.\n")


def _memory(d: Doc) -> str:
    rows = [[m["model"], m["peak_rss_mb"]["sklearn"]["median"], m["peak_rss_mb"]["edge"]["median"],
             m["ratio_edge_vs_sklearn"]] for m in d["models"]]
    out = (f"## 3. Memory: peak RSS of a fresh process that loads and predicts once (MB)\n\n"
           f"{_table(['model', 'joblib + sklearn', 'edge runtime', 'edge/sklearn'], rows)}\n\n"
           f"Bare interpreter: {_f(d['bare_python_mb']['median'])} MB. Peak RSS is VmHWM of the "
           "child process.\n")
    t = d.get("table")
    if t:
        out += (f"\nWith a {t['rows']:,}-row precomputed table ({_f(t['table_file_mb'])} MB file, "
                f"{t['model']}): {_f(t['peak_rss_mb']['edge_with_table']['median'])} MB vs "
                f"{_f(t['peak_rss_mb']['edge_without_table']['median'])} MB without — "
                f"{_f(t['added_mb'])} MB added, {_f(t['ratio_added_vs_file'], 3)}× the file "
                "size (memory-mapped; a lookup touches a few pages).\n")
    return out


def _cold(d: Doc) -> str:
    rows = [[m["model"], m["seconds"]["sklearn"]["median"], m["seconds"]["sklearn"]["p99"],
             m["seconds"]["edge"]["median"], m["seconds"]["edge"]["p99"],
             m["ratio_edge_vs_sklearn"]] for m in d["models"]]
    return ("## 4. Cold start: process start to first prediction (s)\n\n"
            + _table(["model", "sklearn median", "sklearn p99", "edge median", "edge p99",
                      "edge/sklearn"], rows)
            + f"\n\nBare interpreter start: {_f(d['bare_python_s']['median'], 3)} s.\n")


def _size(d: Doc) -> str:
    rows = [[m["model"], m["pickle"], m["joblib"], m["onnx_fp32"], m["int8_dynamic"],
             m["int8_static"], f"{m['shipped']:,} ({m['variant']})", m["table"],
             m["ratio_shipped_vs_pickle"]] for m in d["models"]]
    w = d["wire"]
    up = w["model_update"]
    return ("## 5. Size (bytes)\n\n"
            + _table(["model", "pickle", "joblib", "ONNX fp32", "int8 dynamic", "int8 static",
                      "shipped", "table", "shipped/pickle"], rows)
            + "\n\nint8 sizes are the quantization guard's candidates (– = not applicable: the "
              "graph has only ai.onnx.ml ops).\n\n"
            f"Bytes on the wire ({w['model']}, counted by a TCP proxy, both directions, headers "
            f"included): first sync {w['first_sync']['total']:,} B; **unchanged sync "
            f"{w['unchanged_sync']['total']:,} B**; one model update {up['total']:,} B for a "
            f"{up['model_bytes_uncompressed']:,}-byte model ({_f(up['ratio_wire_vs_model'])}× "
            "— gzip on the wire).\n")


def _serving(d: Doc) -> str:
    rows = [[k, v.get("rps"), v.get("p50_ms"), v.get("p99_ms"), v.get("requests"),
             v.get("errors"), v.get("server_cpu_s")] for k, v in d["servers"].items()]
    rounds = d.get("rounds", 1)
    per_round = ", ".join(_f(x) for x in d.get("ratio_rounds", []))
    return (f"## 6. Cloud serving: single-row POST predict, {d['connections']} connections, "
            f"{rounds} rounds of {_f(d['seconds'], 0)} s, generator {d['generator']} "
            f"({d['model']})\n\n"
            + _table(["server", "req/s", "p50 ms", "p99 ms", "requests", "errors",
                      "server CPU s"], rows)
            + f"\n\nOurs under gunicorn vs the floor: {_f(d['ratio_gunicorn_vs_floor'])}× "
              f"(median of the rounds: {per_round}); Flask dev server vs the floor: "
              f"{_f(d['ratio_dev_vs_floor'])}×. The floor and ours run side by side and are "
              "loaded in turn; req/s, p50 and p99 are medians over the rounds, requests and "
              "CPU totals. Load generator and servers share the machine's cores. Setups: "
              + "; ".join(f"{k}: {v.get('setup', '?')}" for k, v in d["servers"].items())
              + ".\n")


def _fleet(d: Doc) -> str:
    rows = []
    for f in d["fleets"]:
        r, s = f["rollout"], f["steady"]
        rows.append([f["devices"], r["syncs_per_s"], r["error_rate"],
                     r["cloud_cpu_ms_per_device"], s["syncs_per_s"], s["fallbacks_per_s"],
                     s["error_rate"], s["sync_latency_ms"]["p99"], s["cloud_cpu_ms_per_device"],
                     s["cloud_cpu_ms_per_request"]])
    return (f"## 7. Fleet ({d['model']}, {d['threads']} driver threads, gunicorn 2 workers)\n\n"
            + _table(["devices", "rollout syncs/s", "rollout errors", "rollout cloud CPU "
                      "ms/device", "steady syncs/s", "fallbacks/s", "steady errors",
                      "sync p99 ms", "cloud CPU ms/device", "cloud CPU ms/request"], rows)
            + "\n\nRollout: every device's first sync (manifest, model, table, verification). "
              "Steady: rounds of one conditional sync (304) and one fallback prediction per "
              "device.\n")


def _fallback(d: Doc) -> str:
    rows = [["local only (degraded)", f"{_f(d['local_us']['median'])} µs", "–"],
            ["live cloud", f"{_f(d['live_cloud_ms']['median'])} ms "
             f"(p99 {_f(d['live_cloud_ms']['p99'])})", d["live_cloud_source"]]]
    for k in ("refused", "hung"):
        x = d[k]
        rows.append([f"cloud down ({k}): first call", f"{_f(x['first_call_ms'])} ms",
                     x["first_source"] + (", degraded" if x["first_degraded"] else "")])
        rows.append([f"cloud down ({k}): later calls", f"{_f(x['later_us']['median'])} µs "
                     f"(p99 {_f(x['later_us']['p99'])})", f"breaker {x['breaker']}, "
                     f"{x['cloud_failures']} cloud call(s) failed"])
    return (f"## 9. Fallback cost ({d['model']}, an out-of-range row)\n\n"
            + _table(["situation", "latency", "answer"], rows) + "\n")


def _telemetry(d: Doc) -> str:
    rows = []
    for t in d.get("telemetry", []):
        u = t["us_per_call"]
        rows.append([t["model"]] + [f"{_f(u[k]['off']['p10'])} → {_f(u[k]['on']['p10'])} "
                                    f"({u[k]['added_pct']:+.1f} %)" for k in
                                    ("hit", "miss", "rows", "arrays")])
    text = ("## 10. Telemetry on the predict path (µs per call, off → on, p10 of block means)\n\n"
            + _table(["model", "table hit", "miss", "1,000 rows", "1,000 rows as arrays"], rows)
            + "\n")
    sp, wk = d.get("spool"), d.get("offline_week")
    if sp:
        text += (f"\nSpool: {sp['add_one_per_s']:,} records/s one at a time, "
                 f"{sp['add_many_per_s']:,}/s in one transaction, {sp['queue_per_s']:,}/s read "
                 "back in upload order.\n")
    if wk:
        text += (f"\nA week offline ({wk['hours']} h at one prediction a second, "
                 f"{wk['predictions']:,} predictions of {wk['model']}, hourly windows): "
                 f"{wk['spool_records']} records, {wk['spool_bytes_on_disk']:,} B of spool on "
                 f"disk with its WAL; one push of it took {_f(wk['push_s'], 3)} s "
                 f"({wk['pushed'].get('accepted')} accepted); a window's flush "
                 f"{_f(wk['flush_ms_per_window'])} ms.\n")
    return text


_ROLLOUT_LABELS = {"canary_0.1": "canary, sample 0.1", "canary_1": "canary, sample 1.0",
                   "shadow_1": "shadow, sample 1.0"}
_DOORS = {"hit": "1 row, table hit", "miss": "1 row, miss", "rows": "1,000 rows (dicts)"}


def _rollout(d: Doc) -> str:
    rows, work = [], []
    for m in d.get("rollout", []):
        for regime in ("tight", "spaced"):
            for door, label in _DOORS.items():
                got = m[regime].get(door)
                if not got:
                    continue
                base = got["none"]
                cells = [f"{_f(base['p10'])} ({_f(base['median'])})"]
                for k in _ROLLOUT_LABELS:
                    x = got[k]
                    drop = f", {x['skipped']:,}/{x['sampled']:,} dropped" \
                        if regime == "tight" and x["skipped"] else ""
                    cells.append(f"{_f(x['p10'])} ({x['added_us']:+,.2f} µs, "
                                 f"{x['added_pct']:+.1f} %{drop})")
                rows.append([m["model"], regime, label, *cells])
        for door, label in _DOORS.items():
            w = m["worker"].get(door, {})
            for k, short in _ROLLOUT_LABELS.items():
                x = w.get(k)
                if x is None or k == "canary_0.1":
                    continue
                work.append([m["model"], label, short, x["cpu_us_per_row"],
                             x["cpu_us_per_sampled_call"], x["drain_wait_us_per_sampled_call"],
                             x["companion_latency_median"]])
    head = ["model", "regime", "call", "no rollout", *_ROLLOUT_LABELS.values()]
    return ("## 11. A rollout's shadow on the device: cost to the caller (µs per call, p10 of "
            "block means (median); vs no rollout)\n\n" + _table(head, rows) + "\n\n"
            "Four runtimes on copies of the model's store, telemetry on in all: no rollout; "
            "role `canary` (served = candidate, companion = stable) at sample 0.1 (the canary "
            "default) and 1.0; role `shadow` at 1.0 (the shadow default). The companion is the "
            "served model under another version number, so its run costs what the served "
            "model's does. The same calls go to all four in interleaved blocks (as the "
            "telemetry suite). **tight**: calls back to back, each block timed as a whole; the "
            "shadow worker competes with the caller for the GIL and the CPU (the worst case), "
            "and sampled calls it cannot keep up with are dropped by the bounded queue "
            "(`dropped` = `skipped`/`sampled`); every worker is drained between blocks, "
            "untimed, so no block pays for another runtime's backlog. **spaced**: "
            "`rt.shadow.drain()` after each call outside the timed region, each call timed "
            "alone: the caller's side only (the "
            "sampling counter, the copy of the row, the queue put — waking the waiting worker "
            "thread is most of it). Worker cost below, from the spaced regime: CPU time of the "
            "worker thread (its POSIX thread clock) per compared row and per sampled call, the "
            "time `drain` waited per sampled call, and the median bin of the shadow record's "
            "companion latency; a device pays caller + sample × worker per call.\n\n"
            + _table(["model", "call", "contender", "worker CPU µs/row",
                      "worker CPU µs/sampled call", "drain wait µs/sampled call",
                      "companion median"], work) + "\n")


def _interleaving(d: Doc) -> str:
    rows = []
    for r in d.get("scenarios", []):
        s, ab, il = r["settings"], r["ab"], r["interleave"]
        rows.append([s["shared"], s["noise_a"], s["noise_b"], f"{ab['ctr_a']:.4f}",
                     f"{ab['ctr_b']:.4f}",
                     ab["impressions"], il["impressions"], r["ratio_ab_vs_interleave"]])
    s = d["scenarios"][0]["settings"] if d.get("scenarios") else {}
    return ("## 12. Interleaving vs A/B: impressions to detect the better ranker (simulation)"
            "\n\n" + _table(["shared noise", "noise A", "noise B", "CTR A", "CTR B",
                             "A/B impressions (both arms)", "interleaving impressions",
                             "A/B / interleaving"], rows)
            + f"\n\n`benchmarks.interleaving.simulate`: queries of {s.get('items')} items "
              f"(relevance 0/1/2), top {s.get('k')} shown, position-based clicks; ranker B's "
              "own scoring noise is smaller than A's, both share `shared noise`. A/B: half the "
              "impressions see each ranker, judged on click-through by a two-proportion test; "
              "interleaving: every impression sees the team-draft interleaving, judged by a "
              f"sign test on the wins. The smallest number of impressions detecting B "
              f"(α {s.get('alpha')}) in {s.get('power')} of {s.get('reps')} simulated "
              f"experiments, outcome rates calibrated on {_f(s.get('calibration'))} "
              "impressions through the real code.\n")


def _explain(d: Doc) -> str:
    rows = []
    for f in d.get("families", []):
        single, batch = f.get("single_us") or {}, f.get("batch_us_per_row") or {}
        rows.append([f["family"], f.get("method") or "none (cloud: shap)", f.get("space") or "–",
                     (single.get("explain") or {}).get("median"),
                     (single.get("explain") or {}).get("p99"),
                     (single.get("predict") or {}).get("median"), batch.get("explain"),
                     batch.get("predict"), f.get("explainer_bytes")])
    return ("## 14. Explanations on the device\n\n"
            + _table(["family", "method", "space", "explain 1 row µs (median)", "p99",
                      "predict 1 row µs", f"explain µs/row (batch {d.get('batch')})",
                      "predict µs/row (batch)", "explainer bytes"], rows)
            + "\n\n`rt.explain` from the version's explainer artifact (numpy only: exact linear "
              "contributions, or path-dependent TreeSHAP over every leaf of every tree) beside "
              "`rt.predict` on the same rows of the orders data (`late`); default model sizes "
              "(100 trees, unlimited depth for the forest), so the forest is the costly one. "
              "The MLP has no device explainer: `POST /v1/models/<name>/explain` explains it "
              "with shap's KernelExplainer.\n")


def _small(d: Doc) -> str:
    from . import budget, small_device

    lat = _latency(d["latency"], "8. Small-device profile: latency on one core, one thread "
                                 "(µs)").replace("## 2.", "### 8b.")
    mem = _memory(d["memory"]).replace("## 3.", "### 8c.")
    fits = f"\n{budget.report(d['budget'])}" if d.get("budget") else ""
    return (f"{lat}\n{mem}{fits}\nPinned: {d.get('pinned')}; cores {d.get('cores')}.\n\n"
            f"### Running on a real Raspberry Pi\n\n{small_device.PI_HOWTO}\n")


def _plots(d: dict[str, Doc], results: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:  # the bench extra brings it; tables are written without it
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    made = []
    lat = d.get("latency")
    if lat:
        singles = lat["single_row"]
        keys = ["sklearn", "ort", "edge_miss", "edge_hit"]
        x = np.arange(len(singles))
        fig, ax = plt.subplots(figsize=(11, 4.5))
        for i, k in enumerate(keys):
            ax.bar(x + (i - 1.5) * 0.2, [s["stats_us"][k]["median"] for s in singles], 0.2,
                   label=k)
        ax.set_yscale("log")
        ax.set_xticks(x, [s["model"] for s in singles], rotation=30, ha="right")
        ax.set_ylabel("µs per row (median, log)")
        ax.set_title("Single-row latency")
        ax.axhline(2.0, color="grey", ls=":", lw=1)
        ax.set_ylim(top=ax.get_ylim()[1] * 20)
        ax.legend(ncol=4, loc="upper center")
        fig.tight_layout()
        fig.savefig(results / "latency.png", dpi=110)
        plt.close(fig)
        made.append("latency.png")
        fig, ax = plt.subplots(figsize=(11, 4))
        b = lat["batch"]
        x = np.arange(len(b))
        for i, k in enumerate(["ort", "edge_arrays", "edge_rows"]):
            ax.bar(x + (i - 1) * 0.27, [r["rows_per_s"][k]["median"] for r in b], 0.27, label=k)
        ax.set_yscale("log")
        ax.set_xticks(x, [r["model"] for r in b], rotation=30, ha="right")
        ax.set_ylabel("rows/s (median, log)")
        ax.set_title("Batch throughput at 1,000 rows")
        ax.set_ylim(top=ax.get_ylim()[1] * 10)
        ax.legend(ncol=3, loc="upper center")
        fig.tight_layout()
        fig.savefig(results / "batch.png", dpi=110)
        plt.close(fig)
        made.append("batch.png")
    for name, key, ylabel, unit_key in (("memory", "peak_rss_mb", "peak RSS (MB)", None),
                                        ("coldstart", "seconds", "seconds to first prediction",
                                         None)):
        doc = d.get(name)
        if not doc:
            continue
        del unit_key
        ms = doc["models"]
        x = np.arange(len(ms))
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.bar(x - 0.2, [m[key]["sklearn"]["median"] for m in ms], 0.4, label="joblib + sklearn")
        ax.bar(x + 0.2, [m[key]["edge"]["median"] for m in ms], 0.4, label="edge runtime")
        ax.set_xticks(x, [m["model"] for m in ms])
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.legend()
        fig.tight_layout()
        fig.savefig(results / f"{name}.png", dpi=110)
        plt.close(fig)
        made.append(f"{name}.png")
    srv = d.get("serving")
    if srv:
        names = list(srv["servers"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(names, [srv["servers"][n].get("rps", 0) for n in names])
        ax.set_ylabel("requests/s")
        ax.set_title("Single-row POST predict")
        fig.tight_layout()
        fig.savefig(results / "serving.png", dpi=110)
        plt.close(fig)
        made.append("serving.png")
    return made


def write_report(results: Path = RESULTS) -> Path:
    """Write ``REPORT.md`` (and the plots) from the JSON files in ``results``."""
    d = _load(results)
    run = d.get("run", {})
    env: dict[str, Any] = run.get("environment") or next(
        (x["environment"] for x in d.values() if x.get("environment")), {})
    plots = _plots(d, results)
    v = env.get("versions", {})
    parts = [
        "# hybridml benchmarks\n",
        f"Mode **{run.get('mode', '?')}**, {_f(run.get('total_seconds'), 0)} s. Machine: "
        f"{env.get('machine')} {env.get('cpu')}, {env.get('cores')} cores, "
        f"{env.get('memory_gb')} GB, {env.get('os')}. Python {v.get('python')}, numpy "
        f"{v.get('numpy')}, onnxruntime {v.get('onnxruntime')}, scikit-learn "
        f"{v.get('scikit-learn')}, skl2onnx {v.get('skl2onnx')}, flask {v.get('flask')}, "
        f"gunicorn {v.get('gunicorn')}; wrk: {env.get('wrk') or 'absent'}.\n",
        "Reproduce: `make bench` (full) or `make bench-quick`; one suite: "
        "`python -m benchmarks.run --only latency`. Every comparison is measured side by side "
        "in the same run; medians and p99 over repeats. The machine is shared: absolute "
        "numbers move between runs, ratios much less.\n",
        "## Targets\n\n" + _table(["item", "target", "measured", "verdict"], targets(d)) + "\n",
    ]
    parts += [f"![{p}]({p})\n" for p in plots[:1]]
    if "latency" in d:
        parts.append(_latency(d["latency"]))
        parts += [f"![{p}]({p})\n" for p in plots if p == "batch.png"]
    if "memory" in d:
        parts.append(_memory(d["memory"]))
        parts += [f"![{p}]({p})\n" for p in plots if p == "memory.png"]
    if "coldstart" in d:
        parts.append(_cold(d["coldstart"]))
        parts += [f"![{p}]({p})\n" for p in plots if p == "coldstart.png"]
    if "size" in d:
        parts.append(_size(d["size"]))
    if "serving" in d:
        parts.append(_serving(d["serving"]))
        parts += [f"![{p}]({p})\n" for p in plots if p == "serving.png"]
    if "fleet" in d:
        parts.append(_fleet(d["fleet"]))
    if "small_device" in d:
        parts.append(_small(d["small_device"]))
    if "fallback" in d:
        parts.append(_fallback(d["fallback"]))
    if "telemetry" in d:
        parts.append(_telemetry(d["telemetry"]))
    if "rollout" in d:
        parts.append(_rollout(d["rollout"]))
    if "interleaving" in d:
        parts.append(_interleaving(d["interleaving"]))
    if "fleet_scale" in d:
        from .fleet_scale_report import section

        parts.append(section(d["fleet_scale"]))
    if "explain" in d:
        parts.append(_explain(d["explain"]))
    if "sdcard" in d:  # issue 15 item 6
        from .sdcard import section as sdcard_section

        parts.append(sdcard_section(d["sdcard"]))
    path = results / "REPORT.md"
    path.write_text("\n".join(parts))
    return path
