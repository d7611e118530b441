"""Training data: load a CSV or a bundled dataset, validate it, type its columns, split it.

Every problem is a :class:`DataError` (or :class:`InputError` naming a column) raised before any
training starts, with a message that says how to fix it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.shared import cells
from hybridml.shared.errors import DataError
from hybridml.shared.schema import (
    CATEGORICAL,
    NUMERIC,
    Feature,
    InputSchema,
    refusal,
)

log = logging.getLogger("hybridml.cloud.data")

BUILTIN = ("iris", "wine", "breast_cancer", "digits", "diabetes")
TASKS = ("binary", "multiclass", "regression")
# A column is called "numeric with bad values" (an error) rather than categorical when at least
# this share of its values are numbers: a typo in a numeric column must not silently turn it
# into a one-hot encoded column with thousands of categories.
NUMERIC_MAJORITY = 0.9
# Integer targets with at most this many distinct values are taken as class labels.
MAX_INT_CLASSES = 20


@dataclass
class Dataset:
    """Validated, typed data: the ``num``/``cat`` blocks, the target, and where it came from."""

    source: str
    target: str
    task: str
    schema: InputSchema
    num: np.ndarray  # float32 [N, n_num]
    cat: np.ndarray  # object [N, n_cat]
    y: np.ndarray  # int64 class indices, or float64 values for regression
    classes: list[Any] | None
    sha256: str
    dropped_rows: int = 0
    # Raw text per kept row of columns asked for with ``extras`` (the fairness report's
    # sensitive columns), whether or not they are features.
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def take(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(num, cat, y)`` for the rows at ``idx``."""
        return self.num[idx], self.cat[idx], self.y[idx]


@dataclass(frozen=True)
class Split:
    """Row indices of a seeded train / validation / test split."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    seed: int

    def to_json(self) -> dict[str, Any]:
        """Sizes and seed, for the version's metadata."""
        return {"seed": self.seed, "train": int(self.train.size),
                "validation": int(self.validation.size), "test": int(self.test.size)}


def is_missing(text: str) -> bool:
    """True for the CSV spellings of a missing value."""
    return text.strip().lower() in cells.MISSING_TOKENS


def load_csv(path: str | os.PathLike[str], target: str, *, task: str | None = None,
             categorical: Sequence[str] = (), numeric: Sequence[str] = (),
             drop: Sequence[str] = (), extras: Sequence[str] = ()) -> Dataset:
    """Read, validate and type a CSV with a header row.

    Columns whose values are all numbers (or missing) are numeric, others categorical;
    ``categorical``/``numeric`` force a kind, ``drop`` ignores columns. Rows with a missing
    target are dropped (and counted). ``extras`` columns are also kept as raw text per row in
    :attr:`Dataset.extras`, dropped from the features or not.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"no such file: {p}; pass --data with a CSV file", field="data")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"{p} is empty; it needs a header row and data rows", field="data")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p} is not UTF-8 text ({exc}); re-save it as UTF-8",
                        field="data") from exc
    reader = csv.reader(io.StringIO(text, newline=""))  # quoted fields may hold newlines
    header = [h.strip() for h in next(reader)]
    _check_header(header, p)
    rows = list(reader)
    rows = [r for r in rows if any(c.strip() for c in r)]  # blank lines are not rows
    if not rows:
        raise DataError(f"{p} has a header but no data rows", field="data")
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise DataError(f"{p} line {i + 2} has {len(r)} fields, the header has "
                            f"{len(header)}; fix the quoting or the separators", row=i + 2)
    if target not in header:
        raise DataError(f"the target column {target!r} is not in {p}; its columns are "
                        f"{', '.join(header)}", field=target)
    for name in extras:  # first: a --sensitive-only column is also in drop
        if name not in header:
            raise DataError(f"sensitive column {name!r} is not in {p}; its columns are "
                            f"{', '.join(header)}", field=name)
    for name in (*categorical, *numeric, *drop):
        if name not in header:
            raise DataError(f"column {name!r} (from --categorical/--numeric/--drop) is not in "
                            f"{p}", field=name)
    columns = {h: [r[i] for r in rows] for i, h in enumerate(header)}
    feats = [h for h in header if h != target and h not in drop]
    if not feats:
        raise DataError(f"{p} has no feature columns besides the target {target!r}")
    return _build(str(p), target, columns, feats, task, set(categorical), set(numeric),
                  hashlib.sha256(raw).hexdigest(), extras)


def load_builtin(name: str, *, task: str | None = None) -> Dataset:
    """Load one of scikit-learn's bundled datasets (no download): see :data:`BUILTIN`."""
    if name not in BUILTIN:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(BUILTIN)}",
                        field="dataset")
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    x = np.asarray(bunch.data, dtype=np.float64)
    names = [_safe_name(str(n)) for n in bunch.feature_names]
    if name == "digits":
        names = [f"pixel_{i // 8}_{i % 8}" for i in range(64)]
    columns: dict[str, list[str]] = {n: [repr(float(v)) for v in x[:, j]]
                                     for j, n in enumerate(names)}
    target_names = getattr(bunch, "target_names", None)
    if name == "diabetes":
        y_text = [repr(float(v)) for v in bunch.target]
    elif target_names is not None and name != "digits":
        y_text = [str(target_names[int(v)]) for v in bunch.target]
    else:
        y_text = [str(int(v)) for v in bunch.target]
    columns["target"] = y_text
    digest = hashlib.sha256(x.tobytes() + np.asarray(bunch.target).tobytes()).hexdigest()
    return _build(f"sklearn:{name}", "target", columns, names, task, set(), set(names), digest)


