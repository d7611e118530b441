"""Issue 14 item 3: what explaining a prediction costs on the device, per model family.

One version per family is trained on the orders data (``late``, binary) into a registry of
its own, with the family's default size (a few trees in ``--tiny``), and installed in an edge
store. For each, ``rt.explain`` (numpy: linear contributions or TreeSHAP, from the version's
explainer artifact) is timed beside ``rt.predict_text`` on the same rows — one row, and a batch of
100 — as µs per row. The MLP has no device explainer (the cloud explains it with shap); its
row says so. The artifact's size is reported with each family.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .common import log, ratio, time_calls

FAMILIES = ("logreg", "sgd", "rf", "gb", "hgb", "mlp")
TINY = {"rf": {"n_estimators": 5}, "gb": {"n_estimators": 5}, "hgb": {"max_iter": 5},
        "mlp": {"hidden_layer_sizes": [8], "max_iter": 50}}
MLP = {"hidden_layer_sizes": [64], "max_iter": 200}
BATCH = 100


def run(orders_csv: Path, work: Path, mode: str) -> dict[str, Any]:
    """Train, install and time every family; the suite's JSON document."""
    from hybridml.cloud.registry import Registry
    from hybridml.cloud.train import train
    from hybridml.edge.runtime import EdgeRuntime
    from hybridml.edge.store import LocalStore
    from hybridml.shared.errors import NoModelError

    from .workspace import make_store

    root = work / "explain"
    shutil.rmtree(root, ignore_errors=True)
    reg = Registry(root / "registry")
    cols = _columns(orders_csv, BATCH)
    single_calls = {"full": 1000, "quick": 200}.get(mode, 5)
    batch_calls = {"full": 40, "quick": 10}.get(mode, 2)
    budget_s = {"full": 20.0, "quick": 4.0}.get(mode, 0.5)  # per contender, at most
    out = []
    for fam in FAMILIES:
        params = TINY.get(fam, {}) if mode == "tiny" else (MLP if fam == "mlp" else {})
        log(f"explain: training {fam}")
        t0 = time.perf_counter()
        m = train(reg, f"late_{fam}", data=orders_csv, target="late", model=fam,
                  params=params, drop=["delivery_minutes"]).manifest
        seconds = time.perf_counter() - t0
        store = LocalStore(make_store(reg.root, f"late_{fam}", root / f"store-{fam}"))
        art = next((a for a in m["artifacts"] if a["role"] == "explainer"), None)
        if art is not None:  # make_store copies the model (and table) only
            shutil.copyfile(reg.blob_path(art["sha256"]), store.artifact_path(art["sha256"]))
        rt = EdgeRuntime(store, f"late_{fam}", telemetry=False)
        doc: dict[str, Any] = {"family": fam, "train_seconds": round(seconds, 2),
                               "explainer_bytes": None if art is None else art["size"],
                               **(m.get("explain") or {"method": None, "space": None})}
        try:
            rt.explain(_head(cols, 1))
        except NoModelError as exc:
            doc["note"] = exc.message
            rt.close()
            out.append(doc)
            continue
        doc.update(_measure(rt, cols, single_calls, batch_calls, budget_s))
        log(f"explain: {fam} {doc['method']}: one row {doc['single_us']['explain']['median']:,.0f}"
            f" µs (predict {doc['single_us']['predict']['median']:,.1f} µs), batch "
            f"{doc['batch_us_per_row']['explain']:,.1f} µs/row")
        rt.close()
        out.append(doc)
    shutil.rmtree(root, ignore_errors=True)
    return {"families": out, "batch": BATCH, "rows": "orders (late), in-range rows"}


def _measure(rt: Any, cols: dict[str, list[str]], single_calls: int, batch_calls: int,
             budget_s: float) -> dict[str, Any]:
    """Explain vs predict: one row (µs per call) and a batch (µs per row)."""
    one = _head(cols, 1)
    single = _timed({"explain": lambda: rt.explain(one),
                     "predict": lambda: rt.predict_text(one)}, single_calls, budget_s)
    many = _timed({"explain": lambda: rt.explain(cols),
                   "predict": lambda: rt.predict_text(cols)}, batch_calls, budget_s)
    return {"single_us": {k: v.to_json() for k, v in single.items()},
            "batch_us_per_row": {k: round(v.median / BATCH, 3) for k, v in many.items()},
            "explain_vs_predict_single": ratio(single["explain"].median,
                                               single["predict"].median)}


def _timed(contenders: dict[str, Any], calls: int, budget_s: float) -> dict[str, Any]:
    """``time_calls`` with as many calls as fit in ``budget_s`` per contender (at least 3)."""
    slowest = 0.0
    for fn in contenders.values():
        t0 = time.perf_counter()
        fn()
        slowest = max(slowest, time.perf_counter() - t0)
    n = max(3, min(calls, int(budget_s / max(slowest, 1e-6))))
    return time_calls(contenders, calls=n, rounds=min(5, n), warmup=min(3, n))


def _columns(orders_csv: Path, n: int) -> dict[str, list[str]]:
    """The first ``n`` rows of the orders CSV as text columns (as a CSV input is read)."""
    import csv

    with orders_csv.open(newline="") as fh:
        recs = [r for _, r in zip(range(n), csv.DictReader(fh))]
    return {k: [r[k] for r in recs] for k in recs[0] if k not in ("late", "delivery_minutes")}


def _head(cols: dict[str, list[str]], n: int) -> dict[str, list[str]]:
    return {k: v[:n] for k, v in cols.items()}
