"""Item 4: cold start — process start to the first prediction, edge vs scikit-learn.

Each sample is a fresh interpreter (``python benchmarks/probe.py``) timed from ``Popen`` to its
answer: interpreter start, imports, model load and one prediction. The two contenders
alternate, so page-cache warmth and machine load hit both alike. The interpreter alone
(``bare``) is the floor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Stats, log, ratio
from .memory import edge_args, sklearn_args, spawn_probe
from .workspace import Model, make_store


def run(models: list[Model], work: Path, *, repeats: int) -> dict[str, Any]:
    """Cold-start wall time (seconds) per model."""
    out = []
    bare = Stats.of([spawn_probe(["bare"])[0] for _ in range(repeats)])
    for m in models:
        log(f"cold start: {m.name}")
        sk_args = sklearn_args(m, work)
        store = make_store(m.registry, m.name, work / f"{m.name}-cold", with_table=True)
        ed_args = edge_args(m, store)
        spawn_probe(sk_args)  # warm the page cache for both before timing
        spawn_probe(ed_args)
        sk, ed = [], []
        for _ in range(repeats):
            sk.append(spawn_probe(sk_args)[0])
            ed.append(spawn_probe(ed_args)[0])
        s_sk, s_ed = Stats.of(sk), Stats.of(ed)
        out.append({"model": m.name, "seconds": {"sklearn": s_sk.to_json(),
                                                 "edge": s_ed.to_json()},
                    "ratio_edge_vs_sklearn": ratio(s_ed.median, s_sk.median)})
    return {"bare_python_s": bare.to_json(), "models": out, "settings": {"repeats": repeats}}
