"""The memory budget: refuse a version that cannot fit before it is fetched (docs/device.md §3).

A device with 512 MB that activates a model it cannot hold is killed by the OOM killer at its
next prediction, and keeps being killed at every restart. With a budget
(``HYBRIDML_MEMORY_BUDGET_MB``, or ``hybridml-edge sync|agent --memory-budget-mb``), ``sync``
estimates the resident memory a version needs from its manifest alone, before anything is
downloaded, and refuses it with :class:`~hybridml.shared.errors.ResourceError`
(``memory_budget``) when the estimate exceeds the budget; the active version keeps serving.

The estimate, in MiB::

    needed = RUNTIME_MB + CELL_BYTES * chunk_rows * n_features / 2**20
             + COSTS[family].fixed_mb + COSTS[family].per_mb * model_MB
             + TABLE_SHARE * table_MB

``RUNTIME_MB`` is Python, numpy, onnxruntime and the edge; the ``CELL_BYTES`` term is one
chunk of ``predict --input`` in flight (8,192 rows as parsed JSON or CSV text, encoded and
answered, ~100 bytes a cell): together the peak of ``hybridml-edge predict --input`` with a
tiny model, measured at 108-114 MB with 5-6 features and ~151 MB with 64.
``COSTS`` is what a family adds on top, measured with an 8,192-row batch per family: per MiB
of ONNX file (an onnxruntime session holds the initializers; tree ensembles unpack their
nodes; int8 MLP weights are dequantized to float32) and a fixed working set (an MLP's
activations for a chunk: ~35 MB with hidden layers of 512 and 256 units; wider layers need
more, and a smaller ``--chunk-rows`` less). The table is memory-mapped: its pages are
file-backed, clean, and dropped by the kernel under pressure, but a long batch of lookups
brings nearly all of them into RSS (a million rows scored against a 1M-row table of ~38 MB:
+36 MB peak), so it counts whole (``TABLE_SHARE``).
Measured on x86-64 with onnxruntime 1.32 (``benchmarks/small_device.py`` reports the
estimate beside the measured peak per family); an arm64 device differs by a few MB.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hybridml.shared.errors import ConfigError, ResourceError
from hybridml.shared.manifest import Manifest
from hybridml.shared.settings import load_env

from .batch import DEFAULT_CHUNK_ROWS

log = logging.getLogger("hybridml.edge.budget")

ENV = "HYBRIDML_MEMORY_BUDGET_MB"
RUNTIME_MB = 110.0  # the interpreter, numpy, onnxruntime and the edge, predicting
CELL_BYTES = 100.0  # per cell of the chunk in flight (measured ~83 with JSON lines)


@dataclass(frozen=True)
class Cost:
    """What a model family adds to :data:`RUNTIME_MB`: ``fixed_mb`` plus ``per_mb`` per MiB
    of ONNX file."""

    fixed_mb: float
    per_mb: float


# Measured peak RSS over a 7 KB logistic regression, 8,192-row batches (rounded up):
# hgb 1.2 MB file +13.8 MB; rf 0.45 MB +4.8 MB; MLP (512, 256) int8 0.16 MB +34.9 MB.
COSTS: dict[str, Cost] = {"logreg": Cost(0.0, 2.0), "hgb": Cost(1.0, 12.0),
                          "rf": Cost(1.0, 12.0), "mlp": Cost(35.0, 4.0)}
DEFAULT_COST = Cost(35.0, 12.0)  # a family not measured: the most expensive of each term
TABLE_SHARE = 1.0  # of the table file: resident once lookups have touched it
_MIB = float(1 << 20)


@dataclass(frozen=True)
class Estimate:
    """What a version needs, in MiB, and how it was reckoned."""

    family: str
    model_mb: float
    table_mb: float
    chunk_mb: float
    cost: Cost
    needed_mb: float

    def formula(self) -> str:
        """The estimate spelled out, for messages."""
        return (f"{RUNTIME_MB:.0f} MB runtime + {self.chunk_mb:.0f} MB for a chunk of rows + "
                f"{self.family} model {self.cost.fixed_mb:g} MB + {self.cost.per_mb:g} x "
                f"{self.model_mb:.2f} MB file + table {TABLE_SHARE:g} x {self.table_mb:.2f} MB")


@dataclass(frozen=True)
class Budget:
    """The device's memory budget: ``mb`` MiB (``$HYBRIDML_MEMORY_BUDGET_MB``), or None for
    no budget."""

    mb: float | None = None

    def __post_init__(self) -> None:
        if self.mb is not None and not self.mb > 0:
            raise ConfigError(f"memory budget {self.mb:g} MB: use a positive number of MB, "
                              f"e.g. {ENV}=256", field="memory_budget_mb")


def budget_mb(value: float | None = None) -> float | None:
    """The budget in MiB: ``value`` if given, else ``$HYBRIDML_MEMORY_BUDGET_MB``, else None
    (no budget); :class:`ConfigError` for a value that is not a positive number."""
    return load_env(Budget, prefix="HYBRIDML_MEMORY_BUDGET_", mb=value).mb


def unpacked_size(manifest: Manifest, size: int) -> int:
    """The model file's size as the factors of :data:`COSTS` count it: an opset-5
    ``TreeEnsemble`` graph (compression variant ``*_v5``) stores its nodes 3x more compactly
    than the graph it was rewritten from, but onnxruntime unpacks both to the same memory, so
    it counts at the size of that graph (in the manifest's compression report)."""
    block = manifest.raw.get("compression")
    if not isinstance(block, dict) or not str(block.get("chosen", "")).endswith("_v5"):
        return size
    chosen = str(block["chosen"])
    base = "fp32" if chosen == "trees_v5" else chosen[: -len("_v5")]
    for c in block.get("candidates") or []:
        if isinstance(c, dict) and c.get("variant") == base and isinstance(c.get("size"), int):
            return max(size, int(c["size"]))
    return size


def estimate(manifest: Manifest, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Estimate:
    """The resident memory ``manifest``'s version needs, scoring ``chunk_rows`` rows at a
    time (see the module docstring)."""
    model = manifest.artifact("model")
    table = manifest.artifact("table")
    family = str((manifest.raw.get("model") or {}).get("family") or "unknown")
    cost = COSTS.get(family, DEFAULT_COST)
    model_mb = unpacked_size(manifest, model.size if model is not None else 0) / _MIB
    table_mb = (table.size if table is not None else 0) / _MIB
    chunk_mb = CELL_BYTES * chunk_rows * len(manifest.schema.names) / _MIB
    needed = RUNTIME_MB + chunk_mb + cost.fixed_mb + cost.per_mb * model_mb + \
        TABLE_SHARE * table_mb
    return Estimate(family, model_mb, table_mb, chunk_mb, cost, round(needed, 1))


def check(manifest: Manifest, budget: float | None = None) -> Estimate | None:
    """Raise :class:`ResourceError` when ``manifest``'s version needs more than the budget
    (``budget`` MiB, else ``$HYBRIDML_MEMORY_BUDGET_MB``); the estimate, or None without a
    budget."""
    limit = budget_mb(budget)
    if limit is None:
        return None
    est = estimate(manifest)
    if est.needed_mb > limit:
        raise ResourceError(
            f"{manifest.name} v{manifest.version} needs about {est.needed_mb:.0f} MB of memory "
            f"({est.formula()}), more than the {limit:g} MB memory budget "
            f"(--memory-budget-mb or ${ENV}); not downloaded "
            "or activated, the active version keeps serving. Raise the budget if this device "
            "has the memory, or publish a smaller model for it",
            name=manifest.name, version=manifest.version, needed_mb=est.needed_mb,
            available_mb=limit, family=est.family)
    log.info("%s v%s needs about %.0f MB of the %g MB budget", manifest.name,
             manifest.version, est.needed_mb, limit)
    return est


__all__ = ["CELL_BYTES", "COSTS", "DEFAULT_COST", "ENV", "RUNTIME_MB", "TABLE_SHARE", "Budget",
           "Cost", "Estimate", "budget_mb", "check", "estimate", "unpacked_size"]
