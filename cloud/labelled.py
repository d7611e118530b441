"""Labelled rows: the new training data, the gate's recent slice and each version's holdout.

A :class:`Labelled` is rows of raw feature values by name (numbers or None, strings) with one
label each (a class name, or a number for regression): the shape feedback arrives in, and the
shape both ONNX sessions of the gate are fed from. It is written to a CSV to train on, so a
candidate's data is fingerprinted like any other training data.

Every version stores its **holdout** — the test rows of the data it was trained on, at most
:data:`HOLDOUT_MAX_ROWS` — as a blob named in its cloud-only metadata
(``metadata["holdout"] = {"sha256", "size", "rows"}``); a fine-tune inherits its parent's, so
the original holdout follows a line and the gate can see forgetting. Versions registered
before holdouts were stored get theirs rebuilt from their line's training source and split
seed, when that source is still there unchanged.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.shared.cells import MISSING_TOKENS
from hybridml.shared.errors import DataError, RegistryError
from hybridml.shared.schema import NUMERIC, InputSchema

from .data import Dataset, load_builtin, load_csv, split
from .lineage import base_of
from .registry import Registry

log = logging.getLogger("hybridml.cloud.labelled")

HOLDOUT_MAX_ROWS = 20_000
HOLDOUT_FORMAT = 1
Row = dict[str, Any]


@dataclass(frozen=True)
class Labelled:
    """Rows of raw feature values by name, each with its label."""

    rows: tuple[Row, ...] = ()
    labels: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.labels):
            raise DataError(f"{len(self.rows)} rows but {len(self.labels)} labels: every "
                            "labelled row needs exactly one label", field="labels")

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, Any]], labels: Iterable[Any]) -> Labelled:
        """Build from any rows and labels; rows without a label (None, NaN) are left out."""
        pairs = [(dict(r), y) for r, y in zip(rows, labels) if not _missing(y)]
        return cls(tuple(r for r, _ in pairs), tuple(y for _, y in pairs))

    def __len__(self) -> int:
        return len(self.rows)

    def __add__(self, other: Labelled) -> Labelled:
        return Labelled(self.rows + other.rows, self.labels + other.labels)

    def take(self, index: Sequence[int]) -> Labelled:
        """The rows at ``index``, in that order."""
        return Labelled(tuple(self.rows[i] for i in index), tuple(self.labels[i] for i in index))

    def sample(self, n: int, seed: int = 0) -> Labelled:
        """At most ``n`` rows, a seeded uniform sample (all of them when there are fewer)."""
        if len(self) <= n:
            return self
        return self.take(sorted(np.random.default_rng(seed).choice(len(self), n, replace=False)
                                .tolist()))

    def minus(self, other: Labelled) -> Labelled:
        """These rows without those in ``other``, compared by content (a multiset difference:
        a row twice here and once there stays once). Numbers compare as float32, as the model
        sees them."""
        drop = Counter(_key(r, y) for r, y in zip(other.rows, other.labels))
        keep: list[int] = []
        for i, (r, y) in enumerate(zip(self.rows, self.labels)):
            k = _key(r, y)
            if drop[k] > 0:
                drop[k] -= 1
            else:
                keep.append(i)
        return self.take(keep)

    def write_csv(self, path: Path, columns: Sequence[str], target: str) -> Path:
        """Write a CSV with ``columns`` then ``target``: what ``train(data=...)`` reads back."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow([*columns, target])
            for row, label in zip(self.rows, self.labels):
                out.writerow([*(_cell(row.get(c)) for c in columns), _cell(label)])
        return path

    def to_json(self) -> dict[str, Any]:
        """The holdout blob's content."""
        return {"format": HOLDOUT_FORMAT, "rows": list(self.rows), "labels": list(self.labels)}

    @classmethod
    def from_json(cls, data: Any) -> Labelled:
        """Parse a holdout blob; RegistryError for a format this release does not read."""
        found = data.get("format") if isinstance(data, Mapping) else None
        if found != HOLDOUT_FORMAT:
            raise RegistryError(f"holdout format {found!r} is not {HOLDOUT_FORMAT}: upgrade "
                                "hybridml, or retrain the version", field="holdout")
        return cls(tuple(data["rows"]), tuple(data["labels"]))


def from_dataset(ds: Dataset, index: np.ndarray | Sequence[int]) -> Labelled:
    """The rows of ``ds`` at ``index`` as raw values by name, labelled with class names."""
    idx = np.asarray(index, dtype=np.int64)
    num_names, cat_names = ds.schema.numeric_names, ds.schema.categorical_names
    rows: list[Row] = []
    for r in idx.tolist():
        row: Row = {n: _number(ds.num[r, j]) for j, n in enumerate(num_names)}
        row.update({n: str(ds.cat[r, j]) for j, n in enumerate(cat_names)})
        rows.append(row)
    y = ds.y[idx]
    labels = [ds.classes[int(v)] for v in y] if ds.classes is not None else \
        [float(v) for v in y]
    return Labelled(tuple(rows), tuple(labels))


