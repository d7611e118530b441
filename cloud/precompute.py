"""Precompute predictions for the most frequent inputs into a table the edge memory-maps.

The source is a CSV whose header names the schema's columns (extra columns are ignored). It is
either a request log, one line per request (repeated rows are counted), or, when it has a
``count`` column (or ``count_column`` names one), one line per distinct row with its request
count. Rows are encoded with the shared :class:`~hybridml.shared.schema.InputSchema` in chunks,
counted by canonical key (rows with equal keys are the same model input), the ``top`` keys by
count are run through the model once, and :func:`hybridml.shared.table.write_table` writes them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, InputError, TableError
from hybridml.shared.schema import CATEGORICAL, EncodedBatch, InputSchema
from hybridml.shared.table import write_table

from .progress import StepProgress

log = logging.getLogger("hybridml.cloud.precompute")

CHUNK_ROWS = 100_000  # CSV rows encoded at once: bounds memory, keeps numpy calls large
RUN_ROWS = 50_000  # rows per model call
COUNT_COLUMN = "count"
TASKS = ("binary", "multiclass", "regression")


@dataclass(frozen=True)
class PrecomputeReport:
    """What a precompute run read, kept and how much of the traffic the table answers."""

    rows_read: int  # data lines in the CSV
    requests: int  # requests those lines stand for (rows, or the sum of counts)
    distinct: int  # distinct model inputs (canonical keys)
    kept: int  # rows in the table
    coverage: float  # share of requests the table answers: kept counts / requests
    seconds: float
    table_bytes: int
    model_sha256: str

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return asdict(self)

    def dumps(self) -> str:
        """Return the report as a JSON string."""
        return json.dumps(self.to_json(), sort_keys=True)


def precompute(model: bytes, model_sha256: str, schema: InputSchema, task: str,
               source: str | os.PathLike[str], *, top: int = 10000,
               count_column: str | None = None, out_path: str | os.PathLike[str],
               progress: bool = False) -> PrecomputeReport:
    """Build the table of the ``top`` most requested inputs in ``source`` at ``out_path``.

    ``model`` is the ONNX model the edge runs and ``model_sha256`` its sha256, to which the
    table is bound. Raises :class:`InputError` naming the column or row of a bad CSV,
    :class:`ConfigError` for bad arguments and :class:`TableError` when the sha256 is not the
    model's.
    """
    started = time.perf_counter()
    if task not in TASKS:
        raise ConfigError(f"task {task!r} is not one of {TASKS}", field="task")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"top must be a positive integer, got {top!r}", field="top")
    actual = hashlib.sha256(model).hexdigest()
    if actual != model_sha256:
        raise TableError(f"model_sha256 {model_sha256[:12]} is not the sha256 of the model "
                         f"bytes ({actual[:12]}); pass the sha256 of the model the edge runs",
                         field="model_sha256")
    src = Path(source)
    distinct = _Distinct(schema)
    rows_read = 0
    bar = StepProgress(enabled=progress)
    try:
        for batch, counts in _encoded_chunks(src, schema, count_column):
            distinct.add(schema.keys(batch), counts, batch)
            rows_read += len(batch)
            bar(f"precompute: {rows_read:,} rows read")
        bar(f"precompute: running the model on the top {top:,} rows")
    finally:
        bar.close()
    keys, counts, reps = distinct.result()
    if not len(keys):
        raise InputError(f"{src.name} has no data rows; a table needs at least one",
                         field=None)
    # Most requested first; ties keep the key-byte order np.unique produced (deterministic).
    kept = np.argsort(-counts, kind="stable")[:top]
    outputs = _predict(model, schema, task, reps.take(kept))
    write_table(out_path, model_sha256=model_sha256, task=task, keys=keys[kept], **outputs)
    requests = int(counts.sum())
    report = PrecomputeReport(
        rows_read=rows_read, requests=requests, distinct=len(keys), kept=len(kept),
        coverage=float(counts[kept].sum()) / requests if requests else 0.0,
        seconds=round(time.perf_counter() - started, 3),
        table_bytes=Path(out_path).stat().st_size, model_sha256=model_sha256)
    log.info("precompute %s: %d rows, %d requests, %d distinct, kept %d, coverage %.1f%% "
             "(%.1f s)", src.name, rows_read, requests, report.distinct, report.kept,
             100 * report.coverage, report.seconds)
    return report


def _encoded_chunks(src: Path, schema: InputSchema, count_column: str | None
                    ) -> Iterator[tuple[EncodedBatch, np.ndarray]]:
    """Stream the CSV and yield each chunk encoded, with its per-row request counts."""
    try:
        f = open(src, newline="", encoding="utf-8-sig")  # noqa: SIM115 (closed just below)
    except OSError as exc:
        raise InputError(f"cannot read {src}: {exc.strerror or exc}", field=None) from exc
    with f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if not header:
            raise InputError(f"{src.name} is empty; it needs a header row naming the columns "
                             f"{', '.join(schema.names)}")
        if count_column is None and COUNT_COLUMN in header and COUNT_COLUMN not in schema.names:
            count_column = COUNT_COLUMN
        wanted = [*schema.names, *([count_column] if count_column else [])]
        for name in wanted:
            if name not in header:
                raise InputError(f"{src.name} has no column {name!r}; its header must name "
                                 f"{', '.join(wanted)}", field=name)
            if header.count(name) > 1:
                raise InputError(f"{src.name} names column {name!r} twice", field=name)
        at = [header.index(n) for n in wanted]
        width = len(header)
        start = 0
        while rows := list(islice(reader, CHUNK_ROWS)):
            if not all(rows):
                rows = [r for r in rows if r]  # blank lines
            if len({len(r) for r in rows} | {width}) > 1:
                r = next(i for i, row in enumerate(rows) if len(row) != width)
                raise InputError(f"{src.name} line {_line_of(src, start + r)} has "
                                 f"{len(rows[r])} fields; the header has {width}",
                                 row=start + r)
            columns = {name: [row[i] for row in rows] for name, i in zip(wanted, at, strict=True)}
            yield _encode_chunk(src, schema, columns, start, count_column)
            start += len(rows)


def _encode_chunk(src: Path, schema: InputSchema, columns: dict[str, list[str]], start: int,
                  count_column: str | None) -> tuple[EncodedBatch, np.ndarray]:
    try:
        batch = schema.encode_text(columns)
    except InputError as exc:
        if exc.row is None:
            raise
        # The schema numbers rows within the chunk: restate them for the whole file.
        row = start + exc.row
        message = re.sub(rf"\brow {exc.row}\b", f"row {row}", exc.message, count=1)
        raise InputError(f"{src.name} line {_line_of(src, row)}: {message}", field=exc.field,
                         row=row) from exc
    if count_column is None:
        return batch, np.ones(len(batch), dtype=np.int64)
    texts = columns[count_column]
    try:
        counts = np.array([int(t) for t in texts], dtype=np.int64)
    except (ValueError, OverflowError):
        counts = None
    if counts is None or (counts < 0).any():
        r = next(i for i, t in enumerate(texts) if not _is_count(t))
        raise InputError(f"{src.name} line {_line_of(src, start + r)} (row {start + r}): "
                         f"column {count_column!r} holds {texts[r]!r}; a count must be a whole "
                         "number >= 0", field=count_column, row=start + r)
    return batch, counts


def _line_of(src: Path, row: int) -> int:
    """Line number of data row ``row`` (0-based), for error messages only: reads the file
    again rather than tracking every row's line on the fast path."""
    with open(src, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        seen = -1  # the header
        for record in reader:
            if record:
                seen += 1
                if seen > row:
                    return reader.line_num
    return reader.line_num


def _is_count(text: str) -> bool:
    try:
        return 0 <= int(text) < 2**63
    except ValueError:
        return False


class _Distinct:
    """Distinct keys seen so far, their summed counts and one encoded row each."""

    def __init__(self, schema: InputSchema) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, EncodedBatch]] = []
        self._pending = 0
        self._compacted = 0
        self._categories = [np.array(f.categories, dtype=object)
                            for f in schema.features if f.kind == CATEGORICAL]

    def add(self, keys: np.ndarray, counts: np.ndarray, batch: EncodedBatch) -> None:
        """Count one chunk."""
        part = self._merge([(keys, counts, batch)])
        # Point seen categories at the schema's strings so the CSV's copies can be freed.
        for j, cats in enumerate(self._categories):
            seen = part[2].codes[:, j] >= 0
            part[2].cat[seen, j] = cats[part[2].codes[seen, j]]
        self._parts.append(part)
        self._pending += len(part[0])
        # Re-merge when the unmerged parts outgrow what is merged: memory stays O(distinct).
        if self._pending > max(1_000_000, 2 * self._compacted):
            self._parts = [self._merge(self._parts)]
            self._compacted = self._pending = len(self._parts[0][0])

    def result(self) -> tuple[np.ndarray, np.ndarray, EncodedBatch]:
        """Return keys (sorted by bytes), their counts and one encoded row per key."""
        if not self._parts:
            return np.empty((0, 0), np.uint8), np.empty(0, np.int64), _EMPTY
        return self._merge(self._parts)

    @staticmethod
    def _merge(parts: list[tuple[np.ndarray, np.ndarray, EncodedBatch]]
               ) -> tuple[np.ndarray, np.ndarray, EncodedBatch]:
        keys = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        counts = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        batch = _concat([p[2] for p in parts])
        void = np.ascontiguousarray(keys).view(np.dtype((np.void, keys.shape[1]))).ravel()
        _, first, inverse = np.unique(void, return_index=True, return_inverse=True)
        summed = np.zeros(len(first), dtype=np.int64)
        np.add.at(summed, inverse.ravel(), counts)
        return keys[first], summed, batch.take(first)


_EMPTY = EncodedBatch(np.empty((0, 0), np.float32), np.empty((0, 0), object),
                      np.empty((0, 0), np.int32), np.empty(0, bool), np.empty(0, bool))


def _concat(batches: list[EncodedBatch]) -> EncodedBatch:
    if len(batches) == 1:
        return batches[0]
    return EncodedBatch(*(np.concatenate([getattr(b, f) for b in batches])
                          for f in ("num", "cat", "codes", "out_of_range", "unseen")))


def _predict(model: bytes, schema: InputSchema, task: str, batch: EncodedBatch
             ) -> dict[str, np.ndarray]:
    """Run the model over ``batch`` in slices; return write_table's output arguments."""
    session = ModelSession(model, schema, task, threads=2)
    parts = [session.run(batch.take(np.arange(i, min(i + RUN_ROWS, len(batch)))))
             for i in range(0, len(batch), RUN_ROWS)]
    if task == "regression":
        return {"values": np.concatenate([p.values for p in parts if p.values is not None])}
    return {"labels": np.concatenate([p.labels for p in parts if p.labels is not None]),
            "probabilities": np.concatenate(
                [p.probabilities for p in parts if p.probabilities is not None])}
