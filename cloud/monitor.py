"""``hybridml-cloud monitor eta``: is the model still right for what the devices see?

One report over a period (default: the last day), from the telemetry store
(:mod:`hybridml.cloud.telemetry`): a table on the terminal, ``--json``, or a self-contained
HTML page with plots (``--report``, :mod:`hybridml.cloud.report`).

* ``features`` — drift of each input over the period, fleet-wide: the devices' bin counts are
  summed first, so each device weighs what its traffic weighs (:mod:`hybridml.cloud.fleet`);
  ``dataset_drift`` is docs/monitoring.md §2's rule;
* ``predictions`` — rows, rows by source, degraded rows, and the drift of the outputs;
* ``devices`` — each device's last upload, rows, versions, and its own drift in the period;
* ``performance`` — realised metric per version and window from feedback, estimates marked;
* ``traffic`` — rows by source per window (the page plots it);
* ``fairness`` — the version's group metrics per sensitive column from labelled feedback in
  the period (:mod:`hybridml.cloud.fairness_feedback`); None without a training report;
* ``diagnosis`` — data drift or concept drift, by this rule:

  - **data drift**: the fleet's inputs drifted (``dataset_drift``).
  - **performance falls**: the newest window of the version with at least
    :data:`~hybridml.cloud.performance.MIN_LABELS` labels scores worse than the version's own
    held-out test score by more than :data:`SCORE_DROP` (accuracy-like metrics, absolute) or
    :data:`ERROR_RISE` (RMSE, relative). Unknown without such a window: estimates from
    confidence never decide, because a model that is as sure as ever while the world changed
    under it keeps a good estimate — exactly the case concept drift is.
  - verdict: ``concept_drift`` when performance falls while the inputs are stable (what the
    inputs mean for the target changed: retrain on recent labels); ``data_and_performance``
    when both (the inputs moved and the model suffers: retrain on recent data);
    ``data_drift`` when the inputs moved and performance holds or is unknown (watch; labels
    will tell); ``stable`` when neither; ``insufficient`` when no feature could be judged
    and no window has enough labels.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hybridml.shared.clock import parse_duration, utc_iso
from hybridml.shared.text import format_table

from . import fleet, metrics
from .fairness_feedback import feedback_fairness
from .ingest import parse_time
from .performance import MIN_LABELS
from .registry import Registry
from .telemetry import TelemetryStore

SCORE_DROP = 0.05
ERROR_RISE = 0.10
LOWER_IS_BETTER = frozenset({"rmse", "mae"})
DEFAULT_WINDOW = "1d"


def monitor(store: TelemetryStore, model: str, *, version: int | None = None,
            since: Any = None, until: Any = None, window_s: float = 86400.0,
            perf_window_s: float = 86400.0) -> dict[str, Any]:
    """The monitor report of ``model`` v``version`` (default: stable) over (since, until]
    (default: the ``window_s`` seconds before now)."""
    facts = store.facts(model, version)
    end = parse_time(until, "until") if until is not None else store.clock()
    start = parse_time(since, "since") if since is not None else end - window_s
    found = store.summaries(model, facts.version, start, end)
    drift = fleet.report(facts, found, (start, end))
    per_device: dict[str, list[dict[str, Any]]] = {}
    for s in found:
        per_device.setdefault(s["device"], []).append(s)
    devices = []
    for d in store.devices(model):
        mine = per_device.get(d["device"])
        r = fleet.report(facts, mine, (start, end)) if mine else None
        devices.append({**d, "period_rows": r["rows"] if r else 0,
                        "dataset_drift": bool(r["dataset_drift"]) if r else None,
                        "alerts": fleet.alerts(r) if r else []})
    traffic = store.traffic(model, version=facts.version, since=start, until=end,
                            window_s=max((end - start) / 24, 60.0))
    totals: dict[str, Any] = {"rows": 0, "by_source": {}, "degraded": {}}
    for slot in traffic:
        totals["rows"] += slot["rows"]
        for key in ("by_source", "degraded"):
            for k, n in slot[key].items():
                totals[key][k] = totals[key].get(k, 0) + n
    performance = store.performance(model, window_s=perf_window_s)
    manifest = store.registry.manifest(model, facts.version)
    primary = metrics.PRIMARY[facts.task]
    reference = (manifest.get("metrics") or {}).get("edge_test", {}).get(primary)
    return {
        "format": 1, "model": model, "version": facts.version, "task": facts.task,
        "window": {"start": utc_iso(start), "end": utc_iso(end)}, "rows": drift["rows"],
        "features": drift["features"], "dataset_drift": bool(drift["dataset_drift"]),
        "predictions": {**totals, **drift["predictions"]},
        "confidence": drift.get("confidence"),
        "devices": devices, "performance": performance, "traffic": traffic,
        "labelled": {"rows": store.labelled_count(model),
                     "sha256": store.labelled_sha256(model)},
        "reference": {"metric": primary, "value": reference},
        "fairness": feedback_fairness(store, model, facts.version, start, end),
        "diagnosis": diagnose(drift, [p for p in performance if p["version"] == facts.version],
                              primary, reference),
    }


def diagnose(drift: dict[str, Any], performance: list[dict[str, Any]], metric: str,
             reference: float | None) -> dict[str, Any]:
    """Data drift versus concept drift, by the rule in the module docstring."""
    data = bool(drift.get("dataset_drift"))
    judged = any(f.get("status") != "insufficient" for f in drift.get("features", []))
    labelled = [p for p in performance if not p["estimate"] and p["labels"] >= MIN_LABELS
                and p["metric"] == metric]
    falls: bool | None = None
    latest = labelled[-1] if labelled else None
    if latest is not None and reference is not None:
        if metric in LOWER_IS_BETTER:
            falls = latest["value"] > reference * (1 + ERROR_RISE)
        else:
            falls = latest["value"] < reference - SCORE_DROP
    if falls and not data:
        verdict = "concept_drift"
    elif falls and data:
        verdict = "data_and_performance"
    elif data:
        verdict = "data_drift"
    elif not judged and falls is None:
        verdict = "insufficient"
    else:
        verdict = "stable"
    return {"verdict": verdict, "data_drift": data, "performance_falls": falls,
            "latest": latest, "reference": reference,
            "rule": ("concept drift = performance falls (newest window with >= "
                     f"{MIN_LABELS} labels worse than the held-out test score by > "
                     f"{SCORE_DROP} absolute, or > {ERROR_RISE:.0%} relative for errors) while "
                     "the inputs are stable (no dataset drift); data drift = dataset drift")}


def table(result: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    pred = result["predictions"]
    sources = ", ".join(f"{k} {v:,}" for k, v in sorted(pred["by_source"].items())) or "-"
    lines = [f"{result['model']} v{result['version']}  {result['window']['start']} .. "
             f"{result['window']['end']}  {result['rows']:,} rows ({sources})", ""]
    rows = [[f["name"], f["kind"], f"{f['rows']:,}", _num(f.get("psi")),
             _num(f.get("js", f.get("linf"))), f["status"]] for f in result["features"]]
    rows.append(["(predictions)", "", "", _num(pred.get("psi")), "", pred.get("status", "-")])
    lines += [format_table(["feature", "kind", "rows", "psi", "js/linf", "status"], rows,
                           align="llrrrl"), "",
              f"dataset drift: {'YES' if result['dataset_drift'] else 'no'}", ""]
    if result["devices"]:
        lines += [format_table(
            ["device", "last seen", "rows", "in period", "versions", "drift"],
            [[d["device"], d["last_seen"], f"{d['rows']:,}", f"{d['period_rows']:,}",
              ",".join(map(str, d["versions"])) or "-",
              "-" if d["dataset_drift"] is None else ("YES: " + ", ".join(d["alerts"])
                                                      if d["dataset_drift"] else "no")]
             for d in result["devices"]], align="llrrll"), ""]
    if result["performance"]:
        lines += [format_table(
            ["version", "window start", "labels", "metric", "value"],
            [[f"v{p['version']}", p["start"], str(p["labels"]),
              p["metric"] + (" (estimate)" if p["estimate"] else ""), _num(p["value"])]
             for p in result["performance"]], align="llrlr"), ""]
    fair = result.get("fairness")
    if fair:
        lines += [_fairness_text(fair), ""]
    d = result["diagnosis"]
    ref = result["reference"]
    lines.append(f"verdict: {d['verdict']}  (held-out {ref['metric']} {_num(ref['value'])}; "
                 f"performance falls: {d['performance_falls']})")
    return "\n".join(lines)


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add ``monitor`` to the ``hybridml-cloud`` subcommands."""
    m = sub.add_parser("monitor", parents=[common],
                       help="drift, devices and performance of a model from device telemetry")
    m.add_argument("name", help="model name")
    m.add_argument("--version", type=int, default=None, help="version (default: stable)")
    m.add_argument("--since", default=None, help="start, ISO 8601 (default: --window ago)")
    m.add_argument("--until", default=None, help="end, ISO 8601 (default: now)")
    m.add_argument("--window", default=DEFAULT_WINDOW,
                   help=f"period when --since is not given (default {DEFAULT_WINDOW})")
    m.add_argument("--perf-window", default="1d",
                   help="window of the performance series (default 1d)")
    m.add_argument("--report", metavar="HTML", default=None,
                   help="also write a self-contained HTML page with plots")
    m.set_defaults(func=cmd_monitor)


def cmd_monitor(args: argparse.Namespace) -> int:
    """``monitor``: the table (or JSON), and the page if asked."""
    store = TelemetryStore(Registry.from_env(args.registry, create=False))
    result = monitor(store, args.name, version=args.version, since=args.since,
                     until=args.until, window_s=parse_duration(args.window, "window"),
                     perf_window_s=parse_duration(args.perf_window, "perf-window"))
    if args.report:
        from .report import write_report

        result["report"] = str(write_report(result, args.report))
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(table(result))
        if args.report:
            print(f"report: {result['report']}")
    return 0


def _fairness_text(block: dict[str, Any]) -> str:
    from .fairness import table as fairness_table

    lines = [f"fairness from feedback: {block['rows']:,} labelled rows "
             f"({block['device_answers']:,} judged on the device's answer, the rest on the "
             "version's model)"]
    if block.get("by_column"):
        lines.append(fairness_table(block))
    lines += [f"{col}: not reported: {why}" for col, why in block["unavailable"].items()]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
