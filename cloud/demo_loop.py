"""The continuous-training loop behind ``make demo-loop``, end to end, every step a CLI command.

A delivery service's ``late`` model (hgb) is trained on spring: daytime orders (08-22 h),
mostly dry. Then the season turns: orders move into the evening and the night, it rains more,
and night deliveries run late whatever the distance — a region the model never saw. The loop:

train v1 -> serve (signed, tokens) -> the edge syncs -> predicts the spring stream offline and
spools telemetry -> pushes -> ``monitor``: no drift -> the autumn stream, offline -> push ->
``monitor``: drift on ``hour`` and ``rain`` only -> labelled autumn rows arrive (``feedback``)
-> a policy -> ``controller --once``: the data trigger fires, auto mode fine-tunes v1 into
v1.1, the gate blesses it on the old holdout and the new slice, it is promoted -> the edge syncs
-> accuracy on fresh autumn rows recovers. A summary table at the end, as ``make demo`` has.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import HybridMLError
from hybridml.shared.text import format_table

from .demo import Cloud, run

FEATURES = ["restaurant", "hour", "distance_km", "rain", "items"]
NAME = "late"
LABELLED = 3000  # labelled autumn orders that arrive as feedback


def orders(n: int, *, autumn: bool, seed: int) -> list[dict[str, Any]]:
    """Orders with the truth: late when distance, rain and items outrun the kitchen's slack —
    and, in autumn, at night (after 22 h) whatever the distance."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        hour = rng.choice(range(17, 24)) if autumn and rng.random() < 0.7 \
            else rng.randrange(8, 22)
        rain = "yes" if rng.random() < (0.6 if autumn else 0.15) else "no"
        distance = round(rng.uniform(0.5, 9.0), 2)
        items = rng.randrange(1, 8)
        restaurant = f"r00{rng.randrange(5)}"
        load = distance + (2.0 if rain == "yes" else 0.0) + 0.3 * items + rng.gauss(0, 0.3)
        late = load > 8.0 or (autumn and hour >= 22 and rng.random() < 0.95)
        out.append({"restaurant": restaurant, "hour": hour,
                    "distance_km": distance, "rain": rain, "items": items,
                    "late": "late" if late else "on_time"})
    return out


