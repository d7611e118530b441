"""Binning the answers telemetry keeps: the profile's bins, counted with numpy in bulk.

A :class:`Binner` is compiled once per model version from its reference profile
(``manifest["profile"]``, :class:`~hybridml.shared.reference.Profile`) and counts
:class:`Rows` — the model's inputs and answers for some rows — into a :class:`Tally`:

* a numeric feature, a prediction value or a confidence is binned on
  :func:`~hybridml.shared.reference.bin_index`'s bins, from the same float32 cut points
  (:func:`~hybridml.shared.reference.cut_points`): one ``searchsorted`` and one ``bincount``
  per column; NaN sorts past every cut and is taken out of the high overflow as missing.
  ``tests/edge/test_telemetry.py`` holds the counts to ``bin_index``'s on random values;
* a categorical feature is counted by schema code (``-1``: unseen; the code of ``""``:
  missing) with one ``bincount``, and that small histogram is mapped to the profile's bins
  with :meth:`~hybridml.shared.reference.ColumnProfile.index` of each known category;
* a classifier's predictions likewise, by class index.

numpy costs about a microsecond an operation whatever the size, and ~5 ns a value: binning a
few thousand rows at once costs ~25 ns a row for a handful of features, one row at a time
microseconds. So rows gather (:class:`~hybridml.edge.telemetry.Counters`) and are binned
together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from hybridml.shared.drift import ColumnProfile, Profile
from hybridml.shared.reference import cut_points
from hybridml.shared.schema import CATEGORICAL, MISSING_CATEGORY, InputSchema

MISS_VALUES = 16  # values binned per fast-path model answer, on average (a sample if wider)
_UNSEEN = object()  # stands for a value the profile cannot know: its bin is "other"


class Rows(NamedTuple):
    """Answered rows waiting to be binned: the model's inputs (``num`` float32
    ``[n, n_numeric]``, ``codes`` int32 ``[n, n_categorical]``, -1 for unseen), their class
    indices (-1: unknown) and confidence, or values; each counts ``weights[i]`` times (None:
    once)."""

    num: np.ndarray
    codes: np.ndarray
    labels: np.ndarray | None
    values: np.ndarray | None
    confidence: np.ndarray | None
    weights: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.num.shape[0])


@dataclass
class Tally:
    """What some rows add to the counters (per feature in schema order)."""

    features: list[np.ndarray]
    missing: list[int]
    unseen: list[int]
    predictions: np.ndarray | None = None
    confidence: np.ndarray | None = None


class Binner:
    """How one version's answers become counts: the profile's bins, compiled for its schema.

    Numeric bins are :func:`~hybridml.shared.reference.bin_index`'s, on the same float32 cut
    points (:func:`~hybridml.shared.reference.cut_points`), counted with one ``searchsorted``
    and one ``bincount`` per column; a categorical column is counted by schema code and the
    small histogram mapped to the profile's bins with
    :meth:`~hybridml.shared.reference.ColumnProfile.index` of each known category.
    ``profile`` None (a model trained before profiles): nothing is binned.
    """

    def __init__(self, schema: InputSchema, profile: Profile | None,
                 classes: Sequence[Any], is_clf: bool) -> None:
        self.schema = schema
        self.profile = profile
        self.is_clf = is_clf
        # Of the fast path's model answers, one in miss_stride is binned (wide models).
        self.miss_stride = max(1, -(-len(schema.names) // MISS_VALUES))
        self.classes = tuple(classes)
        self.names: tuple[str, ...] = schema.names if profile is not None else ()
        self.kinds = tuple(f.kind for f in schema.features) if profile is not None else ()
        self.bins: list[int] = []
        # (feature, column of the num block, cut points); (feature, column of cat, code ->
        # bin with the unseen code -1 first, the code of "" + 1 or -1)
        self.numeric: list[tuple[int, int, np.ndarray]] = []
        self.categorical: list[tuple[int, int, np.ndarray, int]] = []
        self.predictions: ColumnProfile | None = None
        self.pred_cuts: np.ndarray | None = None
        self.pred_lut: np.ndarray | None = None
        self.confidence: ColumnProfile | None = None
        self.conf_cuts: np.ndarray | None = None
        if profile is None:
            return
        n_num = n_cat = 0
        for f, (feat, col) in enumerate(zip(schema.features, profile.features)):
            self.bins.append(col.n_bins)
            if feat.kind == CATEGORICAL:
                lut = col.index([_UNSEEN, *feat.categories])  # code + 1 -> bin
                blank = feat.categories.index(MISSING_CATEGORY) + 1 \
                    if MISSING_CATEGORY in feat.categories else -1
                self.categorical.append((f, n_cat, lut, blank))
                n_cat += 1
            else:
                self.numeric.append((f, n_num, cut_points(col.edges)))
                n_num += 1
        self.predictions = pred = profile.predictions
        if is_clf:  # class index + 1 -> bin; index -1 (a class the model does not know): other
            self.pred_lut = pred.index([_UNSEEN, *(str(c) for c in classes)])
            self.confidence = profile.confidence
            if profile.confidence is not None:
                self.conf_cuts = cut_points(profile.confidence.edges)
        else:
            self.pred_cuts = cut_points(pred.edges)

    def tally(self, rows: Rows) -> Tally:
        """The counts ``rows`` add."""
        t = Tally([np.zeros(0, np.int64)] * len(self.bins), [0] * len(self.bins),
                  [0] * len(self.bins))
        if self.profile is None or not len(rows):
            return t
        w = rows.weights
        if self.numeric:
            cols = np.ascontiguousarray(rows.num.T)
            nan = np.isnan(cols)
            for f, j, cuts in self.numeric:
                t.features[f], t.missing[f] = _binned(cuts, cols[j], nan[j], w)
        for f, j, lut, blank in self.categorical:
            h = _count(rows.codes[:, j] + 1, lut.size, w)  # per code; h[0]: unseen
            t.features[f] = np.bincount(lut, weights=h, minlength=self.bins[f]).astype(np.int64)
            t.unseen[f] = int(h[0])
            t.missing[f] = int(h[blank]) if blank > 0 else 0
        if self.pred_lut is not None and rows.labels is not None:
            h = _count(rows.labels + 1, self.pred_lut.size, w)
            assert self.predictions is not None
            t.predictions = np.bincount(self.pred_lut, weights=h,
                                        minlength=self.predictions.n_bins).astype(np.int64)
        elif self.pred_cuts is not None and rows.values is not None:
            v = np.asarray(rows.values, dtype=np.float32)
            t.predictions = _binned(self.pred_cuts, v, np.isnan(v), w)[0]
        if self.conf_cuts is not None and rows.confidence is not None:
            v = np.asarray(rows.confidence, dtype=np.float32)
            t.confidence = _binned(self.conf_cuts, v, np.isnan(v), w)[0]
        return t


def _binned(cuts: np.ndarray, values: np.ndarray, nan: np.ndarray,
            weights: np.ndarray | None) -> tuple[np.ndarray, int]:
    """Bin counts of float32 ``values`` on ``cuts`` (bin_index's bins) and the NaN count:
    NaN sorts past every cut, into the high overflow, and is taken out of it again."""
    counts = _count(np.searchsorted(cuts, values, side="right"), cuts.size + 1, weights)
    missing = int(nan.sum()) if weights is None else int(weights[nan].sum())
    if missing:
        counts[-1] -= missing
    return counts, missing


def _count(idx: np.ndarray, n: int, weights: np.ndarray | None) -> np.ndarray:
    if weights is None:
        return np.bincount(idx, minlength=n)
    return np.rint(np.bincount(idx, weights=weights, minlength=n)).astype(np.int64)


def concat(chunks: Sequence[Rows]) -> Rows:
    """One :class:`Rows` of several (weights of 1 where a chunk has none)."""
    if len(chunks) == 1:
        return chunks[0]

    def cat(parts: list[np.ndarray | None]) -> np.ndarray | None:
        return None if any(p is None for p in parts) else np.concatenate(parts)  # type: ignore

    weights = None
    if any(c.weights is not None for c in chunks):
        weights = np.concatenate([c.weights if c.weights is not None else
                                  np.ones(len(c), dtype=np.float64) for c in chunks])
    return Rows(np.concatenate([c.num for c in chunks]),
                np.concatenate([c.codes for c in chunks]),
                cat([c.labels for c in chunks]), cat([c.values for c in chunks]),
                cat([c.confidence for c in chunks]), weights)



__all__ = ["MISS_VALUES", "Binner", "Rows", "Tally", "concat"]
