"""Item 5: model size (pickle, joblib, ONNX fp32, int8) and bytes on the wire for syncs.

Sizes come from the registry (the bytes the kit stores) and the compression report (each
candidate's size, including int8 variants that were not shipped). The wire is measured with a
counting TCP proxy between a real edge and a real cloud on loopback: the first sync, a sync
when nothing changed (304), and the sync of one model update (gzip transfer when it pays).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Any

from .common import log, ratio
from .servers import CountingProxy, cloud
from .workspace import Model, provision


def sizes(models: list[Model], work: Path) -> list[dict[str, Any]]:
    """Per-model artifact sizes in bytes."""
    import joblib

    out = []
    for m in models:
        jl = work / f"{m.name}.joblib"
        if not jl.exists():
            work.mkdir(parents=True, exist_ok=True)
            joblib.dump(pickle.loads(m.sklearn_path.read_bytes()), jl)
        report = m.manifest.get("compression") or m.manifest["quantization"]
        q = {c["variant"]: c for c in report["candidates"]}
        # The exported graph's size: a refitted winner (pruned, distilled) replaces model_fp32.
        fp32 = q.get("fp32", {}).get("size") or (m.artifact("model_fp32") or {}).get("size")
        int8 = {v: (q[v]["size"] if q.get(v, {}).get("status") in ("chosen", "accepted",
                                                                  "rejected") else None)
                for v in ("int8_dynamic", "int8_static")}
        table = m.artifact("table")
        out.append({"model": m.name, "pickle": int(m.metadata["sklearn_size"]),
                    "joblib": jl.stat().st_size, "onnx_fp32": fp32, **int8,
                    "shipped": (m.artifact("model") or {}).get("size"), "variant": m.variant,
                    "int8_status": {v: q.get(v, {}).get("status") for v in int8},
                    "table": table["size"] if table else None,
                    "ratio_shipped_vs_pickle": ratio(float((m.artifact("model") or {})
                                                           .get("size", 0)),
                                                     float(m.metadata["sklearn_size"]))})
    return out


def wire(model: Model, work: Path) -> dict[str, Any]:
    """Bytes on the wire: first sync, unchanged sync, one model update."""
    from hybridml.cloud.registry import Registry
    from hybridml.cloud.train import train
    from hybridml.edge.runtime import EdgeRuntime

    reg_dir = work / "wire-registry"
    shutil.rmtree(reg_dir, ignore_errors=True)
    shutil.copytree(model.registry, reg_dir)
    store = work / "wire-store"
    shutil.rmtree(store, ignore_errors=True)
    res: dict[str, Any] = {"model": model.name}
    with cloud(reg_dir) as server, CountingProxy(server.port) as proxy:
        rt = EdgeRuntime(provision(store, reg_dir), model.name, proxy.url)
        first = rt.sync()
        res["first_sync"] = {**proxy.totals(), "artifact_bytes": first.bytes_downloaded}
        proxy.reset()
        again = rt.sync()
        res["unchanged_sync"] = {**proxy.totals(), "changed": again.changed}
        log(f"size: training an update of {model.name}")
        reg = Registry(reg_dir)
        try:
            kw: dict[str, Any] = {"model": model.spec.family, "seed": 1,
                                  "params": dict(model.spec.params)}
            if model.spec.dataset == "digits":
                kw["dataset"] = "digits"
            else:
                target, other = (("late", "delivery_minutes") if model.spec.dataset == "orders"
                                 else ("delivery_minutes", "late"))
                csv_path = model.registry.parent / "data" / "orders.csv"
                kw.update(data=csv_path, target=target, drop=[other])
            new = train(reg, model.name, **kw)
            reg.set_alias(model.name, "stable", new.manifest["version"])
            new_model = next(a for a in new.manifest["artifacts"] if a["role"] == "model")
        finally:
            reg.close()
        proxy.reset()
        update = rt.sync()
        res["model_update"] = {**proxy.totals(), "changed": update.changed,
                               "model_bytes_uncompressed": new_model["size"],
                               "ratio_wire_vs_model": ratio(proxy.totals()["total"],
                                                            new_model["size"])}
        rt.client.close() if rt.client else None
    return res


def run(models: list[Model], wire_model: Model, work: Path) -> dict[str, Any]:
    """Both parts."""
    return {"models": sizes(models, work), "wire": wire(wire_model, work)}
