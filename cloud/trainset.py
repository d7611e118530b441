"""What a candidate trains on, written as a CSV under the registry.

* **Fine-tune** (v1 -> v1.1): the labelled rows that arrived since the active version was
  trained — the rows it has not seen — plus a **rehearsal** sample of the line's base
  training rows, as many as the new ones (:data:`REHEARSAL`). Continuing a model on the new
  rows alone makes it forget the old ones (catastrophic forgetting: an hgb fine-tuned on 1,200
  autumn orders lost 5 points on the spring holdout, and the gate refused it); replaying old
  rows beside the new is the standard guard. Only the base's *training* split is sampled, so
  the gate's holdout stays unseen.
* **Retrain** (v1 -> v2): the line's base data plus the new labelled rows. The base is the
  retrain the active version's line started from (:func:`hybridml.cloud.lineage.base_of`);
  its training source is read again as it is now (a bundled dataset, or the CSV it was
  trained on — for a controller's retrain, the CSV written here, so each retrain's data
  carries on into the next). Labelled rows that arrived since the base was trained within
  the policy's ``window_s`` are all kept; older rows join the base data in the **reservoir**,
  a seeded uniform sample of at most ``reservoir_rows`` rows. Without ``window_s`` every
  labelled row since the base is kept.

The CSV (``<registry>/training/<name>/<time>-<mode>.csv``) is the candidate's training source:
``train`` fingerprints it (``manifest["training"]["data_sha256"]``) like any training data,
and a later retrain reads it back. Rows are written with the parent's columns and target, and
read back with its column kinds, so a column never changes kind between versions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybridml.shared.clock import utc_iso

from .data import split
from .evidence import Telemetry, epoch, labelled_since
from .finetune import Parent
from .labelled import Labelled, from_dataset, load_source
from .lineage import base_of
from .policy import Policy
from .private import private_dir, private_file
from .registry import Registry

log = logging.getLogger("hybridml.cloud.trainset")

MIN_FINETUNE_ROWS = 20  # fewer new rows than this: auto mode retrains instead
REHEARSAL = 1.0  # old training rows replayed per new row in a fine-tune


@dataclass(frozen=True)
class TrainingSet:
    """The rows a candidate trains on, and where they came from."""

    rows: Labelled
    report: dict[str, Any] = field(default_factory=dict)

    def write(self, registry: Registry, parent: Parent, mode: str, now: float) -> Path:
        """Write the rows as the candidate's training CSV; return its path."""
        folder = private_dir(registry.root / "training" / parent.name)
        stamp = utc_iso(now).replace(":", "").replace("-", "")
        path = folder / f"{stamp}-{mode}.csv"
        n = 1
        while path.exists():
            n += 1
            path = folder / f"{stamp}-{mode}-{n}.csv"
        private_file(path)  # 0600 before any row is written, like everything in a registry
        target = str(parent.manifest.get("training", {}).get("target") or "target")
        return self.rows.write_csv(path, parent.schema.names, target)


def finetune_set(registry: Registry, parent: Parent, new: Labelled, seed: int = 0
                 ) -> TrainingSet:
    """The fine-tune's rows: the labelled rows ``parent`` has not seen, and a rehearsal sample
    of its line's base training rows (module docstring)."""
    want = math.ceil(REHEARSAL * len(new))
    old = Labelled()
    if want:
        base = base_of(registry.versions(parent.name), parent.version)
        training = registry.manifest(parent.name, base).get("training", {})
        ds = load_source(training, parent.schema, parent.task)
        if ds is not None:
            split_seed = int(training.get("split", {}).get("seed", seed))
            old = from_dataset(ds, split(ds, split_seed).train).sample(want, seed)
        else:
            log.warning("%s v%d's training data %s is gone: fine-tuning without rehearsal",
                        parent.name, base, training.get("source"))
    return TrainingSet(old + new, {"new": len(new), "rehearsal": len(old),
                                   "since": f"v{parent.version}"})


def retrain_set(registry: Registry, parent: Parent, telemetry: Telemetry, policy: Policy,
                now: float, seed: int = 0) -> TrainingSet | None:
    """The retrain's rows: the base's data and the labelled rows since the base (see the
    module docstring); None when nothing is new (no labelled rows, the source unchanged)."""
    versions = registry.versions(parent.name)
    base = base_of(versions, parent.version)
    base_manifest = registry.manifest(parent.name, base)
    created = epoch(next(v.created for v in versions if v.version == base))
    ds = load_source(base_manifest.get("training", {}), parent.schema, parent.task)
    old = from_dataset(ds, range(len(ds))) if ds is not None else Labelled()
    if ds is None:
        log.warning("%s v%d's training data %s is gone: retraining on labelled rows only",
                    parent.name, base, base_manifest.get("training", {}).get("source"))
    new = labelled_since(telemetry, parent.name, created)
    recent = new
    if policy.window_s is not None and created < now - policy.window_s:
        recent = labelled_since(telemetry, parent.name, now - policy.window_s)
    older = new.minus(recent)
    changed = ds is not None and ds.sha256 != base_manifest.get("training", {}).get("data_sha256")
    if not len(new) and not changed:
        return None
    reservoir = (old + older).sample(policy.reservoir_rows, seed)
    report = {"base": base, "source": base_manifest.get("training", {}).get("source"),
              "source_changed": changed, "new": len(recent), "older_labelled": len(older),
              "reservoir": len(reservoir), "reservoir_of": len(old) + len(older),
              "window_s": policy.window_s}
    return TrainingSet(reservoir + recent, report)


__all__ = ["MIN_FINETUNE_ROWS", "TrainingSet", "finetune_set", "retrain_set"]
