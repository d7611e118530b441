"""Stateful training: continue a registered version's model on new data (v1 -> v1.1).

How each family continues (:data:`METHODS`):

* ``partial_fit`` (mlp, sgd): :data:`FINETUNE_EPOCHS` passes of ``partial_fit`` over the new rows.
* ``boosting_rounds`` (gb, hgb): ``warm_start`` adds :data:`GROWTH` more boosting rounds (at
  least :data:`MIN_ADDED`), fitted to the residuals of the whole ensemble on the new rows.
* ``added_trees`` (rf): ``warm_start`` adds trees fitted on the new rows only; **the parent's
  trees are unchanged**, and the manifest says so (``training.finetune.note``).
* logreg cannot be continued: ``mode="finetune"`` refuses it, ``mode="auto"`` retrains.

The parent's fitted preprocessing (imputer medians, scaler, one-hot categories) is kept, so
the schema's categories are the parent's; numeric ranges widen to cover the new rows.

Mode ``auto`` fine-tunes when the family continues, the columns and task are the parent's and
the new rows hold no class the parent does not know (and, for tree ensembles, every class it
does know: scikit-learn re-reads the classes from the new rows); otherwise it retrains from
scratch with the line's family and parameters. The choice and its reason are recorded in
``manifest["training"]["mode"]``.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.pipeline import Pipeline

from hybridml.shared.errors import ConfigError, DataError, HybridMLError
from hybridml.shared.schema import NUMERIC, InputSchema

from . import calibration
from .data import Dataset, Split, fit_schema
from .lineage import base_of
from .models import combine, family
from .policy import MODES
from .quality import QualityOptions
from .registry import Registry

FINETUNE_EPOCHS = 5
GROWTH = 0.25  # boosting rounds or trees added, as a share of the parent's
MIN_ADDED = 5
# Families that continue with warm_start: the method and the estimator parameter that grows.
_WARM_START = {"gb": ("boosting_rounds", "n_estimators"), "hgb": ("boosting_rounds", "max_iter"),
               "rf": ("added_trees", "n_estimators")}
# Parameters a retrain must not inherit from its line: the seed is the caller's, and a
# warm-started parent's flag would make a fresh fit continue nothing.
_NOT_INHERITED = ("warm_start", "random_state")
Progress = Callable[[str], None]


def method(family_name: str) -> str | None:
    """How ``family_name`` continues training: ``partial_fit``, ``boosting_rounds``,
    ``added_trees``, or None when it cannot."""
    fam = family(family_name)
    if fam.finetune:
        return "partial_fit"
    return _WARM_START[fam.name][0] if fam.name in _WARM_START else None


@dataclass(frozen=True)
class Parent:
    """The registered version a candidate continues or replaces."""

    name: str
    version: int
    manifest: dict[str, Any]
    metadata: dict[str, Any]

    @classmethod
    def load(cls, registry: Registry, ref: str) -> Parent:
        """``ref`` is ``NAME:VERSION`` (an alias or ``latest`` works as the version)."""
        pname, _, pver = ref.partition(":")
        if not pname or not pver:
            raise ConfigError(f"--finetune-from {ref!r}: use NAME:VERSION, e.g. eta:1",
                              field="finetune_from")
        version = registry.resolve(pname, pver)
        return cls(pname, version, registry.manifest(pname, version),
                   registry.metadata(pname, version))

    @property
    def family(self) -> str:
        """The parent's model family (``hgb``, ``mlp``, ...)."""
        return str(self.metadata.get("family") or self.manifest["model"]["family"])

    @property
    def schema(self) -> InputSchema:
        """The parent's input schema."""
        return InputSchema.from_json(self.manifest["schema"])

    @property
    def task(self) -> str:
        """The parent's task."""
        return str(self.manifest["output"]["task"])

    @property
    def quality(self) -> QualityOptions:
        """The quality options the parent was trained with (a retrain of its line asks for
        the same; the defaults for a version from before they were recorded)."""
        return QualityOptions.from_json(self.manifest.get("training", {}).get("quality"))

    @property
    def classes(self) -> list[Any] | None:
        """The parent's class names (None for regression)."""
        return self.manifest["output"].get("classes") if self.task != "regression" else None

    def retrain_params(self, registry: Registry) -> dict[str, Any]:
        """The estimator parameters of the line's base retrain (fine-tunes grow ensembles;
        a retrain starts again from the base's size), without its seed or warm start."""
        base = base_of(registry.versions(self.name), self.version)
        params = registry.metadata(self.name, base).get("params", {})
        return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()
                if k not in _NOT_INHERITED}


