"""Item 8d: peak RSS per model family against the device memory budget (docs/device.md §3).

Per model, in fresh processes (pinned with the rest of the small-device profile): the peak RSS
of loading it and predicting one row (:mod:`benchmarks.probe`), the peak of
``hybridml-edge predict --input`` streaming ``rows`` JSON lines through it, and the estimate
``sync`` checks against ``HYBRIDML_MEMORY_BUDGET_MB`` (:mod:`hybridml.edge.budget`). A model
fits the budget when the measured peaks and the estimate are all within it.
"""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

from .common import PY, Stats, child_env, log
from .memory import edge_args, peak_rss
from .workspace import Model, make_store

BUDGET_MB = 256
# The edge's real entry point, reporting its own peak (ru_maxrss of a fork+exec child can
# hold the parent's high-water mark; VmHWM is the new image's).
_PREDICT = """
import sys
from hybridml.edge.cli import main
code = main(sys.argv[1:])
with open('/proc/self/status') as fh:
    print(next(line.split()[1] for line in fh if line.startswith('VmHWM:')), file=sys.stderr)
sys.exit(code)
"""


def stream_peak_mb(model: Model, store: Path, work: Path, rows: int) -> float:
    """Peak RSS (MB) of ``hybridml-edge predict --input`` over ``rows`` JSON lines."""
    path = work / f"{model.name}-{rows}.jsonl"
    if not path.exists():
        with open(path, "w") as fh:
            fh.writelines(json.dumps(r) + "\n"
                          for r in itertools.islice(itertools.cycle(model.rows), rows))
    proc = subprocess.run([PY, "-c", _PREDICT, "predict", "--store", str(store), "--name",
                           model.name, "--input", str(path), "--json"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env=child_env(HYBRIDML_TELEMETRY="off"), timeout=600, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"predict --input failed for {model.name}: {proc.stderr[-2000:]}")
    return int(proc.stderr.strip().splitlines()[-1]) / 1024


def run(models: list[Model], work: Path, *, repeats: int, rows: int,
        prefix: list[str] | None = None) -> dict[str, Any]:
    """Per model: family, ONNX size, measured peaks, the budget's estimate, and whether it
    fits :data:`BUDGET_MB`."""
    from hybridml.edge.budget import estimate
    from hybridml.shared.manifest import Manifest

    work.mkdir(parents=True, exist_ok=True)
    out = []
    for m in models:
        log(f"budget: {m.name}")
        store = make_store(m.registry, m.name, work / f"{m.name}-budget", with_table=False)
        one_row = peak_rss(edge_args(m, store), repeats, prefix)
        stream = Stats.of([stream_peak_mb(m, store, work, rows) for _ in range(repeats)])
        doc = dict(m.manifest)  # the store above has no table: neither has the estimate
        doc["artifacts"] = [a for a in doc["artifacts"] if a["role"] != "table"]
        est = estimate(Manifest.from_json(doc))
        worst = max(one_row.median, stream.median, est.needed_mb)
        out.append({"model": m.name, "family": est.family,
                    "onnx_kb": round(est.model_mb * 1024, 1),
                    "peak_rss_mb": {"one_row": one_row.to_json(), "stream": stream.to_json()},
                    "estimate_mb": est.needed_mb, "fits_budget": worst <= BUDGET_MB})
    return {"budget_mb": BUDGET_MB, "stream_rows": rows, "models": out}


def report(doc: dict[str, Any]) -> str:
    """The Markdown section of the report."""
    from hybridml.shared.text import format_table

    rows = [[m["model"], m["family"], f"{m['onnx_kb']:,.0f}",
             f"{m['peak_rss_mb']['one_row']['median']:.0f}",
             f"{m['peak_rss_mb']['stream']['median']:.0f}", f"{m['estimate_mb']:.0f}",
             "yes" if m["fits_budget"] else "NO"] for m in doc["models"]]
    table = format_table(["model", "family", "ONNX KB", "peak MB, 1 row",
                          f"peak MB, predict --input {doc['stream_rows']:,} rows",
                          "estimate MB (sync)", f"fits {doc['budget_mb']} MB"], rows,
                         align="llrrrrl", markdown=True)
    return (f"### 8d. Memory budget ({doc['budget_mb']} MB)\n\nPeak RSS of a fresh process; "
            "the estimate is what `sync` compares with `HYBRIDML_MEMORY_BUDGET_MB` "
            "(hybridml.edge.budget), before downloading a version.\n\n" + table + "\n")
