"""The safe-rollout demo behind ``make demo-rollout``: a canary on a simulated fleet, twice.

train v1 (spring orders) -> v2 from the same rows with the labels shuffled (the gate refuses
it) -> v3 with twice the boosting rounds (the gate blesses it) -> serve on loopback (tokens, signed
manifests) -> 30 simulated devices, each a real edge runtime with its own token, sync v1 ->
``rollout start --strategy canary --candidate 2 --force`` -> day by day the devices sync
(taking their role), predict, send labels and push, and ``rollout tick`` decides: the bad
candidate is aborted at its first step and every device is back on v1 at its next sync ->
``rollout start --candidate 3``: 20 % -> 50 % -> 100 % -> promoted; every device on v3.

Only time is simulated (:mod:`hybridml.cloud.fleetsim`): each "day" the CLI looks with
``--at``, so a 24-hour dwell takes seconds. Every rollout command is a real CLI call.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.text import format_table

from .demo import Cloud, run
from .demo_loop import FEATURES, NAME, orders, write
from .fleetsim import Day, Fleet, SimClock, drive, labelled, shuffled

DEVICES = 30
ROWS_PER_DAY = 40
STEPS = "20,50,100"


def look(reg: Path) -> Any:
    """The controller's look at ``now``, as ``rollout tick --at`` (one line shown per day)."""
    def tick(now: float) -> tuple[str | None, str, int | None, list[str]]:
        out = json.loads(run(["hybridml-cloud", "rollout", "tick", NAME, "--at", utc_iso(now),
                              "--registry", str(reg), "--json"], show=False))
        analysis, rollout = out["analysis"] or {}, out["rollout"] or {}
        reasons = list(analysis.get("reasons") or [])
        print(f"  {utc_iso(now)}  tick: {analysis.get('action')} -> {rollout.get('state')}"
              f"{'' if rollout.get('step') is None else ', step ' + str(rollout['step'] + 1)}"
              f"  ({reasons[0] if reasons else ''})")
        return analysis.get("action"), str(rollout.get("state")), rollout.get("step"), reasons
    return tick


def days_table(days: list[Day], candidate: int) -> str:
    """The timeline: who served what each day, and the decision."""
    rows = [[d.day, d.versions.get(candidate, 0), sum(d.versions.values()), d.action or "-",
             d.state] for d in days]
    return format_table(["day", f"serving v{candidate}", "devices", "decision", "state"], rows,
                        indent="  ")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns 0 when the bad candidate was aborted and the good one promoted."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="demo-rollout-work", help="recreated")
    ap.add_argument("--devices", type=int, default=DEVICES)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reg = work / "registry"
    print(f"hybridml demo-rollout in {work}")

    spring = orders(1500, autumn=False, seed=1)
    cols = [*FEATURES, "late"]
    common = ["--target", "late", "--name", NAME, "--model", "hgb", "--registry", str(reg),
              "--quiet"]
    spring_csv = str(write(work / "spring.csv", spring, cols))
    run(["hybridml-cloud", "train", "--data", spring_csv, "--param", "max_iter=40", *common])
    bad_csv = str(write(work / "shuffled.csv", shuffled(spring, "late"), cols))
    run(["hybridml-cloud", "train", "--data", bad_csv, "--param", "max_iter=40", "--gate",
         *common])
    run(["hybridml-cloud", "train", "--data", spring_csv, "--param", "max_iter=80", "--gate",
         *common])
    run(["hybridml-cloud", "models", NAME, "--registry", str(reg)])
    run(["hybridml-cloud", "keys", "init", "--registry", str(reg)])
    run(["hybridml-cloud", "tokens", "create", "--role", "admin", "--name", "ops",
         "--registry", str(reg), "--quiet"], show=False)

    cloud = Cloud(reg)
    cloud.start()
    clock = SimClock(float(int(time.time())))
    fleet = Fleet(cloud.url, reg, NAME, args.devices, work / "devices", clock=clock)
    traffic = 0

    def today(i: int) -> Any:
        return labelled(orders(ROWS_PER_DAY, autumn=False, seed=traffic * 10_000 + i), "late")

    try:
        print(f"\n# {len(fleet)} devices sync: {dict(fleet.sync())}")
        run(["hybridml-cloud", "rollout", "start", NAME, "--strategy", "canary",
             "--candidate", "2", "--steps", STEPS, "--dwell", "1d", "--force",
             "--at", utc_iso(clock()), "--registry", str(reg)])
        traffic = 1
        bad = drive(fleet, look(reg), today, days=4)
        run(["hybridml-cloud", "rollout", "status", NAME, "--at", utc_iso(clock()),
             "--registry", str(reg)])
        after_bad = dict(fleet.versions())
        ever_bad = len(fleet.ever(2))
        print(f"\n# after one more sync: {after_bad}")

        run(["hybridml-cloud", "rollout", "start", NAME, "--strategy", "canary",
             "--candidate", "3", "--steps", STEPS, "--dwell", "1d", "--at", utc_iso(clock()),
             "--registry", str(reg)])
        traffic = 2
        good = drive(fleet, look(reg), today, days=6)
        run(["hybridml-cloud", "rollout", "status", NAME, "--at", utc_iso(clock()),
             "--registry", str(reg)])
        after_good = dict(fleet.versions())
        print(f"\n# after one more sync: {after_good}")
        run(["hybridml-cloud", "rollout", "list", NAME, "--registry", str(reg)])
    finally:
        fleet.close()
        cloud.stop()

    print("\nthe bad candidate (v2, shuffled labels):")
    print(days_table(bad, 2))
    print("the good candidate (v3):")
    print(days_table(good, 3))
    print(f"  total {time.perf_counter() - t0:.1f} s")
    problems = []
    if bad[-1].state != "aborted" or any(d.step for d in bad):
        problems.append(f"v2 was not aborted at its first step: "
                        f"{[(d.state, d.step) for d in bad]}")
    if after_bad != {1: len(fleet)} or ever_bad > bad[0].versions.get(2, 0):
        problems.append(f"after the abort the fleet serves {after_bad}; {ever_bad} devices "
                        "ever held v2")
    if good[-1].state != "promoted" or after_good != {3: len(fleet)}:
        problems.append(f"v3 ended {good[-1].state}; the fleet serves {after_good}")
    for p in problems:
        print(f"demo-rollout FAILED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
