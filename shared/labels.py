"""The one rule for a ground-truth label, on the device (``rt.feedback``) and in the cloud
(feedback ingest): a finite number for a regression model, else one of its classes.

A class is matched as the manifest spells it, by its text, so ``"1"``, ``1`` and ``1.0``
all name class ``1`` (JSON and CSV carry labels as text or numbers alike), and the manifest's
own value is returned, so a label counts in the same bin as the model's answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import InputError
from .text import printable


def as_label(value: Any, *, task: str, classes: Sequence[Any], model: str, version: int,
             field: str = "label") -> Any:
    """``value`` as a label of ``model`` v``version``; :class:`InputError` naming ``field``."""
    if task == "regression":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value):
            raise InputError(f"{field} {printable(repr(value), 60)} is not a finite number, "
                             f"which regression model {model!r} predicts", field=field)
        return float(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        for c in classes:
            if str(c) == str(value):
                return c
    known = ", ".join(repr(c) for c in list(classes)[:20])
    raise InputError(f"{field} {printable(repr(value), 60)} is not a class of {model!r} "
                     f"v{version}; send one of {known}", field=field)


__all__ = ["as_label"]