def store_holdout(registry: Registry, ds: Dataset, index: np.ndarray, seed: int = 0
                  ) -> dict[str, Any]:
    """Store the test rows ``index`` of ``ds`` (sampled down to :data:`HOLDOUT_MAX_ROWS`) as a
    blob; return the reference kept in the version's metadata."""
    held = from_dataset(ds, index).sample(HOLDOUT_MAX_ROWS, seed)
    sha, size = registry.put_blob(_holdout_bytes(held))
    return {"sha256": sha, "size": size, "rows": len(held)}


def holdout_ref(registry: Registry, name: str, version: int) -> dict[str, Any] | None:
    """The holdout reference a fine-tune of ``version`` inherits: the version's own, else its
    rebuilt holdout stored now; None when it has none (the fine-tune then stores its own)."""
    ref = registry.metadata(name, version).get("holdout")
    if isinstance(ref, Mapping) and isinstance(ref.get("sha256"), str):
        return dict(ref)
    held = holdout(registry, name, version)
    if held is None:
        return None
    sha, size = registry.put_blob(_holdout_bytes(held))
    return {"sha256": sha, "size": size, "rows": len(held)}


def holdout(registry: Registry, name: str, version: int) -> Labelled | None:
    """The holdout of ``version`` of ``name``: its stored blob, else rebuilt from its line's
    training source; None when neither is possible (the gate then says so)."""
    ref = registry.metadata(name, version).get("holdout")
    if isinstance(ref, Mapping) and isinstance(ref.get("sha256"), str):
        return Labelled.from_json(json.loads(registry.blob_path(ref["sha256"]).read_bytes()))
    base = base_of(registry.versions(name), version)
    manifest = registry.manifest(name, base)
    training = manifest.get("training", {})
    try:
        ds = load_source(training, InputSchema.from_json(manifest["schema"]),
                         manifest["output"]["task"])
    except DataError as exc:
        log.warning("cannot rebuild the holdout of %s v%d: %s", name, version, exc.message)
        return None
    if ds is None or ds.sha256 != training.get("data_sha256"):
        log.warning("cannot rebuild the holdout of %s v%d: its training data %s is gone or "
                    "changed", name, version, training.get("source"))
        return None
    return from_dataset(ds, split(ds, int(training.get("split", {}).get("seed", 0))).test)


def load_source(training: Mapping[str, Any], schema: InputSchema, task: str
                ) -> Dataset | None:
    """Load the data a version was trained on (``manifest["training"]``) with the version's
    column kinds; None when the file is gone. Other columns of the CSV are dropped."""
    source, target = str(training.get("source", "")), str(training.get("target", ""))
    if source.startswith("sklearn:"):
        return load_builtin(source.partition(":")[2], task=task)
    path = Path(source)
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8-sig") as fh:
        header = [h.strip() for h in next(csv.reader(fh), [])]
    keep = {*schema.names, target}
    return load_csv(path, target, task=task, categorical=schema.categorical_names,
                    numeric=schema.numeric_names, drop=[h for h in header if h not in keep])


def feature_kinds(schema: InputSchema) -> dict[str, list[str]]:
    """``{"categorical": [...], "numeric": [...]}``: the kinds to force when training on a CSV
    written from rows, so a column keeps the kind the parent gave it."""
    return {"categorical": [f.name for f in schema.features if f.kind != NUMERIC],
            "numeric": [f.name for f in schema.features if f.kind == NUMERIC]}


# -------------------------------------------------------------------------------- internals
def _holdout_bytes(held: Labelled) -> bytes:
    return json.dumps(held.to_json(), separators=(",", ":"), allow_nan=False).encode("utf-8")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> float | None:
    """A float32 cell as the shortest float that round-trips it; None for NaN."""
    v = np.float32(value)
    return None if np.isnan(v) else float(str(v))


def _norm(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return None if text.lower() in MISSING_TOKENS else text
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float, np.number)):
        return _number(value)
    return str(value)


def _key(row: Mapping[str, Any], label: Any) -> tuple[Any, ...]:
    return (*((k, _norm(row[k])) for k in sorted(row)), str(label))


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


__all__ = ["HOLDOUT_MAX_ROWS", "Labelled", "feature_kinds", "from_dataset", "holdout",
           "holdout_ref", "load_source", "store_holdout"]
