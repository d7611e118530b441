"""The compression guard: smaller candidates for every family; the smallest within tolerance ships.

:func:`compress` extends the quantization guard (:mod:`hybridml.cloud.quantize`) from MLPs to
every family. It builds the candidates that apply to the exported graph and, given a
:class:`~hybridml.cloud.compress_refit.Refit`, to the fitted pipeline:

==============  ==================================================================  ===========
variant         what                                                                families
==============  ==================================================================  ===========
fp32            the exported graph, unchanged (the yardstick)                        all
int8_dynamic    weights uint8; activations per call (``quantize``)                   mlp
int8_static     QDQ, calibrated on training rows (``quantize``)                      mlp
trees_v5        opset-5 ``TreeEnsemble``: uint8 modes, leaves apart (exact)           rf, gb, hgb
pruned          the first ``k`` trees of the forest (+ larger leaves, refitted)      rf
distilled       hgb fitted to the forest's predictions on the training rows          rf
pruned_v5, ...  a refitted candidate rewritten as ``trees_v5``                       rf
==============  ==================================================================  ===========

Each is scored on the test rows with the task's metric and judged by the same rule as before
(:func:`hybridml.cloud.quantize.decide`): a drop over the tolerance rejects it; of the rest,
fp32 included, the smallest ships. Refitted candidates first pass the export's parity gate, and
the ``trees_v5`` rewrite must reproduce fp32's outputs on the test rows. Each candidate records
its size, metric, latency and, when :func:`compress` measures it, the peak RSS a process gains
by loading it and predicting one row (:mod:`hybridml.cloud.compress_rss`).

``mode``: ``off`` ships fp32; ``auto`` (default) builds the cheap candidates (int8, the v5
rewrite) always, and the refitted ones (pruned, distilled) and the RSS measurements only for
models over :data:`BIG_BYTES`, where they matter and pay for their time; ``aggressive`` does
everything for every model.

onnxruntime: a candidate that needs a newer onnxruntime than the edge's lowest supported one
(``min_onnxruntime``; by default ``$HYBRIDML_MIN_ONNXRUNTIME``, else the ``onnxruntime>=``
floor of this package's own requirements) is recorded as ``not_applicable`` and never built,
so whatever ships runs on every onnxruntime the edge supports. ``requires_onnxruntime`` in
the report names the chosen one's need (``None``: any), and the edge refuses a model its
onnxruntime is too old for before fetching it (:mod:`hybridml.edge.compat`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from hybridml.edge.compat import version_tuple
from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, QuantizationError
from hybridml.shared.schema import EncodedBatch, InputSchema

from . import compress_refit, compress_rss, compress_trees
from .compress_refit import Refit, Skip
from .export import PROB_TOLERANCE, REG_RTOL
from .quantize import (
    Candidate,
    QuantizationReport,
    check_args,
    decide,
    int8_candidates,
    measure,
    short_error,
)

log = logging.getLogger("hybridml.cloud.compress")

MODES = ("off", "auto", "aggressive")
VARIANTS = ("fp32", "int8_dynamic", "int8_static", "trees_v5", "pruned", "pruned_v5",
            "distilled", "distilled_v5")
BIG_BYTES = 1_000_000
FALLBACK_ONNXRUNTIME = "1.17"
FLOOR_ENV = "HYBRIDML_MIN_ONNXRUNTIME"
_V5 = "ai.onnx.ml opset-5 TreeEnsemble: uint8 node modes, interior nodes and leaves apart"


@dataclass(frozen=True)
class CompressionReport:
    """The guard's verdict (a :class:`QuantizationReport`) plus what compression adds."""

    guard: QuantizationReport
    mode: str
    min_onnxruntime: str
    requires_onnxruntime: str | None

    @property
    def chosen(self) -> str:
        """The variant that ships."""
        return self.guard.chosen

    def to_json(self) -> dict[str, Any]:
        """The manifest's ``compression`` block; a superset of a quantization report."""
        return {**self.guard.to_json(), "mode": self.mode,
                "min_onnxruntime": self.min_onnxruntime,
                "requires_onnxruntime": self.requires_onnxruntime}

    @classmethod
    def from_json(cls, data: Any) -> CompressionReport:
        """Parse :meth:`to_json` output, or an old manifest's ``quantization`` block."""
        guard = QuantizationReport.from_json(data)
        return cls(guard, str(data.get("mode", "auto")),
                   str(data.get("min_onnxruntime") or FALLBACK_ONNXRUNTIME),
                   data.get("requires_onnxruntime"))

    def to_table(self) -> str:
        """A fixed-width table of the candidates, for the CLI."""
        need = self.requires_onnxruntime or self.min_onnxruntime
        return (self.guard.to_table("compression")
                + f"\n  mode {self.mode}; runs on onnxruntime >= {need}")


