"""What a training run is asked for beyond the model: imbalance, threshold, calibration,
fairness and explanations (docs/quality.md).

:class:`QualityOptions` is one frozen value built by ``hybridml-cloud train``'s flags (or by
the Python API) and recorded in ``manifest["training"]["quality"]``, so a retrain of the line
(the controller's, or ``--finetune-from ... --mode retrain``) asks for the same things.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hybridml.shared.errors import ConfigError

CLASS_WEIGHTS = ("auto", "balanced", "none")
CALIBRATIONS = ("none", "sigmoid", "isotonic", "auto")
PRIMARIES = ("balanced_accuracy", "f1", "accuracy")
# Under this share of the training rows, the smallest class makes a binary task imbalanced;
# a task of K classes uses IMBALANCE_SHARE * 2 / K (see imbalance_limit).
IMBALANCE_SHARE = 0.20


def imbalance_limit(n_classes: int) -> float:
    """The share of the training rows under which the smallest of ``n_classes`` classes makes
    the task imbalanced: ``IMBALANCE_SHARE * 2 / K``, i.e. under 40% of a class's balanced
    share ``1 / K`` (binary: 20%; 10 classes: 4%). Raises :class:`ConfigError` for fewer than
    two classes."""
    if n_classes < 2:
        raise ConfigError(f"{n_classes} class(es): imbalance is defined for two or more "
                          "classes; check the target column", field="classes")
    return IMBALANCE_SHARE * 2.0 / n_classes


def is_imbalanced(counts: Sequence[int] | Any) -> bool:
    """The one definition of an imbalanced task from its training rows per class
    (``counts``, every class, zero counts included): the smallest class's share is under
    :func:`imbalance_limit` of the number of classes."""
    values = [int(n) for n in counts]
    total = sum(values)
    return bool(total) and min(values) / total < imbalance_limit(len(values))


@dataclass(frozen=True)
class QualityOptions:
    """The quality settings of one training run; the defaults are what ``train`` does unasked.

    * ``class_weight``: ``auto`` (balanced when the task is imbalanced,
      :func:`is_imbalanced`: the smallest class under 20% of the training rows for a binary
      task, under 20% x 2/K for K classes), ``balanced`` or ``none``.
    * ``threshold``: for binary tasks, ``"auto"`` (tuned on the validation split for the
      primary metric), a probability in (0, 1), or None (``auto`` when the task is imbalanced,
      else the plain argmax).
    * ``primary``: the classifier's primary metric; None: balanced accuracy for binary tasks,
      accuracy for multiclass ones.
    * ``calibrate``: ``none``, ``sigmoid``, ``isotonic`` or ``auto``.
    * ``sensitive``: columns whose groups the fairness report covers; ``sensitive_only``: those
      of them that are not inputs of the model. ``max_parity_gap`` refuses a version whose
      demographic parity difference on any of them exceeds it.
    * ``explainer``: add the device explainer artifact where the family has one.
    """

    class_weight: str = "auto"
    threshold: str | float | None = None
    primary: str | None = None
    calibrate: str = "none"
    sensitive: tuple[str, ...] = ()
    sensitive_only: tuple[str, ...] = ()
    max_parity_gap: float | None = None
    explainer: bool = True

    def __post_init__(self) -> None:
        if self.class_weight not in CLASS_WEIGHTS:
            raise ConfigError(f"class weight {self.class_weight!r}: use one of "
                              f"{', '.join(CLASS_WEIGHTS)}", field="class_weight")
        if self.calibrate not in CALIBRATIONS:
            raise ConfigError(f"calibration {self.calibrate!r}: use one of "
                              f"{', '.join(CALIBRATIONS)}", field="calibrate")
        if self.primary is not None and self.primary not in PRIMARIES:
            raise ConfigError(f"primary metric {self.primary!r}: use one of "
                              f"{', '.join(PRIMARIES)}", field="primary")
        t = self.threshold
        if isinstance(t, str) and t != "auto":
            raise ConfigError(f"threshold {t!r}: use auto or a probability such as 0.3",
                              field="threshold")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and not 0.0 < float(t) < 1.0:
            raise ConfigError(f"threshold {t}: a probability strictly between 0 and 1, or auto",
                              field="threshold")
        if self.max_parity_gap is not None and not 0.0 <= self.max_parity_gap <= 1.0:
            raise ConfigError(f"max parity gap {self.max_parity_gap}: a difference of rates "
                              "between 0 and 1, e.g. 0.1", field="max_parity_gap")
        missing = [c for c in self.sensitive_only if c not in self.sensitive]
        if missing:  # --sensitive-only COL implies --sensitive COL
            object.__setattr__(self, "sensitive", (*self.sensitive, *missing))

    @classmethod
    def from_flags(cls, *, class_weight: str = "auto", threshold: str | None = None,
                   primary: str | None = None, calibrate: str = "none",
                   sensitive: Sequence[str] = (), sensitive_only: Sequence[str] = (),
                   max_parity_gap: float | None = None, explainer: bool = True
                   ) -> QualityOptions:
        """Build from CLI text: ``threshold`` is ``auto`` or a number written as text."""
        t: str | float | None = threshold
        if threshold is not None and threshold != "auto":
            try:
                t = float(threshold)
            except ValueError:
                raise ConfigError(f"--threshold {threshold!r}: use auto or a probability such "
                                  "as 0.3", field="threshold") from None
        return cls(class_weight, t, primary, calibrate, tuple(sensitive),
                   tuple(sensitive_only), max_parity_gap, explainer)

    def to_json(self) -> dict[str, Any]:
        """The JSON form recorded in ``manifest["training"]["quality"]``."""
        out = asdict(self)
        out["sensitive"], out["sensitive_only"] = list(self.sensitive), list(self.sensitive_only)
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> QualityOptions:
        """Rebuild from :meth:`to_json`; None or ``{}`` (a version from before) gives the
        defaults."""
        if not doc:
            return cls()
        known = {k: v for k, v in doc.items() if k in cls.__dataclass_fields__}
        for key in ("sensitive", "sensitive_only"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)
