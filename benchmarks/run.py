"""Entry point: ``python -m benchmarks.run [--quick] [--only NAME[,NAME]]``.

Trains (or reuses) the workspace, runs the suites in order, writes
``benchmarks/results/<suite>.json`` after each one and ``REPORT.md`` with plots at the end.
``--quick`` runs fewer models and shorter measurements (under 3 minutes); ``--tiny`` is the
smoke test's setting (seconds, numbers meaningless). Suites: latency (items 1-2), memory (3),
coldstart (4), size (5), serving (6), fleet (7, and 13: ``fleet_scale``, 1,000 devices against
two replicas on PostgreSQL + SeaweedFS with faults, vs one embedded replica), small_device (8),
fallback (9), telemetry (10: its cost on the predict path, the spool, a week offline),
rollout (11: what a rollout's shadow costs the caller per prediction), interleaving (12:
impressions interleaving vs A/B needs, a simulation), explain (14: the device explainer's
µs per row per family, beside predict).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import DEFAULT_WORKDIR, RESULTS, environment, log, save

SUITES = ("latency", "memory", "coldstart", "size", "serving", "fleet", "small_device",
          "fallback", "telemetry", "rollout", "interleaving", "explain", "sdcard")


@dataclass(frozen=True)
class Settings:
    """How long and how wide each suite measures."""

    mode: str
    calls: int
    sklearn_calls: int
    batch_repeats: int
    mem_repeats: int
    table_rows: int
    cold_repeats: int
    serve_seconds: float
    serve_connections: int
    serve_max_requests: int
    fleet_sizes: tuple[int, ...]
    fleet_budget: int
    fallback_calls: int
    fallback_cloud_calls: int

    @classmethod
    def for_mode(cls, mode: str) -> Settings:
        """``full``, ``quick`` or ``tiny``."""
        if mode == "full":
            return cls("full", 20000, 100, 100, 5, 1_000_000, 11, 10.0, 16, 300_000,
                       (10, 100, 1000), 6000, 3000, 300)
        if mode == "quick":
            return cls("quick", 1000, 20, 10, 2, 100_000, 3, 3.0, 16, 50_000, (10, 100), 400,
                       300, 30)
        return cls("tiny", 60, 2, 2, 1, 2000, 1, 0.5, 4, 200, (2,), 8, 20, 3)


def _pick(models: list[Any], names: Sequence[str]) -> list[Any]:
    by_name = {m.name: m for m in models}
    return [by_name[n] for n in names if n in by_name] or models[:1]


def run_suite(name: str, models: list[Any], s: Settings, work: Path, use_wrk: bool,
              workdir: Path, results: Path = RESULTS) -> dict[str, Any]:
    """Run one suite and return its JSON document."""
    from . import (
        coldstart,
        fallback,
        fleet,
        fleet_scale,
        interleaving,
        latency,
        memory,
        serving,
        shadow,
        size,
        small_device,
        telemetry,
    )

    orders = [m for m in models if m.spec.dataset == "orders"]
    main = _pick(models, ["orders_hgb"])[0]
    if name == "latency":
        return latency.run(models, calls=s.calls, sklearn_calls=s.sklearn_calls,
                           batch_repeats=s.batch_repeats)
    if name == "memory":
        return memory.run(orders or models[:1], work, repeats=s.mem_repeats,
                          table_rows=s.table_rows, table_model=main)
    if name == "coldstart":
        return coldstart.run(orders or models[:1], work, repeats=s.cold_repeats)
    if name == "size":
        return size.run(models, main, work)
    if name == "serving":
        return serving.run(main, connections=s.serve_connections, seconds=s.serve_seconds,
                           max_requests=s.serve_max_requests, use_wrk=use_wrk)
    if name == "fleet":
        doc = fleet.run(_pick(models, ["orders_logreg"])[0], work, sizes=s.fleet_sizes,
                        request_budget=s.fleet_budget)
        # Item 13 (fleet_scale.json, its own file and plot; REPORT.md section 13).
        log("fleet: at scale, fleet vs embedded baseline")
        fleet_scale.run(_pick(models, [fleet_scale.MODEL])[0], work, s.mode, results)
        return doc
    if name == "small_device":
        return small_device.run(s, workdir)
    if name == "fallback":
        return fallback.run(main, calls=s.fallback_calls, cloud_calls=s.fallback_cloud_calls)
    if name == "telemetry":
        picked = _pick(models, ["orders_hgb", "orders_logreg", "eta_hgb", "digits_mlp"])
        hours = {"full": 168, "quick": 24}.get(s.mode, 2)
        calls = {"full": 2048, "quick": 512}.get(s.mode, 64)
        return {"suite": "telemetry", **telemetry.run(
            picked, work, week_hours=hours, single_calls=calls,
            blocks=60 if s.mode == "full" else 6, batch_blocks=20 if s.mode == "full" else 2)}
    if name == "rollout":
        picked = _pick(models, ["orders_hgb", "orders_logreg", "digits_mlp"])  # classifiers
        full = s.mode == "full"
        return {"suite": "rollout", **shadow.run(
            picked, work, single_calls={"full": 512, "quick": 128}.get(s.mode, 16),
            blocks=40 if full else 6 if s.mode == "quick" else 2,
            batch_calls=5 if full else 2, batch_blocks=20 if full else 2)}
    if name == "explain":  # issue 14: the device explainer's cost per family
        from . import explain

        return {"suite": "explain", **explain.run(
            _pick(models, ["orders_hgb"])[0].registry.parent / "data" / "orders.csv", work,
            s.mode)}
    if name == "sdcard":  # issue 15 item 6: bytes written in a simulated day
        from . import sdcard

        return sdcard.run(main, work, s.mode)
    if name == "interleaving":
        # As ``python -m benchmarks.interleaving`` (its full and --quick settings); tiny: seconds.
        calibration, reps = {"full": (200_000, 500), "quick": (20_000, 200)}.get(
            s.mode, (2_000, 40))
        runs = []
        for shared, noise_a, noise_b in interleaving.SCENARIOS:
            log(f"interleaving: shared noise {shared}, A {noise_a} vs B {noise_b}")
            runs.append(interleaving.simulate(noise_a=noise_a, noise_b=noise_b, shared=shared,
                                              calibration=calibration, reps=reps))
        return {"suite": "interleaving", "scenarios": runs}
    raise SystemExit(f"unknown suite {name!r}; choose from {', '.join(SUITES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer models, shorter runs (<3 min)")
    ap.add_argument("--tiny", action="store_true", help="smoke-test settings (seconds)")
    ap.add_argument("--only", default="", help=f"comma-separated suites of {', '.join(SUITES)}")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                    help="trained models and scratch files, reused between runs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where JSON/REPORT.md go")
    ap.add_argument("--no-wrk", action="store_true", help="use the Python load generator")
    ap.add_argument("--no-report", action="store_true", help="skip REPORT.md and plots")
    args = ap.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    settings = Settings.for_mode(mode)
    only = [x.strip() for x in args.only.split(",") if x.strip()] or list(SUITES)
    bad = [x for x in only if x not in SUITES]
    if bad:
        ap.error(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
    # The kit's own warnings (e.g. a fleet of devices without trusted keys) are expected
    # here and would drown the progress lines.
    logging.getLogger("hybridml").setLevel(logging.ERROR)
    env = environment()
    print(json.dumps({"environment": env, "mode": mode}, indent=1), flush=True)
    from .workspace import Workspace, model_specs

    t0 = time.perf_counter()
    ws = Workspace(args.workdir, model_specs(mode),
                   orders_rows=1500 if mode == "tiny" else 4000)
    models = ws.models()
    work = ws.root / "scratch"
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"workspace": round(time.perf_counter() - t0, 1)}
    for name in only:
        t1 = time.perf_counter()
        log(f"suite {name} ({mode})")
        doc = run_suite(name, models, settings, work, not args.no_wrk, args.workdir,
                        args.results)
        timings[name] = round(time.perf_counter() - t1, 1)
        save(name, {"suite": name, "mode": mode, "environment": env,
                    "settings": asdict(settings), **doc}, args.results)
    save("run", {"mode": mode, "environment": env, "suites": only, "seconds": timings,
                 "total_seconds": round(time.perf_counter() - t0, 1)}, args.results)
    if not args.no_report:
        from .report import write_report

        path = write_report(args.results)
        log(f"wrote {path}")
    log(f"done in {time.perf_counter() - t0:.0f} s: {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
