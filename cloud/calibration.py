"""Probability calibration (``train --calibrate``) and the calibration record of a version.

:func:`calibrate` wraps a pipeline's estimator in ``CalibratedClassifierCV(est, method,
cv=3)`` (the ensemble of three folds, scikit-learn's default) when asked: ``sigmoid``,
``isotonic``, or ``auto`` (isotonic with at least :data:`AUTO_ISOTONIC_ROWS` training rows, else
sigmoid: isotonic regression overfits small calibration folds). Every family of
:mod:`hybridml.cloud.models` converts calibrated, exactly (our converter in
:mod:`hybridml.cloud.calibrated_onnx`); regression cannot be calibrated (ConfigError).

:func:`record` is ``manifest["calibration"]`` for every classifier, calibrated or not: the
Brier score of the *shipped* ONNX model on the test split, and its reliability curve
(:func:`reliability_curve`). For a calibrated model ``brier_uncalibrated`` is the Brier score
of the same fitted folds before calibration: each fold's inner estimator's ``predict_proba``
averaged (scikit-learn, nothing refitted), so the two numbers compare like for like.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline

from hybridml.shared.errors import ConfigError

from .metrics import brier

log = logging.getLogger("hybridml.cloud.calibration")

AUTO_ISOTONIC_ROWS = 1000
CV_FOLDS = 3
BINS = 10
# Families whose calibrated form converts exactly (tests/cloud/test_converter_options.py).
CALIBRATABLE = ("gb", "hgb", "logreg", "mlp", "rf", "sgd")


@dataclass(frozen=True)
class CalibrationChoice:
    """The calibration method used, what was asked for, and why."""

    method: str
    requested: str
    reason: str

    def to_json(self) -> dict[str, str]:
        """The ``method``/``requested``/``reason`` keys of ``manifest["calibration"]``."""
        return {"method": self.method, "requested": self.requested, "reason": self.reason}


def choose(requested: str, task: str, family: str, y_train: np.ndarray) -> CalibrationChoice:
    """Resolve ``--calibrate`` for this task, family and training labels.

    Raises :class:`ConfigError` for a regression task, a family outside
    :data:`CALIBRATABLE`, or a class with fewer training rows than :data:`CV_FOLDS`.
    """
    if requested == "none":
        return CalibrationChoice("none", requested, "not requested (--calibrate none)")
    if task == "regression":
        raise ConfigError(f"--calibrate {requested}: calibration is for classifiers' "
                          "probabilities and this task is regression; drop --calibrate",
                          field="calibrate")
    if family not in CALIBRATABLE:
        raise ConfigError(f"--calibrate {requested}: the {family} family has no exact ONNX "
                          f"form when calibrated; use one of {', '.join(CALIBRATABLE)} or "
                          "--calibrate none", field="calibrate")
    _, counts = np.unique(y_train, return_counts=True)
    if counts.min() < CV_FOLDS:
        raise ConfigError(f"--calibrate {requested}: the smallest class has {counts.min()} "
                          f"training rows; {CV_FOLDS}-fold calibration needs at least "
                          f"{CV_FOLDS} of each class. Add rows or use --calibrate none",
                          field="calibrate")
    n = len(y_train)
    if requested == "auto":
        method = "isotonic" if n >= AUTO_ISOTONIC_ROWS else "sigmoid"
        rel = ">=" if method == "isotonic" else "<"
        return CalibrationChoice(method, requested,
                                 f"{n} training rows {rel} {AUTO_ISOTONIC_ROWS}: {method}")
    return CalibrationChoice(requested, requested, f"{requested} requested")


def calibrate(pipe: Pipeline, requested: str, task: str, family: str, y_train: np.ndarray,
              say: Callable[[str], None] | None = None) -> CalibrationChoice:
    """Wrap ``pipe``'s unfitted ``est`` step in ``CalibratedClassifierCV`` as :func:`choose`
    decides (in place); returns the choice. Fit parameters reach the inner estimator:
    ``CalibratedClassifierCV.fit`` passes ``sample_weight`` on, so ``est__sample_weight``
    still works, and ``est__estimator__class_weight`` sets the class weights."""
    choice = choose(requested, task, family, y_train)
    if choice.method != "none":
        est = pipe.named_steps["est"]
        pipe.set_params(est=CalibratedClassifierCV(est, method=choice.method, cv=CV_FOLDS))
        if say is not None:
            say(f"calibrating {family} with {choice.method} ({CV_FOLDS} folds): "
                f"{choice.reason}")
    return choice


def finetuned(requested: str) -> CalibrationChoice:
    """The choice of a fine-tuned version: its parent was not calibrated (see
    :func:`finetune_obstacle`), and the continued model is not either."""
    why = "fine-tuned from an uncalibrated parent"
    if requested != "none":
        why += "; --calibrate needs --mode retrain"
    return CalibrationChoice("none", requested, why)


def inner(estimator: Any) -> Any:
    """The estimator a calibration wrapper calibrates, or ``estimator`` itself."""
    if isinstance(estimator, CalibratedClassifierCV):
        return estimator.estimator
    return estimator


def is_calibrated(manifest: Mapping[str, Any]) -> bool:
    """Whether a version's model was calibrated (``manifest["calibration"]["method"]``)."""
    return str((manifest.get("calibration") or {}).get("method", "none")) != "none"


