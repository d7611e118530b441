"""The models every benchmark shares: trained once, cached on disk, with tables and edge stores.

Three datasets — ``digits`` (64 numeric pixels, 10 classes), ``orders`` (a generated food-delivery
CSV with numeric and categorical columns and missing values; binary ``late``) and ``eta`` (the
same CSV, regression on ``delivery_minutes``) — times four families (logreg, rf, hgb, mlp). Each
model is trained with the kit's own ``train()``, gets a precomputed table of its most frequent
rows, and an edge store made the way ``sync`` leaves one. The workspace is keyed by its settings
and a digest of the kit's source, and reused by later runs (``--workdir``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import log

FAMILIES = ("logreg", "rf", "hgb", "mlp")
DATASETS = ("digits", "orders", "eta")
TABLE_ROWS = 1000
SPEC_VERSION = 3


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked model."""

    dataset: str
    family: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        """Registry and store name."""
        return f"{self.dataset}_{self.family}"

    @property
    def task(self) -> str:
        """Task of the dataset."""
        return {"digits": "multiclass", "orders": "binary", "eta": "regression"}[self.dataset]


def model_specs(mode: str) -> list[ModelSpec]:
    """Every model of a ``full`` run; a smaller, faster set for ``quick``; one for ``tiny``."""
    if mode == "tiny":
        return [ModelSpec("orders", "hgb", (("max_iter", 10),))]
    if mode == "quick":
        small = (("n_estimators", 20),)
        return [ModelSpec("orders", "logreg"), ModelSpec("orders", "hgb", (("max_iter", 30),)),
                ModelSpec("digits", "rf", small),
                ModelSpec("digits", "mlp", (("hidden_layer_sizes", [64]), ("max_iter", 200))),
                ModelSpec("eta", "hgb", (("max_iter", 30),))]
    return [ModelSpec(d, f) for d in DATASETS for f in FAMILIES]


def write_orders(path: Path, n: int, seed: int = 0) -> Path:
    """A mixed numeric/categorical CSV with missing values (as tests.conftest, more varied)."""
    rng = np.random.default_rng(seed)
    lines = ["restaurant,hour,distance_km,rain,items,vehicle,delivery_minutes,late"]
    vehicles = ["bike", "scooter", "car"]
    for _ in range(n):
        rest = f"r{rng.integers(0, 20):03d}"
        hour = int(rng.integers(8, 23))
        dist = round(float(rng.uniform(0.5, 9.0)), 1)
        rain = str(rng.choice(["yes", "no", ""]))
        items = int(rng.integers(1, 8))
        vehicle = vehicles[int(rng.integers(0, 3))]
        minutes = 10 + 3.5 * dist + 1.5 * items + (8 if rain == "yes" else 0) + \
            (5 if rest in ("r003", "r011") else 0) + (4 if vehicle == "bike" else 0) + \
            (6 if hour in (12, 13, 19, 20) else 0) + rng.normal(0, 2)
        late = "late" if minutes > 38 else "on_time"
        dist_s = "" if rng.random() < 0.05 else str(dist)
        lines.append(f"{rest},{hour},{dist_s},{rain},{items},{vehicle},{minutes:.1f},{late}")
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Model:
    """A trained model as the benchmarks see it."""

    spec: ModelSpec
    manifest: dict[str, Any]
    metadata: dict[str, Any]
    store: Path
    registry: Path
    hit_row: Any
    miss_row: Any
    rows: list[Any]  # in-range rows for batches

    @property
    def name(self) -> str:
        """Model name."""
        return self.spec.name

    def artifact(self, role: str) -> dict[str, Any] | None:
        """The manifest entry of ``role``."""
        return next((a for a in self.manifest["artifacts"] if a["role"] == role), None)

    def blob(self, sha256: str) -> Path:
        """Path of a registry blob."""
        from hybridml.cloud.registry import Registry

        reg = Registry(self.registry, create=False)
        try:
            return reg.blob_path(sha256)
        finally:
            reg.close()

    @property
    def onnx_path(self) -> Path:
        """The shipped ONNX model (what the edge runs)."""
        art = self.artifact("model")
        assert art is not None
        return self.blob(art["sha256"])

    @property
    def fp32_path(self) -> Path:
        """The fp32 ONNX model."""
        art = self.artifact("model_fp32") or self.artifact("model")
        assert art is not None
        return self.blob(art["sha256"])

    @property
    def sklearn_path(self) -> Path:
        """The pickled scikit-learn pipeline."""
        return self.blob(self.metadata["sklearn_sha256"])

    @property
    def variant(self) -> str:
        """Shipped variant: fp32, int8_dynamic or int8_static."""
        return str(self.manifest["model"]["variant"])


