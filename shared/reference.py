"""The reference profile (``manifest["profile"]``, format 1) and the one binning rule.

docs/monitoring.md §1 is the format. This module is what both sides run on it:

* :func:`bin_index` — the bin of each numeric value on a profile's edges (``0`` low overflow,
  ``len(edges)`` high overflow, ``-1`` for NaN); :func:`category_index` — the position of each
  categorical value among a profile's categories (``len(categories)`` for "other").
* :class:`Profile` — a parsed, validated profile: one :class:`ColumnProfile` per feature in
  schema order, plus the model's predictions and confidence; :meth:`Profile.of` reads it from a
  manifest and answers None for a manifest without one (a model trained before format 1).

Bins are defined on float32 values, which is what the model sees: values and edges are both
compared as float32, so the device (float32 blocks) and the cloud (float32 training blocks and
ONNX outputs) put every value in the same bin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

from .errors import DataError, ManifestError
from .schema import CATEGORICAL, MISSING_CATEGORY, NUMERIC, InputSchema

FORMAT = 1
MISSING_BIN = -1  # bin_index's answer for NaN: callers count it as missing, not in a bin
# Proportions are written rounded (6 digits); a sum further than this from 1 is not a
# distribution but a bug.
SUM_TOLERANCE = 1e-3
_INF32 = np.float32(np.inf)


def cut_points(edges: np.ndarray | Sequence[float]) -> np.ndarray:
    """float32 search points for :func:`bin_index`: the edges, the last one moved up to the
    next float32, so that ``searchsorted(side="right")`` puts ``x == edges[-1]`` in the last
    inner bin and only ``x > edges[-1]`` in the high overflow."""
    cuts = np.array(edges, dtype=np.float32).reshape(-1)
    if cuts.size == 1:
        raise DataError(f"one edge ({float(cuts[0])}) defines no inner bin; a constant column "
                        "has two edges, the value and the next float32 above it", field="edges")
    if cuts.size:
        cuts[-1] = np.nextafter(cuts[-1], _INF32)
    return cuts


def bin_index(edges: np.ndarray | Sequence[float], values: np.ndarray) -> np.ndarray:
    """The bin of each value on ``edges`` (strictly increasing), as docs/monitoring.md §1
    defines them: ``0`` for ``x < edges[0]``; ``i`` for ``edges[i-1] <= x < edges[i]``, the
    last inner bin also holding ``x == edges[-1]``; ``len(edges)`` for ``x > edges[-1]``;
    :data:`MISSING_BIN` (-1) for NaN. Values are compared as float32. Returns int64 ``[N]``.
    """
    return _bin(cut_points(edges), values)


def category_index(categories: Sequence[str], values: np.ndarray | Sequence[Any]) -> np.ndarray:
    """The position of each value in ``categories``; ``len(categories)`` ("other") for any
    value not among them (unhashable ones too). Returns int64 ``[N]``."""
    lookup = {c: i for i, c in enumerate(categories)}
    return _lookup(lookup, len(categories), values)


class Tally(NamedTuple):
    """What one batch of values adds to a summary: bin ``counts``, ``missing`` values and, for
    a categorical, values the schema does not know (``unseen``, also counted in "other")."""

    counts: np.ndarray
    missing: int
    unseen: int


@dataclass(frozen=True, eq=False)
class ColumnProfile:
    """The reference distribution of one column: numeric ``edges`` or ``categories``, the
    ``proportions`` of its bins (``n_bins`` of them), and its ``missing`` share.

    ``known`` (categoricals of a schema feature) are the schema's categories: a value outside
    them is unseen.
    """

    name: str
    kind: str
    proportions: np.ndarray
    missing: float = 0.0
    edges: np.ndarray = field(default_factory=lambda: np.empty(0, np.float32))
    categories: tuple[str, ...] = ()
    known: frozenset[str] | None = None
    _cuts: np.ndarray = field(init=False, repr=False)
    _lookup: dict[Any, int] = field(init=False, repr=False)
    _default: int = field(init=False, repr=False)  # the lookup's answer for an absent value

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.kind == NUMERIC:
            set_(self, "_cuts", cut_points(self.edges))
            set_(self, "_lookup", {})
            set_(self, "_default", 0)
        else:
            other = len(self.categories)
            lookup: dict[Any, int] = {}
            if self.known is not None:  # known but rare: "other"; not known at all: unseen
                lookup.update(dict.fromkeys(self.known, other))
            lookup.update({c: i for i, c in enumerate(self.categories)})
            set_(self, "_cuts", np.empty(0, np.float32))
            set_(self, "_lookup", lookup)
            set_(self, "_default", other if self.known is None else other + 1)

    @property
    def n_bins(self) -> int:
        """Number of bins (``len(edges) + 1`` or ``len(categories) + 1``)."""
        return int(self.proportions.size)

    def index(self, values: np.ndarray | Sequence[Any]) -> np.ndarray:
        """The bin of each value: :func:`bin_index` or :func:`category_index` on this column."""
        if self.kind == NUMERIC:
            return _bin(self._cuts, values)
        other = len(self.categories)
        idx = _lookup(self._lookup, self._default, values)
        np.minimum(idx, other, out=idx)  # unseen values are in "other" too
        return idx

    def tally(self, values: np.ndarray | Sequence[Any]) -> Tally:
        """Bin counts of ``values`` plus their missing and unseen counts.

        Numeric: NaN is missing and not in ``counts``. Categorical: every value is in
        ``counts`` (``""`` in its own bin when it is a category, unseen values in "other");
        ``missing`` counts the ``""`` values and ``unseen`` the values the schema does not know
        (always 0 without ``known``).
        """
        n = self.n_bins
        if self.kind == NUMERIC:
            idx = _bin(self._cuts, values)
            counts = np.bincount(idx + 1, minlength=n + 1)
            return Tally(counts[1:], int(counts[0]), 0)
        idx = _lookup(self._lookup, self._default, values)  # n: unseen
        counts = np.bincount(idx, minlength=n + 1)
        unseen = int(counts[n])
        counts[n - 1] += unseen
        blank = self._lookup.get(MISSING_CATEGORY)
        if blank is not None and blank < n - 1:
            missing = int(counts[blank])
        else:  # "" is rare or unknown: it went to "other" with others, count it on its own
            missing = sum(1 for v in _as_list(values) if v == MISSING_CATEGORY)
        return Tally(counts[:n], missing, unseen)

    def to_json(self) -> dict[str, Any]:
        """The profile entry (docs/monitoring.md §1)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == NUMERIC:
            out["edges"] = [float32_json(e) for e in self.edges]
        else:
            out["categories"] = list(self.categories)
        out["proportions"] = [round(float(p), 6) for p in self.proportions]
        out["missing"] = round(float(self.missing), 6)
        return out

    @classmethod
    def from_json(cls, data: Any, name: str, where: str,
                  known: Sequence[str] | None = None) -> ColumnProfile:
        """Parse and validate one entry; :class:`ManifestError` naming ``where`` (the field)."""
        if not isinstance(data, Mapping):
            raise ManifestError(f"{where} must be an object", field=where)
        kind = data.get("kind")
        if kind not in (NUMERIC, CATEGORICAL):
            raise ManifestError(f"{where}.kind is {kind!r}; use 'numeric' or 'categorical'",
                                field=f"{where}.kind")
        missing = _number(data.get("missing", 0.0), f"{where}.missing")
        if not 0.0 <= missing <= 1.0:
            raise ManifestError(f"{where}.missing is {missing}; a share is in [0, 1]",
                                field=f"{where}.missing")
        props = _numbers(data.get("proportions"), f"{where}.proportions")
        if kind == NUMERIC:
            edges = _edges(data.get("edges"), f"{where}.edges")
            size, what = edges.size + 1, f"len(edges) + 1 = {edges.size + 1}"
            cats: tuple[str, ...] = ()
        else:
            edges = np.empty(0, np.float32)
            cats = _categories(data.get("categories"), f"{where}.categories")
            size, what = len(cats) + 1, f"len(categories) + 1 = {len(cats) + 1}"
        if props.size != size:
            raise ManifestError(f"{where}.proportions has {props.size} entries; it needs "
                                f"{what}", field=f"{where}.proportions")
        total = float(props.sum())
        if (props < 0).any() or abs(total - 1.0) > SUM_TOLERANCE:
            raise ManifestError(f"{where}.proportions must be shares summing to 1, not "
                                f"{total:.6g}", field=f"{where}.proportions")
        return cls(name, kind, props / total, missing, edges, cats,
                   None if known is None else frozenset(known))


