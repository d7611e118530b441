"""Issue 15 item 5: shipped size and device peak RSS per family, compression guard off vs auto.

Each model is trained three times with the kit's own ``train()`` — ``compression="off"``
(what shipped before the guard covered every family), ``"auto"``, and ``"auto"`` for a fleet
whose floor is onnxruntime 1.21 (``$HYBRIDML_MIN_ONNXRUNTIME``: opset-5 trees allowed); each
version is put into a fresh edge store, and a fresh process (``benchmarks/probe.py edge``)
loads it with ``EdgeRuntime`` and predicts one row; its peak RSS is the device's cost. The
scikit-learn contender is the ``off`` version's pickled pipeline (joblib + predict one row).

    python -m benchmarks.compress --workdir /tmp/compress-bench [--quick] [--only eta_rf]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from hybridml.cloud.compress import FLOOR_ENV

from .common import log
from .memory import peak_rss, sklearn_args
from .workspace import Model, ModelSpec, make_store, write_orders

FULL = [ModelSpec("eta", f) for f in ("logreg", "rf", "gb", "hgb", "mlp")] + [
    ModelSpec("orders", "rf"), ModelSpec("digits", "rf")]
QUICK = [ModelSpec("eta", "rf"), ModelSpec("eta", "hgb", (("max_iter", 30),)),
         ModelSpec("digits", "rf", (("n_estimators", 20),))]


def _train(spec: ModelSpec, reg_dir: Path, csv: Path, mode: str) -> tuple[dict[str, Any], float]:
    from hybridml.cloud.registry import Registry
    from hybridml.cloud.train import train

    reg = Registry(reg_dir)
    kw: dict[str, Any] = {"model": spec.family, "params": dict(spec.params),
                          "compression": mode}
    if spec.dataset == "digits":
        kw["dataset"] = "digits"
    else:
        target, other = (("late", "delivery_minutes") if spec.dataset == "orders"
                         else ("delivery_minutes", "late"))
        kw.update(data=csv, target=target, drop=[other])
    t0 = time.perf_counter()
    try:
        result = train(reg, spec.name, **kw)
        reg.set_alias(spec.name, "stable", result.manifest["version"])
    finally:
        reg.close()
    return result.manifest, time.perf_counter() - t0


def run(specs: list[ModelSpec], work: Path, repeats: int) -> list[dict[str, Any]]:
    """One row per model: size, RSS and metric with the guard off and on auto."""
    csv = work / "orders.csv"
    if not csv.exists():
        work.mkdir(parents=True, exist_ok=True)
        write_orders(csv, 4000)
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"model": spec.name}
        for mode in ("off", "auto", "auto_ort121"):
            reg_dir = work / f"reg-{mode}"
            if mode == "auto_ort121":  # a fleet whose devices all run onnxruntime >= 1.21
                os.environ[FLOOR_ENV] = "1.21"
            try:
                manifest, seconds = _train(spec, reg_dir, csv, mode.split("_")[0])
            finally:
                os.environ.pop(FLOOR_ENV, None)
            store = make_store(reg_dir, spec.name, work / f"store-{mode}-{spec.name}",
                               with_table=False)
            golden = manifest["golden"]["rows"][0]
            rss = peak_rss(["edge", str(store), spec.name, json.dumps(golden)], repeats)
            shipped = next(a for a in manifest["artifacts"] if a["role"] == "model")
            primary = manifest["metrics"]["primary"]
            row[mode] = {"variant": manifest["model"]["variant"], "bytes": shipped["size"],
                         "edge_peak_rss_mb": rss.median, "train_s": round(seconds, 1),
                         primary: manifest["metrics"]["edge_test"][primary]}
            if mode == "off":
                row["sklearn_peak_rss_mb"] = _sklearn_rss(spec, reg_dir, store, manifest,
                                                          golden, work, repeats)
        rows.append(row)
        log(json.dumps(row))
    return rows


def _sklearn_rss(spec: ModelSpec, reg_dir: Path, store: Path, manifest: dict[str, Any],
                 row: list[Any], work: Path, repeats: int) -> float:
    from hybridml.cloud.registry import Registry

    reg = Registry(reg_dir, create=False)
    try:
        meta = reg.metadata(spec.name, manifest["version"])
    finally:
        reg.close()
    model = Model(spec, manifest, meta, store, reg_dir, row, row, [row])
    return peak_rss(sklearn_args(model, work), repeats).median


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/hybridml-compress-bench"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="model names (e.g. eta_rf digits_rf)")
    args = ap.parse_args()
    specs = QUICK if args.quick else FULL
    if args.only:
        specs = [s for s in specs if s.name in args.only]
    rows = run(specs, args.workdir, args.repeats)
    (args.workdir / "compress.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