def report_of(manifest: Mapping[str, Any]) -> CompressionReport:
    """The compression report of a manifest; old manifests have only ``quantization``."""
    block = manifest.get("compression") or manifest.get("quantization")
    if block is None:
        raise QuantizationError("the manifest has neither a compression nor a quantization "
                                "report; retrain the version", field="compression")
    return CompressionReport.from_json(block)


def edge_onnxruntime_floor() -> str:
    """The lowest onnxruntime the edge supports: ``$HYBRIDML_MIN_ONNXRUNTIME`` if set (a fleet
    whose devices all run a newer one), else this package's ``onnxruntime>=`` requirement."""
    if os.environ.get(FLOOR_ENV):
        return os.environ[FLOOR_ENV].strip()
    from packaging.requirements import Requirement  # onnxruntime depends on packaging

    try:
        for text in metadata.requires("hybridml") or []:
            req = Requirement(text)
            if req.name == "onnxruntime" and req.marker is None:
                floors = [s.version for s in req.specifier if s.operator == ">="]
                if floors:
                    return floors[0]
    except metadata.PackageNotFoundError:
        pass
    return FALLBACK_ONNXRUNTIME


@dataclass(frozen=True)
class Compressed:
    """What ships: the variant, its bytes, the report, and, when a refitted candidate won, its
    fitted pipeline (the version's scikit-learn model from then on), its family name and its
    own unrewritten export (the cloud serves that one)."""

    variant: str
    data: bytes
    report: CompressionReport
    pipeline: Pipeline | None = None
    family: str | None = None
    fp32: bytes | None = None


def compress(fp32: bytes, schema: InputSchema, task: str, *, calibration: EncodedBatch,
             test: EncodedBatch, y_test: np.ndarray, tolerance: float | None = None,
             mode: str = "auto", refit: Refit | None = None,
             min_onnxruntime: str | None = None) -> Compressed:
    """Build the candidates, judge them on ``test`` and return what ships.

    ``tolerance`` is the quantization guard's (absolute accuracy drop, default 0.005; relative
    RMSE rise, default 0.01). Raises :class:`ConfigError` for an unknown mode or task or a bad
    tolerance, :class:`DataError` for an unusable test split.
    """
    if mode not in MODES:
        raise ConfigError(f"compress mode {mode!r}: use one of {', '.join(MODES)}",
                          field="compress")
    metric, tol = check_args(task, (), tolerance, test, y_test)
    floor = min_onnxruntime or edge_onnxruntime_floor()
    y_true = np.asarray(y_test)
    base = measure("fp32", fp32, schema, task, test, y_true)
    built: dict[str, bytes] = {"fp32": fp32}
    measured: list[Candidate] = [base]
    preprocess = "not run: compression off"
    pipes: dict[str, Pipeline] = {}
    if mode != "off":
        found, ints, preprocess = int8_candidates(fp32, schema, task, calibration=calibration,
                                                  test=test, y_true=y_true)
        measured += found
        built.update(ints)
        heavy = mode == "aggressive" or len(fp32) > BIG_BYTES
        build = _Builder(schema, task, test, y_true, floor, built, measured)
        pipes = build.pipes
        build.trees_v5("trees_v5", fp32)
        if heavy and refit is not None and compress_refit.is_forest(refit.pipe):
            build.refitted("pruned", lambda: compress_refit.pruned_forest(refit, task, tol),
                           refit)
            build.refitted("distilled", lambda: compress_refit.distilled(refit, task), refit)
        if heavy:
            rss = compress_rss.peak_rss_kb(
                {c.variant: built[c.variant] for c in measured if c.variant in built},
                test.take([0]).feeds(schema))
            measured = [replace(c, rss_kb=rss.get(c.variant)) for c in measured]
    guard = decide(metric, tol, measured[0], measured, preprocess)
    chosen = guard.candidate(guard.chosen)
    report = CompressionReport(guard, mode, floor, chosen.requires_onnxruntime)
    log.info("compression: chose %s (%d bytes of %d fp32) by %s", guard.chosen,
             len(built[guard.chosen]), len(fp32), metric)
    root = guard.chosen.removesuffix("_v5")
    won = pipes.get(root)
    if won is None:
        return Compressed(guard.chosen, built[guard.chosen], report)
    return Compressed(guard.chosen, built[guard.chosen], report, won,
                      compress_refit.family_of(won), built[root])