@dataclass(frozen=True)
class ModeChoice:
    """Fine-tune or retrain, what was asked for, and why."""

    mode: str
    requested: str
    reason: str

    def to_json(self) -> dict[str, str]:
        """``manifest["training"]["mode"]``."""
        return {"mode": self.mode, "requested": self.requested, "reason": self.reason}


def obstacle(parent: Parent, *, features: Sequence[tuple[str, str]], task: str,
             classes: Sequence[Any] | None) -> HybridMLError | None:
    """Why new data with these columns, task and classes cannot fine-tune ``parent`` (the
    error ``mode="finetune"`` raises), or None when it can."""
    ref = f"{parent.name}:{parent.version}"
    how = method(parent.family)
    if how is None:
        return ConfigError(f"{ref} is a {parent.family} model, which cannot be fine-tuned (no "
                           "partial_fit or warm_start); fine-tune an mlp, sgd, gb, hgb or rf "
                           "model, or retrain from scratch", field="finetune_from")
    if (calibrated := calibration.finetune_obstacle(parent.manifest, ref)) is not None:
        return calibrated
    known = {str(c) for c in parent.classes or ()}
    seen = {str(c) for c in classes or ()}
    # Rows holding only some of a multiclass parent's classes read as binary: that is fine.
    if task != parent.task and not (parent.classes and classes and seen <= known):
        return DataError(f"the new data is {task} but {ref} is {parent.task}", field="task")
    mine = [(f.name, f.kind) for f in parent.schema.features]
    if list(features) != mine:
        return DataError(f"the new data's columns differ from {ref}'s schema "
                         f"({', '.join(n for n, _ in mine)}); fine-tuning needs the same "
                         "columns", field="schema")
    if parent.classes is not None and classes is not None:
        unknown = sorted(seen - known)
        if unknown:
            return DataError(f"the new data has classes {unknown} that {ref} does not know; "
                             "retrain from scratch to add classes", field="target")
        absent = sorted(known - seen)
        if absent and how != "partial_fit":
            return DataError(f"the new data lacks classes {absent} of {ref}; {how} needs "
                             "every class in the new rows (scikit-learn re-reads the classes "
                             "from them)", field="target")
    return None


def choose_mode(requested: str, parent: Parent, *, features: Sequence[tuple[str, str]],
                task: str, classes: Sequence[Any] | None) -> ModeChoice:
    """Resolve ``auto``: fine-tune when :func:`obstacle` finds nothing, else retrain (with the
    obstacle as the reason). ``finetune`` raises the obstacle instead."""
    if requested not in MODES:
        raise ConfigError(f"mode {requested!r}: use one of {', '.join(MODES)}", field="mode")
    if requested == "retrain":
        return ModeChoice("retrain", requested, "retrain requested")
    problem = obstacle(parent, features=features, task=task, classes=classes)
    if problem is None:
        return ModeChoice("finetune", requested, f"{parent.family} continues by "
                          f"{method(parent.family)} and the schema is unchanged")
    if requested == "finetune":
        raise problem
    return ModeChoice("retrain", requested, problem.message)


@dataclass
class Continued:
    """A fine-tuned pipeline, its widened schema and the record for the manifest."""

    pipe: Pipeline
    schema: InputSchema
    record: dict[str, Any]