def write(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Rows as CSV with ``columns``."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def predict(store: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``hybridml-edge predict --json`` on ``rows`` (offline), shown as one command."""
    lines = "\n".join(json.dumps({k: r[k] for k in FEATURES}) for r in rows)
    out = run(["hybridml-edge", "predict", "--store", str(store), "--name", NAME, "--json"],
              stdin=lines, show=False)
    print(f"\n$ hybridml-edge predict --store {store} --name {NAME} --json < "
          f"{len(rows)} rows")
    answers = [json.loads(x) for x in out.splitlines()]
    print(json.dumps(answers[0]))
    return answers


def accuracy(rows: list[dict[str, Any]], answers: list[dict[str, Any]]) -> float:
    """Share of answers equal to the truth."""
    return sum(a["prediction"] == r["late"] for r, a in zip(rows, answers)) / len(rows)


def monitor(reg: Path, since: str, report: Path | None = None) -> dict[str, Any]:
    """``hybridml-cloud monitor --json`` since ``since``; prints the table form too."""
    extra = ["--report", str(report)] if report else []
    run(["hybridml-cloud", "monitor", NAME, "--registry", str(reg), "--since", since, *extra])
    out = run(["hybridml-cloud", "monitor", NAME, "--registry", str(reg), "--since", since,
               "--json"], show=False)
    return json.loads(out)  # type: ignore[no-any-return]


def alerts(doc: dict[str, Any]) -> list[str]:
    """Features in alert in a monitor document."""
    return [f["name"] for f in doc.get("features", []) if f.get("status") == "alert"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the loop; returns 0 when accuracy recovered."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="demo-loop-work", help="recreated")
    ap.add_argument("--model", default="mlp", help="model family of v1 (fine-tuned by partial_fit)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    work = Path(args.workdir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    reg, store = work / "registry", work / "edge-store"
    print(f"hybridml demo-loop in {work}")

    spring = orders(3000, autumn=False, seed=1)
    train_csv = write(work / "spring.csv", spring, [*FEATURES, "late"])
    run(["hybridml-cloud", "train", "--data", str(train_csv), "--target", "late", "--name",
         NAME, "--model", args.model, "--registry", str(reg), "--quiet"])
    run(["hybridml-cloud", "keys", "init", "--registry", str(reg)])
    pub = next((reg / "keys").glob("*.pub"))
    token = run(["hybridml-cloud", "tokens", "create", "--role", "device", "--name", "pi-17",
                 "--registry", str(reg), "--quiet"], show=False).strip()
    print("\n$ export HYBRIDML_TOKEN=$(hybridml-cloud tokens create --role device --name "
          "pi-17 ...)")
    os.environ["HYBRIDML_TOKEN"] = token

    cloud = Cloud(reg)
    cloud.start()
    try:
        run(["hybridml-edge", "sync", "--cloud", cloud.url, "--name", NAME, "--store",
             str(store), "--trust", str(pub)])
    finally:
        cloud.stop()

    # Spring goes on, offline: telemetry spools on the device.
    before = utc_iso()
    time.sleep(1.1)  # monitor's period is (since, until] in whole seconds: start after it
    spring_live = orders(1500, autumn=False, seed=2)
    a_spring = predict(store, spring_live)
    cloud.start()
    try:
        run(["hybridml-edge", "push", "--cloud", cloud.url, "--store", str(store)])
        calm = monitor(reg, before)

        autumn_start = utc_iso()
        time.sleep(1.1)  # the autumn summary ends in a later second than the period starts
        cloud.stop()
        autumn = orders(2500, autumn=True, seed=3)
        a_autumn = predict(store, autumn)  # offline: v1 on autumn rows
        run(["hybridml-edge", "status", "--store", str(store)])
        cloud.start()
        run(["hybridml-edge", "push", "--cloud", cloud.url, "--store", str(store)])
        drifted = monitor(reg, autumn_start, report=work / "drift.html")

        # Ground truth arrives, late: labelled autumn orders (features + target).
        labelled = write(work / "labelled.csv", orders(LABELLED, autumn=True, seed=4),
                         [*FEATURES, "late"])
        run(["hybridml-cloud", "feedback", "--name", NAME, "--data", str(labelled),
             "--registry", str(reg)])
        run(["hybridml-cloud", "policy", "set", NAME, "--new-data", "10%", "--mode", "auto",
             "--cooldown", "6h", "--auto-promote", "--registry", str(reg)])
        run(["hybridml-cloud", "controller", "--once", "--registry", str(reg)])
        run(["hybridml-cloud", "triggers", NAME, "--registry", str(reg)])
        run(["hybridml-cloud", "models", NAME, "--registry", str(reg)])
        listed = json.loads(run(["hybridml-cloud", "models", NAME, "--registry", str(reg),
                                 "--json"], show=False))
        synced = run(["hybridml-edge", "sync", "--cloud", cloud.url, "--name", NAME,
                      "--store", str(store), "--json"])
    finally:
        cloud.stop()

    fresh = orders(2500, autumn=True, seed=5)  # autumn rows neither model saw
    a_old = a_autumn
    a_new = predict(store, fresh)
    new_version = json.loads(synced)["version"]
    rows = listed if isinstance(listed, list) else listed.get("versions", [])
    label = next((str(v.get("label")) for v in rows if v.get("version") == new_version),
                 f"v{new_version}")
    acc = {"spring, v1": accuracy(spring_live, a_spring),
           "autumn, v1": accuracy(autumn, a_old),
           "autumn, after the loop": accuracy(fresh, a_new)}
    summary = [
        (f"train v1 ({args.model} on spring orders)", "v1 stable; the edge syncs it (signed)"),
        ("spring, offline -> push", f"monitor: {calm.get('rows', 0):,} rows, alerts "
                                    f"{', '.join(alerts(calm)) or 'none'}"),
        ("autumn, offline -> push", f"monitor: alerts on {', '.join(alerts(drifted)) or 'none'}"
                                    f"; dataset drift {drifted.get('dataset_drift')}"),
        ("feedback", f"{LABELLED:,} labelled autumn orders"),
        ("controller --once", f"{label} (version {new_version}) fine-tuned, gated, promoted"),
        ("edge sync", f"active {label}"),
        *((k, f"accuracy {v:.3f}") for k, v in acc.items()),
    ]
    print("\nsummary")
    print(format_table(["step", "result"], summary, indent="  "))
    print(f"  total {time.perf_counter() - t0:.1f} s; drift report: {work / 'drift.html'}")
    problems = []
    if not calm.get("rows") or alerts(calm):
        problems.append(f"the spring stream: {calm.get('rows')} rows, alerts {alerts(calm)}")
    if set(alerts(drifted)) != {"hour", "rain"}:
        problems.append(f"the autumn stream alerted on {alerts(drifted)}, not hour and rain")
    if not acc["autumn, after the loop"] > acc["autumn, v1"] + 0.02 or \
            not math.isfinite(acc["autumn, v1"]):
        problems.append("accuracy did not recover")
    for p in problems:
        print(f"demo-loop: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except HybridMLError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        sys.exit(2)