class _Builder:
    """Builds, checks and measures candidates into ``built``/``measured``."""

    def __init__(self, schema: InputSchema, task: str, test: EncodedBatch, y_true: np.ndarray,
                 floor: str, built: dict[str, bytes], measured: list[Candidate]) -> None:
        self.schema, self.task, self.test, self.y_true = schema, task, test, y_true
        self.floor, self.built, self.measured = floor, built, measured
        self.pipes: dict[str, Pipeline] = {}

    def trees_v5(self, variant: str, source: bytes, note: str = "") -> None:
        """The opset-5 rewrite of ``source``, if the edge's onnxruntime floor runs it."""
        settings = _V5 + (f"; of {note}" if note else "")
        need = compress_trees.REQUIRES_ONNXRUNTIME
        if not compress_trees.has_trees(source):
            return
        if version_tuple(self.floor) < version_tuple(need):
            self.measured.append(Candidate(
                variant, "not_applicable", f"needs onnxruntime >= {need}; the edge supports "
                f">= {self.floor} (raise the floor in pyproject.toml to offer it)",
                settings=settings, requires_onnxruntime=need))
            return
        try:
            data = compress_trees.to_tree_ensemble(source)
        except compress_trees.NotApplicable as exc:
            self.measured.append(Candidate(variant, "not_applicable", str(exc),
                                           settings=settings, requires_onnxruntime=need))
            return
        problem = _same_outputs(source, data, self.schema, self.task, self.test)
        if problem:
            self.measured.append(Candidate(variant, "failed", problem, size=len(data),
                                           settings=settings, requires_onnxruntime=need))
            return
        self._add(variant, data, settings, need)

    def refitted(self, variant: str, make: Any, refit: Refit) -> None:
        """A refitted pipeline, exported through the parity gate, then its v5 rewrite."""
        try:
            pipe, settings = make()
            data = refit.export(pipe)
        except Skip as exc:
            self.measured.append(Candidate(variant, "not_applicable", str(exc)))
            return
        except Exception as exc:  # a failed candidate is a line in the report, not a failure
            log.warning("candidate %s failed: %s", variant, exc)
            self.measured.append(Candidate(variant, "failed", short_error(exc)))
            return
        self.pipes[variant] = pipe
        self._add(variant, data, settings, None)
        self.trees_v5(f"{variant}_v5", data, variant)

    def _add(self, variant: str, data: bytes, settings: str, need: str | None) -> None:
        cand = measure(variant, data, self.schema, self.task, self.test, self.y_true, settings)
        self.built[variant] = data
        self.measured.append(replace(cand, requires_onnxruntime=need))


def _same_outputs(a: bytes, b: bytes, schema: InputSchema, task: str,
                  test: EncodedBatch) -> str:
    """Why ``b`` does not reproduce ``a`` on the test rows ("" when it does)."""
    try:
        x = ModelSession(a, schema, task).run(test)
        y = ModelSession(b, schema, task).run(test)
    except Exception as exc:
        return f"cannot run: {short_error(exc)}"
    if x.values is not None and y.values is not None:
        tol = REG_RTOL * max(1.0, float(np.abs(x.values).max(initial=0.0)))
        diff = float(np.abs(x.values - y.values).max(initial=0.0))
        return "" if diff <= tol else f"values differ from fp32 by {diff:.3g} > {tol:.3g}"
    assert x.probabilities is not None and y.probabilities is not None
    diff = float(np.abs(x.probabilities - y.probabilities).max(initial=0.0))
    if not math.isfinite(diff) or diff > PROB_TOLERANCE:
        return f"probabilities differ from fp32 by {diff:.3g} > {PROB_TOLERANCE}"
    return ""