def continue_training(registry: Registry, parent: Parent, ds: Dataset, sp: Split,
                      say: Progress) -> Continued:
    """Continue ``parent``'s model on the training rows of ``ds``.

    For classifiers ``ds.y``, ``ds.classes`` and ``ds.task`` become the parent's in place (the
    shipped model's outputs keep the parent's meaning, also when the new rows hold only some
    of its classes).
    """
    how = method(parent.family)
    if how is None:  # choose_mode refuses this first; kept for direct callers
        raise ConfigError(f"{parent.family} models cannot be fine-tuned", field="mode")
    classes = parent.classes
    if classes is not None:
        assert ds.classes is not None
        names = [str(c) for c in classes]
        remap = np.array([names.index(str(c)) for c in ds.classes], dtype=np.int64)
        ds.y = remap[ds.y]
        ds.classes, ds.task = list(classes), parent.task
    pipe: Pipeline = pickle.loads(
        registry.blob_path(str(parent.metadata["sklearn_sha256"])).read_bytes())
    xn, xc, y = ds.take(sp.train)
    xt = pipe.steps[0][1].transform(combine(xn, xc))
    est = pipe.steps[-1][1]
    ref = f"{parent.name}:{parent.version}"
    if how == "partial_fit":
        say(f"fine-tuning {ref} ({parent.family}) for {FINETUNE_EPOCHS} epochs on {len(y)} rows")
        labels = np.arange(len(classes)) if classes is not None else None
        for _ in range(FINETUNE_EPOCHS):
            if labels is not None:
                est.partial_fit(xt, y, classes=labels)
            else:
                est.partial_fit(xt, y)
        record: dict[str, Any] = {"method": how, "epochs": FINETUNE_EPOCHS,
                                  "note": "every weight was updated on the new rows"}
    else:
        record = _warm_start(est, parent.family, xt, y, classes, ref, say)
    record.update({"from": parent.version, "rows": len(y)})
    return Continued(pipe, widen(parent.schema, xn, xc), record)


def widen(schema: InputSchema, num: np.ndarray, cat: np.ndarray) -> InputSchema:
    """The parent's schema (its categories: the encoder is the parent's) with numeric ranges
    widened to cover ``num``."""
    wider = fit_schema(schema.names, [f.kind for f in schema.features], num, cat)
    return InputSchema(tuple(
        f if f.kind != NUMERIC else type(f)(f.name, f.kind, _min(f.min, w.min), _max(f.max, w.max))
        for f, w in zip(schema.features, wider.features)))


# -------------------------------------------------------------------------------- internals
def _warm_start(est: Any, family_name: str, xt: np.ndarray, y: np.ndarray,
                classes: list[Any] | None, ref: str, say: Progress) -> dict[str, Any]:
    how, param = _WARM_START[family_name]
    if classes is not None and set(np.unique(y).tolist()) != set(range(len(classes))):
        # scikit-learn would re-read fewer classes from y: the forest would silently change
        # its outputs, and gradient boosting has crashed the process outright.
        raise DataError(f"the new training rows lack some classes of {ref}; {how} needs every "
                        "class in them: add rows of each class, or retrain", field="target")
    before = int(getattr(est, "n_iter_", None) or len(est.estimators_))
    added = max(MIN_ADDED, math.ceil(before * GROWTH))
    unit = "trees" if how == "added_trees" else "boosting rounds"
    say(f"fine-tuning {ref} ({family_name}): adding {added} {unit} to {before} on "
        f"{len(y)} rows")
    est.set_params(warm_start=True, **{param: before + added})
    est.fit(xt, y)
    est.set_params(warm_start=False)  # the pickle is an ordinary fitted model again
    after = int(getattr(est, "n_iter_", None) or len(est.estimators_))
    if how == "added_trees":
        note = (f"the parent's {before} trees are unchanged; {after - before} trees were added, "
                "fitted on the new rows only")
    else:
        note = (f"{after - before} boosting rounds were added on the new rows, correcting the "
                f"parent's {before}; those rounds are unchanged")
    return {"method": how, "before": before, "added": after - before, "total": after,
            "note": note}


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


__all__ = ["FINETUNE_EPOCHS", "GROWTH", "MIN_ADDED", "Continued", "ModeChoice",
           "Parent", "choose_mode", "continue_training", "method", "obstacle", "widen"]