@dataclass(frozen=True, eq=False)
class Profile:
    """A parsed reference profile: ``features`` in schema order, ``predictions``,
    ``confidence`` (classifiers only) and normalised ``importance`` by feature name."""

    rows: int
    features: tuple[ColumnProfile, ...]
    predictions: ColumnProfile
    confidence: ColumnProfile | None
    importance: Mapping[str, float]

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names, in order."""
        return tuple(f.name for f in self.features)

    def feature(self, name: str) -> ColumnProfile:
        """The profile of feature ``name``; :class:`DataError` if there is none."""
        for f in self.features:
            if f.name == name:
                return f
        raise DataError(f"the profile has no feature {name!r}; its features are "
                        f"{', '.join(self.names)}", field=name)

    def top_features(self, k: int) -> tuple[str, ...]:
        """The ``k`` features of highest importance (ties: feature order); features of zero
        importance are never among them."""
        order = sorted(range(len(self.features)),
                       key=lambda i: -self.importance.get(self.features[i].name, 0.0))
        names = [self.features[i].name for i in order]
        return tuple(n for n in names[:k] if self.importance.get(n, 0.0) > 0.0)

    def to_json(self) -> dict[str, Any]:
        """The ``manifest["profile"]`` object."""
        out: dict[str, Any] = {
            "format": FORMAT, "rows": self.rows,
            "features": {f.name: f.to_json() for f in self.features},
            "predictions": self.predictions.to_json(),
            "importance": {n: round(float(v), 6) for n, v in self.importance.items()},
        }
        if self.confidence is not None:
            out["confidence"] = self.confidence.to_json()
        return out

    @classmethod
    def from_json(cls, data: Any, schema: InputSchema | None = None) -> Profile:
        """Validate a format-1 profile; :class:`ManifestError` naming the field otherwise.

        With ``schema`` the features come in schema order, must be exactly the schema's (same
        kinds), and categoricals learn the schema's categories (for unseen counts); without it
        they come in the order of the JSON object.
        """
        if not isinstance(data, Mapping):
            raise ManifestError("the profile must be an object", field="profile")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise ManifestError(f"profile format {fmt!r} is not supported (this kit reads "
                                f"format {FORMAT}); upgrade hybridml", field="profile.format")
        rows = data.get("rows")
        if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
            raise ManifestError(f"profile.rows must be a row count, got {rows!r}",
                                field="profile.rows")
        raw = data.get("features")
        if not isinstance(raw, Mapping) or not raw:
            raise ManifestError("profile.features must be an object with one entry per "
                                "feature", field="profile.features")
        features = tuple(_features(raw, schema))
        predictions = ColumnProfile.from_json(data.get("predictions"), "predictions",
                                              "profile.predictions")
        conf = data.get("confidence")
        confidence = None if conf is None else ColumnProfile.from_json(
            conf, "confidence", "profile.confidence")
        importance = _importance(data.get("importance"), [f.name for f in features])
        return cls(rows, features, predictions, confidence, importance)

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Profile | None:
        """The profile of a decoded manifest, or None when it has no format-1 profile (a model
        trained before drift monitoring: the device skips drift for it). A format-1 profile
        that is malformed or does not match the manifest's schema is a :class:`ManifestError`.
        """
        data = manifest.get("profile")
        if not isinstance(data, Mapping) or "format" not in data:
            return None
        try:
            schema = InputSchema.from_json(manifest.get("schema"))
        except DataError as exc:
            raise ManifestError(f"manifest 'schema' is invalid: {exc}", field="schema") from exc
        return cls.from_json(data, schema)


def float32_json(value: Any) -> float:
    """The shortest decimal that reads back as the same float32 (5.1, not 5.0999999)."""
    return float(str(np.float32(value)))


# -------------------------------------------------------------------------------- internals
def _bin(cuts: np.ndarray, values: np.ndarray | Sequence[Any]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    idx = np.searchsorted(cuts, v, side="right")  # NaN sorts last: len(cuts), fixed below
    nan = np.isnan(v)
    if nan.any():
        idx[nan] = MISSING_BIN
    return idx.astype(np.int64, copy=False)


def _as_list(values: np.ndarray | Sequence[Any]) -> list[Any]:
    return values.tolist() if isinstance(values, np.ndarray) else list(values)


def _lookup(lookup: Mapping[Any, int], default: int,
            values: np.ndarray | Sequence[Any]) -> np.ndarray:
    """``lookup[v]`` (``default`` when absent) for every value, at C speed (map over dict.get:
    ~25 ns a value)."""
    vals = _as_list(values)
    n = len(vals)
    try:
        return np.fromiter(map(lookup.get, vals, repeat(default, n)), dtype=np.int64, count=n)
    except TypeError:  # an unhashable value (a list...) is no category
        return np.array([_get(lookup, v, default) for v in vals], dtype=np.int64)


def _get(lookup: Mapping[Any, int], value: Any, default: int) -> int:
    try:
        return lookup.get(value, default)
    except TypeError:
        return default


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        raise ManifestError(f"{where} must be a finite number, got {str(value)[:40]!r}",
                            field=where)
    return float(value)


def _numbers(value: Any, where: str) -> np.ndarray:
    if not isinstance(value, list):
        raise ManifestError(f"{where} must be a list of numbers", field=where)
    return np.array([_number(v, where) for v in value], dtype=np.float64)


def _edges(value: Any, where: str) -> np.ndarray:
    edges = _numbers(value, where).astype(np.float32)
    if edges.size == 1:
        raise ManifestError(f"{where} has one edge; a column needs none (no reference values) "
                            "or at least two", field=where)
    if not np.isfinite(edges).all() or (np.diff(edges) <= 0).any():
        raise ManifestError(f"{where} must be finite float32 values in strictly increasing "
                            "order", field=where)
    return edges


def _categories(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ManifestError(f"{where} must be a list of strings", field=where)
    if len(set(value)) != len(value):
        raise ManifestError(f"{where} lists a category twice", field=where)
    return tuple(value)


def _features(raw: Mapping[str, Any], schema: InputSchema | None) -> list[ColumnProfile]:
    if schema is None:
        return [ColumnProfile.from_json(v, str(k), f"profile.features.{k}")
                for k, v in raw.items()]
    extra = sorted(set(raw) - set(schema.names))
    if extra:
        raise ManifestError(f"profile.features has {extra[0]!r}, which is not in the schema",
                            field=f"profile.features.{extra[0]}")
    out = []
    for f in schema.features:
        where = f"profile.features.{f.name}"
        if f.name not in raw:
            raise ManifestError(f"the profile has no entry for feature {f.name!r}", field=where)
        col = ColumnProfile.from_json(raw[f.name], f.name, where,
                                      f.categories if f.kind == CATEGORICAL else None)
        if col.kind != f.kind:
            raise ManifestError(f"{where} is {col.kind} but the schema says {f.kind}",
                                field=f"{where}.kind")
        out.append(col)
    return out


def _importance(raw: Any, names: Sequence[str]) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ManifestError("profile.importance must map feature names to numbers",
                            field="profile.importance")
    out: dict[str, float] = {}
    for name, value in raw.items():
        where = f"profile.importance.{name}"
        if name not in names:
            raise ManifestError(f"{where}: {name!r} is not a feature", field=where)
        v = _number(value, where)
        if v < 0:
            raise ManifestError(f"{where} is {v}; importance is clipped at 0", field=where)
        out[str(name)] = v
    return {n: out.get(n, 0.0) for n in names}


__all__ = ["FORMAT", "MISSING_BIN", "ColumnProfile", "Profile", "Tally", "bin_index",
           "category_index", "cut_points", "float32_json"]
