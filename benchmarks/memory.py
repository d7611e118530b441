"""Item 3: peak RSS of a fresh process that loads a model and predicts one row.

Contenders per model: joblib + scikit-learn (the pickled pipeline) and the edge runtime
(EdgeRuntime on a store). Then one model again with a precomputed table of a million rows:
the table is memory-mapped, so it should add little to RSS compared with its file size.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import PY, ROOT, Stats, child_env, log, ratio
from .workspace import Model, make_store

PROBE = str(ROOT / "benchmarks" / "probe.py")


def spawn_probe(args: list[str], prefix: list[str] | None = None,
                env: dict[str, str] | None = None) -> tuple[float, dict[str, Any]]:
    """Run the probe in a fresh process; return (wall seconds to its answer, its JSON)."""
    cmd = [*(prefix or []), PY, PROBE, *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env or child_env(),
                          timeout=120, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"probe {args[0]} failed: {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def sklearn_args(model: Model, work: Path) -> list[str]:
    """Probe arguments for joblib + scikit-learn: dump the pipeline with joblib once."""
    import joblib

    from hybridml.shared.manifest import Manifest

    path = work / f"{model.name}.joblib"
    if not path.exists():
        work.mkdir(parents=True, exist_ok=True)
        import pickle

        joblib.dump(pickle.loads(model.sklearn_path.read_bytes()), path)
    schema = Manifest.from_json(model.manifest).schema
    row = model.miss_row
    values = [row[n] for n in schema.names] if isinstance(row, dict) else list(row)
    by_name = dict(zip(schema.names, values))
    ordered = [by_name[n] for n in (*schema.numeric_names, *schema.categorical_names)]
    return ["sklearn", str(path), json.dumps(ordered), str(schema.n_numeric)]


def edge_args(model: Model, store: Path | None = None, row: Any = None) -> list[str]:
    """Probe arguments for the edge runtime."""
    return ["edge", str(store or model.store), model.name,
            json.dumps(model.miss_row if row is None else row)]


def peak_rss(args: list[str], repeats: int, prefix: list[str] | None = None) -> Stats:
    """Peak RSS in MB over ``repeats`` fresh processes."""
    return Stats.of([spawn_probe(args, prefix)[1]["peak_rss_kb"] / 1024.0
                     for _ in range(repeats)])


def million_row_store(model: Model, work: Path, rows: int) -> tuple[Path, int, Any]:
    """A store for ``model`` whose table holds ``rows`` distinct generated inputs."""
    from hybridml.edge.session import ModelSession
    from hybridml.edge.store import LocalStore
    from hybridml.shared.manifest import Manifest
    from hybridml.shared.table import write_table

    manifest = Manifest.from_json(model.manifest)
    schema = manifest.schema
    store_dir = work / f"{model.name}-table{rows}"
    marker = store_dir / "done.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        return store_dir, int(info["table_bytes"]), info["row"]
    log(f"memory: building a {rows:,}-row table for {model.name}")
    rng = np.random.default_rng(1)
    n_num, n_cat = schema.n_numeric, schema.n_categorical
    lo = np.nan_to_num(schema._lo, neginf=0.0)
    hi = np.nan_to_num(schema._hi, posinf=100.0)
    num = (lo + (hi - lo) * rng.random((rows, n_num))).astype(np.float32)
    cat = np.empty((rows, n_cat), dtype=object)
    for j, name in enumerate(schema.categorical_names):
        cats = schema.features[schema.names.index(name)].categories
        cat[:, j] = np.asarray(cats, dtype=object)[rng.integers(0, len(cats), rows)]
    batch = schema.encode_arrays(num, cat)
    keys = schema.keys(batch)
    _, first = np.unique(keys, axis=0, return_index=True)
    first.sort()
    batch, keys = batch.take(first), keys[first]
    model_art = manifest.artifact("model")
    assert model_art is not None
    session = ModelSession(model.onnx_path, schema, manifest.task)
    labels, probs, values = [], [], []
    for s in range(0, len(batch), 50_000):
        out = session.run(batch.take(np.arange(s, min(s + 50_000, len(batch)))))
        if out.values is not None:
            values.append(out.values)
        else:
            labels.append(out.labels)
            probs.append(out.probabilities)
    table_path = work / f"{model.name}-{rows}.table"
    outputs = ({"values": np.concatenate(values)} if values else
               {"labels": np.concatenate(labels), "probabilities": np.concatenate(probs)})
    write_table(table_path, model_sha256=model_art.sha256, task=manifest.task, keys=keys,
                **outputs)
    make_store(model.registry, model.name, store_dir, with_table=False)
    store = LocalStore(store_dir)
    from hybridml.shared.files import file_sha256

    sha = file_sha256(table_path)
    shutil.copyfile(table_path, store.artifact_path(sha))
    doc = manifest.to_json()
    doc["artifacts"] = [a for a in doc["artifacts"] if a["role"] != "table"] + [
        {"role": "table", "sha256": sha, "size": table_path.stat().st_size,
         "media_type": "application/x-hybridml-table"}]
    store.activate(Manifest.from_json(doc))
    first_row = {n: (float(num[0, schema.numeric_names.index(n)])
                     if n in schema.numeric_names
                     else str(cat[0, schema.categorical_names.index(n)])) for n in schema.names}
    size = table_path.stat().st_size
    table_path.unlink()
    marker.write_text(json.dumps({"table_bytes": size, "row": first_row}))
    return store_dir, size, first_row


def run(models: list[Model], work: Path, *, repeats: int, table_rows: int,
        table_model: Model | None, prefix: list[str] | None = None) -> dict[str, Any]:
    """Peak RSS per model (sklearn vs edge) and the table's cost in RSS."""
    per_model = []
    bare = peak_rss(["bare"], repeats, prefix)
    for m in models:
        log(f"memory: {m.name}")
        sk = peak_rss(sklearn_args(m, work), repeats, prefix)
        edge_store = make_store(m.registry, m.name, work / f"{m.name}-notable",
                                with_table=False)
        edge = peak_rss(edge_args(m, edge_store), repeats, prefix)
        per_model.append({"model": m.name, "peak_rss_mb": {"sklearn": sk.to_json(),
                                                           "edge": edge.to_json()},
                          "ratio_edge_vs_sklearn": ratio(edge.median, sk.median)})
    table: dict[str, Any] | None = None
    if table_model is not None:
        store, size, row = million_row_store(table_model, work, table_rows)
        plain = make_store(table_model.registry, table_model.name,
                           work / f"{table_model.name}-notable", with_table=False)
        with_table = peak_rss(edge_args(table_model, store, row), repeats, prefix)
        without = peak_rss(edge_args(table_model, plain, row), repeats, prefix)
        added_mb = with_table.median - without.median
        table = {"model": table_model.name, "rows": table_rows,
                 "table_file_mb": round(size / 2**20, 2),
                 "peak_rss_mb": {"edge_with_table": with_table.to_json(),
                                 "edge_without_table": without.to_json()},
                 "added_mb": round(added_mb, 2),
                 "ratio_added_vs_file": ratio(max(added_mb, 0.0), size / 2**20)}
    return {"bare_python_mb": bare.to_json(), "models": per_model, "table": table,
            "settings": {"repeats": repeats, "table_rows": table_rows}}