class Workspace:
    """Trains (or reuses) the benchmark models under ``root``."""

    def __init__(self, root: Path, specs: Sequence[ModelSpec], *, orders_rows: int = 4000
                 ) -> None:
        self.specs = list(specs)
        key = json.dumps({"v": SPEC_VERSION, "orders": orders_rows, "kit": _kit_digest(),
                          "specs": [[s.dataset, s.family, list(s.params)] for s in self.specs]},
                         sort_keys=True)
        self.root = Path(root) / hashlib.sha256(key.encode()).hexdigest()[:12]
        self.registry = self.root / "registry"
        self.orders_rows = orders_rows
        self.key = key

    @property
    def orders_csv(self) -> Path:
        """The generated mixed CSV."""
        return self.root / "data" / "orders.csv"

    def models(self) -> list[Model]:
        """Train what is missing and return every model."""
        done = self.root / "done.json"
        if not done.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            (self.root / "data").mkdir(parents=True)
            write_orders(self.orders_csv, self.orders_rows)
            for spec in self.specs:
                self._build(spec)
            done.write_text(self.key)
        return [self._load(s) for s in self.specs]

    # ------------------------------------------------------------------------------ internals
    def _dataset_rows(self, spec: ModelSpec) -> tuple[list[Any], list[str]]:
        """Every row of the dataset as the edge receives it (lists for digits, dicts else)."""
        from hybridml.cloud.data import load_builtin, load_csv

        if spec.dataset == "digits":
            ds = load_builtin("digits")
            return [list(map(float, r)) for r in ds.num.tolist()], list(ds.schema.names)
        target, other = (("late", "delivery_minutes") if spec.dataset == "orders"
                         else ("delivery_minutes", "late"))
        ds = load_csv(self.orders_csv, target, drop=[other])
        names = list(ds.schema.names)
        num_names, cat_names = ds.schema.numeric_names, ds.schema.categorical_names
        rows = []
        for nums, cats in zip(ds.num.tolist(), ds.cat.tolist()):
            row: dict[str, Any] = {n: (None if v != v else (int(v) if n in ("hour", "items")
                                                             else float(v)))
                                   for n, v in zip(num_names, nums)}
            row.update({n: (v or None) for n, v in zip(cat_names, cats)})
            rows.append({n: row[n] for n in names})
        return rows, names

    def _build(self, spec: ModelSpec) -> None:
        from hybridml.cloud.registry import Registry
        from hybridml.cloud.train import train

        log(f"training {spec.name} ({spec.family} on {spec.dataset})")
        reg = Registry(self.registry)
        try:
            params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.params}
            if spec.dataset == "digits":
                train(reg, spec.name, dataset="digits", model=spec.family, params=params)
            else:
                target, other = (("late", "delivery_minutes") if spec.dataset == "orders"
                                 else ("delivery_minutes", "late"))
                train(reg, spec.name, data=self.orders_csv, target=target, drop=[other],
                      model=spec.family, params=params)
            self._attach_table(reg, spec)
        finally:
            reg.close()
        self._make_store(spec)

    def _attach_table(self, reg: Any, spec: ModelSpec) -> None:
        """Precompute the table from a Zipf-like request log over the first rows."""
        from hybridml.cloud.precompute import precompute
        from hybridml.shared.schema import InputSchema

        rows, names = self._dataset_rows(spec)
        picks = _in_range(rows, InputSchema.from_json(reg.manifest(spec.name)["schema"]))
        log_rows = [rows[i] for i in picks[:TABLE_ROWS]]
        rng = random.Random(0)
        weights = [1.0 / (i + 1) ** 1.1 for i in range(len(log_rows))]
        requests = log_rows + rng.choices(log_rows, weights=weights, k=4 * len(log_rows))
        log_csv = self.root / "data" / f"{spec.name}_log.csv"
        with open(log_csv, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(names)
            for r in requests:
                vals = r if isinstance(r, list) else [r[n] for n in names]
                w.writerow(["" if v is None else v for v in vals])
        manifest = reg.manifest(spec.name)
        model = next(a for a in manifest["artifacts"] if a["role"] == "model")
        out = self.root / "data" / f"{spec.name}.table"
        precompute(reg.blob_path(model["sha256"]).read_bytes(), model["sha256"],
                   InputSchema.from_json(manifest["schema"]), manifest["output"]["task"],
                   log_csv, top=TABLE_ROWS, out_path=out)
        sha, size = reg.put_blob(out)
        reg.attach_artifact(spec.name, "stable", {"role": "table", "sha256": sha, "size": size,
                                                  "media_type": "application/x-hybridml-table"})

    def _make_store(self, spec: ModelSpec) -> None:
        """An edge store holding the stable version, as ``sync`` would leave it."""
        make_store(self.registry, spec.name, self.root / "stores" / spec.name)

    def _load(self, spec: ModelSpec) -> Model:
        from hybridml.cloud.registry import Registry
        from hybridml.shared.schema import InputSchema

        reg = Registry(self.registry, create=False)
        try:
            manifest, metadata = reg.manifest(spec.name), reg.metadata(spec.name)
        finally:
            reg.close()
        rows, _ = self._dataset_rows(spec)
        good = _in_range(rows, InputSchema.from_json(manifest["schema"]))
        in_table = good[:TABLE_ROWS]
        rest = good[TABLE_ROWS:]
        # The most frequent logged row is the hit; the first in-range row after the logged
        # ones is the miss (digits and orders both have more rows than the table holds).
        miss = rows[rest[0]] if rest else rows[good[-1]]
        return Model(spec, manifest, metadata, self.root / "stores" / spec.name, self.registry,
                     rows[in_table[0]], miss, [rows[i] for i in good])


def provision(store_dir: Path, registry: Path) -> Path:
    """Make ``store_dir`` trust ``registry``'s signing key (created if it has none), as a
    device is provisioned before its first sync: the benchmarks measure signed manifests."""
    from hybridml.cloud.signing import KeyRing
    from hybridml.edge.trust import TrustStore

    ring = KeyRing(registry)
    key_id = ring.active_id() or ring.init().key_id
    TrustStore(store_dir).add(ring.info(key_id).public_path)
    return store_dir


def make_store(registry: Path, name: str, store_dir: Path, ref: str = "stable",
               with_table: bool = True) -> Path:
    """Copy ``name``'s model (and table) into a fresh edge store and activate it."""
    from hybridml.cloud.registry import Registry
    from hybridml.edge.store import LocalStore
    from hybridml.shared.manifest import Manifest

    reg = Registry(registry, create=False)
    try:
        doc = reg.manifest(name, ref)
        if not with_table:
            doc = dict(doc)
            doc["artifacts"] = [a for a in doc["artifacts"] if a["role"] != "table"]
        shutil.rmtree(store_dir, ignore_errors=True)
        store = LocalStore(store_dir).ensure()
        for art in doc["artifacts"]:
            if art["role"] in ("model", "table"):
                shutil.copyfile(reg.blob_path(art["sha256"]), store.artifact_path(art["sha256"]))
        store.activate(Manifest.from_json(doc))
    finally:
        reg.close()
    return store_dir


def _kit_digest() -> str:
    """Digest of the kit's source: a changed kit trains a fresh workspace."""
    from .common import ROOT

    h = hashlib.sha256()
    for pkg in ("cloud", "edge", "shared"):
        for p in sorted((ROOT / pkg).glob("*.py")):
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _in_range(rows: list[Any], schema: Any) -> list[int]:
    """Indices of rows that trigger no fallback (in range, known categories), deduplicated."""
    batch = schema.encode(rows)
    keys = schema.keys(batch)
    ok = ~(batch.out_of_range | batch.unseen)
    _, first = np.unique(keys, axis=0, return_index=True)
    firsts = np.zeros(len(rows), dtype=bool)
    firsts[first] = True
    return [int(i) for i in np.flatnonzero(ok & firsts)]
