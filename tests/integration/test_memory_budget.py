"""The memory budget (docs/device.md §3): batch scoring streams under a hard 256 MB limit, and
``sync`` refuses a version estimated not to fit, before downloading it.

The limit is enforced by :mod:`tests.integration.memlimit` (a cgroup v2 ``memory.max`` where
one can be made, else ``RLIMIT_DATA``; each test prints which). The 200,000-row run is the
one that proves streaming: before it, ``predict`` held every row and died of ``MemoryError``
under this limit (206 MB resident when it did). The million-row runs cost ~20 s of CPU and
are marked ``load``.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge import cli as edge_cli
from hybridml.edge.session import ModelSession
from hybridml.edge.store import LocalStore
from hybridml.shared.files import file_sha256
from hybridml.shared.manifest import Manifest
from hybridml.shared.table import write_table
from tests.conftest import CloudServer
from tests.edgekit import install
from tests.integration.memlimit import run_limited

LIMIT_MB = 256
EDGE = str(Path(sys.executable).parent / "hybridml-edge")


def orders_rows_csv(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` rows of the late model's columns (with an id column it ignores), as CSV."""
    rng = np.random.default_rng(seed)
    rest = np.char.add("r00", rng.integers(0, 5, n).astype(str)).tolist()
    hour = rng.integers(8, 23, n).tolist()
    dist = np.round(rng.uniform(0.5, 9.0, n), 2).tolist()
    rain = np.array(["yes", "no", ""])[rng.integers(0, 3, n)].tolist()
    items = rng.integers(1, 8, n).tolist()
    with open(path, "w") as fh:
        fh.write("id,restaurant,hour,distance_km,rain,items\n")
        fh.writelines(f"{i},{a},{b},{c},{d},{e}\n"
                      for i, (a, b, c, d, e) in enumerate(zip(rest, hour, dist, rain, items)))
    return path


def late_store(trained_registry: Path, root: Path) -> LocalStore:
    """A store with the late model (hgb) and its small table active."""
    store = LocalStore(root)
    install(Registry(trained_registry, create=False), "late", store)
    return store


def score_limited(store: LocalStore, csv_path: Path, out: Path) -> tuple[int, float | None]:
    """``hybridml-edge predict --input CSV --json`` under the limit: (exit code, peak MB);
    checks one answer per row was written."""
    run = run_limited(["predict", "--store", str(store.root), "--name", "late", "--input",
                       str(csv_path), "--json"], LIMIT_MB, stdout=out)
    print(f"enforced: {run.enforced}; peak RSS {run.peak_mb} MB")
    assert run.returncode == 0, f"killed or failed under the limit: {run.stderr[-1500:]}"
    assert run.peak_mb is not None and run.peak_mb < LIMIT_MB
    return run.returncode, run.peak_mb


def test_predict_streams_200k_rows_under_a_256_mb_limit(trained_registry: Path,
                                                         tmp_path: Path) -> None:
    store = late_store(trained_registry, tmp_path / "s")
    rows = orders_rows_csv(tmp_path / "rows.csv", 200_000)
    out = tmp_path / "out.jsonl"
    score_limited(store, rows, out)
    with open(out) as fh:
        n = sum(1 for _ in fh)
    assert n == 200_000
    last = json.loads(out.read_text().rsplit("\n", 2)[-2])
    assert last["source"] in ("edge", "precomputed") and last["model_version"] == 1