def finetune_obstacle(manifest: Mapping[str, Any], ref: str) -> ConfigError | None:
    """Why a calibrated parent cannot be fine-tuned, or None. Continuing its folds' models
    would leave the calibrators fitted to models that no longer exist; a retrain of the line
    calibrates again (the parent's ``--calibrate`` is in its quality options)."""
    if not is_calibrated(manifest):
        return None
    method = manifest["calibration"]["method"]
    return ConfigError(f"{ref} is calibrated ({method}): fine-tuning would leave its "
                       "calibrators fitted to the old model; use --mode retrain (or auto), "
                       "which calibrates again", field="finetune_from")


def reliability_curve(y: np.ndarray, proba: np.ndarray, bins: int = BINS,
                      positive: int = 1) -> dict[str, Any]:
    """The reliability curve over ``bins`` uniform bins of [0, 1], numpy only.

    Binary (``proba`` of shape ``[N, 2]``): the probability of the positive class (index
    ``positive``: ``manifest["metrics"]["positive"]``; 1 for callers from before) against
    ``y == positive``; multiclass: the top class's probability against "the top class was
    right".
    Empty bins are left out (as scikit-learn's ``calibration_curve`` does), so ``count``
    sums to ``N``. Returns ``{"mean_predicted", "fraction_positive", "count", "score",
    "bins"}`` (``score``: ``"positive"`` or ``"top"``).
    """
    p = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"proba of shape {p.shape} does not match {y.shape[0]} labels")
    if p.shape[1] == 2:
        conf, hit, score = p[:, positive], (y == positive), "positive"
    else:
        conf, hit, score = p.max(axis=1), p.argmax(axis=1) == y, "top"
    idx = np.clip((conf * bins).astype(np.int64), 0, bins - 1)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    mean_pred = np.bincount(idx, weights=conf, minlength=bins)[keep] / count[keep]
    frac = np.bincount(idx, weights=hit.astype(np.float64), minlength=bins)[keep] / count[keep]
    return {"mean_predicted": [round(float(v), 6) for v in mean_pred],
            "fraction_positive": [round(float(v), 6) for v in frac],
            "count": [int(c) for c in count[keep]], "score": score, "bins": bins}


def record(choice: CalibrationChoice, y_test: np.ndarray, shipped_proba: np.ndarray | None,
           pipe: Pipeline, x_test: np.ndarray, positive: int = 1) -> dict[str, Any]:
    """``manifest["calibration"]``: the choice, the shipped model's Brier score and reliability
    curve on the test split, and (calibrated models) the folds' uncalibrated Brier score; a
    binary task's are of the positive class, index ``positive``."""
    if shipped_proba is None:
        raise ValueError("calibration.record needs the shipped classifier's probabilities")
    out: dict[str, Any] = {**choice.to_json(),
                           "brier": round(brier(y_test, shipped_proba, positive), 6),
                           "brier_uncalibrated": None}
    est = pipe.named_steps["est"]
    if isinstance(est, CalibratedClassifierCV):
        xt = pipe[:-1].transform(x_test)
        raw = np.mean([_full_proba(cc.estimator, xt, len(est.classes_))
                       for cc in est.calibrated_classifiers_], axis=0)
        out["brier_uncalibrated"] = round(brier(y_test, raw, positive), 6)
    out["curve"] = reliability_curve(y_test, shipped_proba, positive=positive)
    return out


def describe(rec: Mapping[str, Any]) -> str:
    """One line: ``calibration: sigmoid, Brier 0.071 (uncalibrated 0.093)``."""
    line = f"calibration: {rec['method']}, Brier {rec['brier']:.3f}"
    if rec.get("brier_uncalibrated") is not None:
        line += f" (uncalibrated {rec['brier_uncalibrated']:.3f})"
    return line


def _full_proba(est: Any, x: np.ndarray, n_classes: int) -> np.ndarray:
    """``predict_proba`` spread over all ``n_classes`` (a fold may have seen fewer)."""
    p = est.predict_proba(x)
    if p.shape[1] == n_classes:
        return np.asarray(p)
    out = np.zeros((p.shape[0], n_classes))
    out[:, np.asarray(est.classes_, dtype=np.int64)] = p
    return out