def split(ds: Dataset, seed: int = 0, *, test_size: float = 0.2,
          validation_size: float = 0.1) -> Split:
    """Seeded split; stratified for classification when every class has enough rows."""
    from sklearn.model_selection import train_test_split

    n = len(ds)
    idx = np.arange(n)
    strat = ds.y if ds.task != "regression" and np.bincount(ds.y).min() >= 3 else None
    if n < 10:
        raise DataError(f"{ds.source} has {n} usable rows; at least 10 are needed to train "
                        "and test a model", field="data")
    rest, test = train_test_split(idx, test_size=test_size, random_state=seed, stratify=strat)
    strat_rest = strat[rest] if strat is not None else None
    if strat_rest is not None and np.bincount(strat_rest).min() < 3:
        strat_rest = None
    train, val = train_test_split(rest, test_size=validation_size / (1 - test_size),
                                  random_state=seed, stratify=strat_rest)
    return Split(np.sort(train), np.sort(val), np.sort(test), seed)


def fit_schema(names: Sequence[str], kinds: Sequence[str], num: np.ndarray,
               cat: np.ndarray) -> InputSchema:
    """Schema with each numeric feature's training range and each categorical's categories."""
    feats: list[Feature] = []
    jn = jc = 0
    for name, kind in zip(names, kinds):
        if kind == NUMERIC:
            col = num[:, jn]
            jn += 1
            ok = col[~np.isnan(col)]
            lo = float(ok.min()) if ok.size else None
            hi = float(ok.max()) if ok.size else None
            feats.append(Feature(name, NUMERIC, lo, hi))
        else:
            col = cat[:, jc]
            jc += 1
            feats.append(Feature(name, CATEGORICAL, categories=tuple(sorted(set(col.tolist())))))
    return InputSchema(tuple(feats))


# -------------------------------------------------------------------------------- internals
def _safe_name(name: str) -> str:
    return name.strip().replace(" ", "_").replace("(", "").replace(")", "")


def _check_header(header: list[str], p: Path) -> None:
    empty = [i + 1 for i, h in enumerate(header) if not h]
    if empty:
        raise DataError(f"{p}: header column {empty[0]} has no name; name every column",
                        field="header")
    seen: set[str] = set()
    dupes = [h for h in header if h in seen or seen.add(h)]  # type: ignore[func-returns-value]
    if dupes:
        raise DataError(f"{p} has duplicate column names: {', '.join(sorted(set(dupes)))}; "
                        "rename them so every column is unique", field=dupes[0])