def predict_in_process(store: LocalStore, path: Path, *args: str) -> tuple[int, str, str]:
    """``hybridml-edge predict`` through its real entry point, in this process; the
    prediction ids (a counter) are taken out of the output."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = edge_cli.main(["predict", "--store", str(store.root), "--name", "late",
                              "--input", str(path), *args])
    return code, re.sub(r'"prediction_id": "[^"]*", ', "", out.getvalue()), err.getvalue()


def test_chunks_answer_as_one_call_with_rows_numbered_from_the_start(
        trained_registry: Path, tmp_path: Path) -> None:
    store = late_store(trained_registry, tmp_path / "s")
    row = {"restaurant": "r001", "hour": 12, "distance_km": 3.0, "rain": "no", "items": 2}
    lines = tmp_path / "rows.jsonl"
    lines.write_text("\n".join(json.dumps(dict(row, hour="noon" if i in (3, 17) else 8 + i % 9))
                               for i in range(25)))
    whole = predict_in_process(store, lines, "--json", "--errors", "report")
    chunked = predict_in_process(store, lines, "--json", "--errors", "report",
                                 "--chunk-rows", "5")
    assert chunked == whole and whole[0] == 2  # exit 2: some rows were refused
    bad = [json.loads(x)["error"] for x in whole[1].splitlines() if "error" in x]
    assert [e["details"]["row"] for e in bad] == [3, 17]
    assert bad[1]["message"].startswith("row 17 column 'hour'")

    table = predict_in_process(store, lines, "--errors", "report", "--chunk-rows", "5")[1]
    rows = table.splitlines()
    assert len(rows) == 26 and rows[0].split() == ["row", "prediction", "source", "version",
                                                   "confidence"]
    assert len({r.index("edge") for r in rows[1:] if "edge" in r}) == 1  # one alignment
    assert rows[18].startswith("17") and "error: row 17 column 'hour'" in rows[18]

    csv_path = tmp_path / "rows.csv"
    csv_path.write_text("restaurant,hour,distance_km,rain,items\n" + "".join(
        f"r001,{'x' if i == 21 else 9},1.5,no,2\n" for i in range(30)))
    code, out, err = predict_in_process(store, csv_path, "--json", "--chunk-rows", "5")
    assert code == 2 and "row 21 column 'hour'" in err
    # Streaming: the chunks before the bad row's were answered before it was read.
    assert len(out.splitlines()) == 20 + 1 and '"row": 21' in out.splitlines()[-1]


@pytest.mark.load
def test_edge_with_a_million_row_table_scores_a_million_rows_under_256_mb(
        trained_registry: Path, tmp_path: Path) -> None:
    store = late_store(trained_registry, tmp_path / "s")
    attach_million_row_table(store, tmp_path)
    rows = orders_rows_csv(tmp_path / "rows.csv", 1_000_000, seed=1)
    out = tmp_path / "out.jsonl"
    score_limited(store, rows, out)
    sources: dict[str, int] = {}
    with open(out) as fh:
        for line in fh:
            src = json.loads(line)["source"]
            sources[src] = sources.get(src, 0) + 1
    assert sum(sources.values()) == 1_000_000 and sources.get("precomputed", 0) > 0, sources


def attach_million_row_table(store: LocalStore, work: Path, rows: int = 1_000_000) -> None:
    """Replace the active version's table with one of ``rows`` distinct inputs, answered by
    the model itself (as the cloud's precompute does)."""
    manifest = store.active("late")
    assert manifest is not None
    schema = manifest.schema
    rng = np.random.default_rng(1)
    # Rows as the CSV of orders_rows_csv(seed=1) holds them, so the run gets hits.
    hour = rng.integers(8, 23, rows * 2)
    dist = np.round(rng.uniform(0.5, 9.0, rows * 2), 2)
    items = rng.integers(1, 8, rows * 2)
    by_name = {"hour": hour, "distance_km": dist, "items": items}
    num = np.stack([by_name[n] for n in schema.numeric_names], axis=1).astype(np.float32)
    cat = np.empty((rows * 2, schema.n_categorical), dtype=object)
    for j, name in enumerate(schema.categorical_names):
        cats = schema.features[schema.names.index(name)].categories
        cat[:, j] = np.asarray(cats, dtype=object)[rng.integers(0, len(cats), rows * 2)]
    batch = schema.encode_arrays(num, cat)
    keys = schema.keys(batch)
    _, first = np.unique(keys, axis=0, return_index=True)
    first = np.sort(first)[:rows]
    batch, keys = batch.take(first), keys[first]
    model = manifest.artifact("model")
    assert model is not None
    session = ModelSession(store.artifact_path(model.sha256), schema, manifest.task)
    out = session.run(batch)
    path = work / "million.table"
    write_table(path, model_sha256=model.sha256, task=manifest.task, keys=keys,
                labels=out.labels, probabilities=out.probabilities)
    sha = file_sha256(path)
    os.replace(path, store.artifact_path(sha))
    doc = manifest.to_json()
    doc["artifacts"] = [a for a in doc["artifacts"] if a["role"] != "table"] + [
        {"role": "table", "sha256": sha, "size": store.artifact_path(sha).stat().st_size,
         "media_type": "application/x-hybridml-table"}]
    store.activate(Manifest.from_json(doc))


def edge(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGE, *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **(env or {})})


def test_sync_refuses_a_version_over_the_memory_budget_and_keeps_serving(
        own_cloud: CloudServer, tmp_path: Path) -> None:
    store = str(own_cloud.trust(tmp_path / "s"))
    base = ("--cloud", own_cloud.url, "--name", "iris", "--store", store)
    assert edge("sync", *base).returncode == 0
    reg = Registry(own_cloud.registry)
    train(reg, "iris", dataset="iris", model="logreg", seed=5)
    reg.set_alias("iris", "stable", 2)
    models = [next(a["sha256"] for a in reg.manifest("iris", v)["artifacts"]
                   if a["role"] == "model") for v in (1, 2)]
    reg.close()
    assert models[0] != models[1]

    r = edge("sync", *base, "--json", "--memory-budget-mb", "64")
    assert r.returncode == 2
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "memory_budget"
    assert err["details"]["available_mb"] == 64 and err["details"]["needed_mb"] > 64
    assert "iris v2 needs about" in r.stderr and "the 64 MB memory budget" in r.stderr
    assert not LocalStore(store).artifact_path(models[1]).exists()  # refused before download
    r = subprocess.run([EDGE, "predict", "--store", store, "--name", "iris", "--json"],
                       input=json.dumps([[5.1, 3.5, 1.4, 0.2]]), capture_output=True,
                       text=True, timeout=60, check=False)
    assert json.loads(r.stdout)["model_version"] == 1  # the previous version keeps serving

    r = edge("sync", *base, env={"HYBRIDML_MEMORY_BUDGET_MB": "64"})
    assert r.returncode == 2 and "64 MB memory budget" in r.stderr  # the environment sets it too
    r = edge("sync", *base, env={"HYBRIDML_MEMORY_BUDGET_MB": str(LIMIT_MB)})
    assert r.returncode == 0 and "activated v2" in r.stdout, r.stderr


def test_an_opset5_tree_graph_counts_at_the_size_it_unpacks_to(trained_registry: Path) -> None:
    """late (hgb) ships as the compact opset-5 TreeEnsemble; onnxruntime unpacks it to what
    the graph it was rewritten from takes, so the estimate counts that graph's size."""
    from hybridml.edge.budget import estimate, unpacked_size

    reg = Registry(trained_registry)
    try:
        manifest = Manifest.from_json(reg.manifest("late", "stable"))
    finally:
        reg.close()
    block = manifest.raw["compression"]
    assert block["chosen"] == "trees_v5"
    sizes = {c["variant"]: c["size"] for c in block["candidates"]}
    shipped = manifest.artifact("model")
    assert shipped is not None and shipped.size == sizes["trees_v5"] < sizes["fp32"]
    assert unpacked_size(manifest, shipped.size) == sizes["fp32"]
    assert estimate(manifest).model_mb == pytest.approx(sizes["fp32"] / 2**20)