def _parse_float(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _column_kind(name: str, values: list[str], forced_cat: bool, forced_num: bool
                 ) -> tuple[str, tuple[int, str] | None]:
    """The column's kind, and its first refused cell (row, reason) when it is numeric but
    holds a cell the numeric text rule refuses (:func:`hybridml.shared.cells.number_text`)."""
    present = [v for v in values if not is_missing(v)]
    if not present:
        raise DataError(f"column {name!r} has no values (every row is missing); drop it with "
                        f"--drop {name}", field=name)
    if forced_cat:
        return CATEGORICAL, None
    _, first, reason = cells.numbers_text(values)
    if first is None:
        return NUMERIC, None
    bad = [i for i, v in enumerate(values) if _refused(v)]
    if not forced_num and 1 - len(bad) / len(present) < NUMERIC_MAJORITY:
        return CATEGORICAL, None
    return NUMERIC, (first, f"{reason} ({len(present) - len(bad)} of {len(present)} values are "
                            f"numbers: pass --categorical {name} if the column is not numeric)")


def _refused(text: str) -> bool:
    try:
        cells.number_text(text)
    except cells.CellRefused:
        return True
    return False


def _detect_task(target: str, y_text: list[str]) -> str:
    parsed = [_parse_float(v) for v in y_text]
    if any(v is None for v in parsed):
        return "binary" if len(set(y_text)) == 2 else "multiclass"
    values = np.array(parsed, dtype=np.float64)
    distinct = np.unique(values)
    if not np.all(distinct == np.round(distinct)):
        return "regression"
    if distinct.size == 2:
        return "binary"
    # Integer codes 0..K-1 or 1..K (digits, ratings) are classes; other integers (minutes,
    # counts, prices) are quantities. --task overrides either way.
    codes = distinct[0] in (0.0, 1.0) and distinct[-1] - distinct[0] + 1 == distinct.size
    return "multiclass" if codes and distinct.size <= MAX_INT_CLASSES else "regression"


def _encode_target(target: str, y_text: list[str], task: str) -> tuple[np.ndarray, list[Any]]:
    if task == "regression":
        vals = [_parse_float(v) for v in y_text]
        bad = next((i for i, v in enumerate(vals) if v is None), None)
        if bad is not None:
            raise DataError(f"target {target!r} must be numeric for regression but data row "
                            f"{bad + 1} holds {y_text[bad]!r}; fix it or use --task multiclass",
                            field=target, row=bad + 1)
        return np.array(vals, dtype=np.float64), []
    parsed = [_parse_float(v) for v in y_text]
    labels: list[Any]
    if all(v is not None and float(v).is_integer() for v in parsed):
        labels = [int(v) for v in parsed]  # type: ignore[arg-type]
    else:
        labels = [v.strip() for v in y_text]
    classes = sorted(set(labels), key=lambda c: (str(type(c)), c))
    if len(classes) < 2:
        raise DataError(f"target {target!r} has a single class ({classes[0]!r}); a classifier "
                        "needs at least two — check the file or use --task regression",
                        field=target)
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[v] for v in labels], dtype=np.int64)
    if task == "binary" and len(classes) != 2:
        raise DataError(f"--task binary but target {target!r} has {len(classes)} classes; use "
                        "--task multiclass", field=target)
    return y, classes


def _build(source: str, target: str, columns: dict[str, list[str]], feats: list[str],
           task: str | None, forced_cat: set[str], forced_num: set[str],
           sha256: str, extras: Sequence[str] = ()) -> Dataset:
    if task is not None and task not in TASKS:
        raise DataError(f"unknown task {task!r}; use one of {', '.join(TASKS)}", field="task")
    y_text = columns[target]
    keep = np.array([not is_missing(v) for v in y_text])
    if not keep.any():
        raise DataError(f"the target column {target!r} is empty in every row; fill it in or "
                        "choose another --target", field=target)
    dropped = int((~keep).sum())
    if dropped:
        log.warning("dropping %d rows with a missing target %r", dropped, target)
    idx = np.flatnonzero(keep)
    y_kept = [y_text[i] for i in idx]
    task = task or _detect_task(target, y_kept)
    y, classes = _encode_target(target, y_kept, task)
    kept = {n: [columns[n][i] for i in idx] for n in feats}
    typed = [_column_kind(n, kept[n], n in forced_cat, n in forced_num) for n in feats]
    kinds = [k for k, _ in typed]
    bad = [(first[0], pos, first[1]) for pos, (_, first) in enumerate(typed) if first]
    if bad:  # the first refused cell row by row, as every other route reports it
        r, pos, reason = min(bad)
        raise refusal(int(idx[r]), feats[pos], reason)
    num_names = [n for n, k in zip(feats, kinds) if k == NUMERIC]
    cat_names = [n for n, k in zip(feats, kinds) if k == CATEGORICAL]
    # The cell rules of every route (hybridml.shared.cells): what the model is trained on is
    # exactly what the edge and the cloud feed it for the same text.
    num = np.empty((idx.size, len(num_names)), dtype=np.float32)
    for j, n in enumerate(num_names):
        num[:, j] = cells.numbers_text(kept[n])[0]
    cat = np.empty((idx.size, len(cat_names)), dtype=object)
    for j, n in enumerate(cat_names):
        cat[:, j] = [cells.category(v) for v in kept[n]]
    # Schema order: the CSV's column order; the num/cat blocks keep that relative order.
    ordered = [n for n in feats]
    schema = fit_schema(ordered, kinds, num, cat)
    raw = {n: np.array([columns[n][i].strip() for i in idx], dtype=object) for n in extras}
    return Dataset(source, target, task, schema, num, cat, y,
                   classes if task != "regression" else None, sha256, dropped, raw)
