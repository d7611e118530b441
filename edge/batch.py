"""Streaming batch scoring: ``hybridml-edge predict --input FILE`` in chunks (docs/device.md §3).

A file is read, predicted and written ``chunk_rows`` rows at a time, so peak memory is the
model's plus one chunk's, whatever the file's size::

    bytes (file or stdin) -> text blocks (UTF-8)  -> Chunk: CSV text columns or typed rows
      -> EdgeRuntime.predict_text / predict (the batch path: one encode and one run a chunk)
      -> JSON lines or the table, written before the next chunk is read

What is streamed: CSV with a header, and JSON lines (one row per line). A JSON document that is
not JSON lines (one array of rows, a pretty-printed object) is one value and is read whole, as
before: send JSON lines or CSV for large inputs.

The answers are the same as one call over the whole input: rows are numbered from the start
of the input in every error (``row`` and the message), and ``--errors report`` answers bad
rows in place. What streaming changes: an input that fails part-way (a bad row with
``--errors raise``, a CSV row with too many fields, a bad JSON line, bytes that are not
UTF-8) fails when its chunk is read, after the answers of the chunks before it were written.
The table is aligned on its first chunk: later rows use the same column widths.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

from hybridml.shared import jsontext
from hybridml.shared.errors import ConfigError, InputError
from hybridml.shared.text import column_widths, format_table

if TYPE_CHECKING:
    from .prediction import Prediction


DEFAULT_CHUNK_ROWS = 8192  # 1M rows peaked at 98/112/161 MB with 2k/8k/32k (README)
_BLOCK = 1 << 16  # bytes read at a time
_JSON_SPACE = " \t\n\r"
_BOM = b"\xef\xbb\xbf"
EXPLAIN_MAX_ROWS = 10_000  # --explain reads its input whole, up to this many rows
_HEADER = ["row", "prediction", "source", "version", "confidence", ""]
_encode = json.JSONEncoder().encode  # json.dumps with its defaults, without its per-call checks


class Scorer(Protocol):
    """What :func:`score` needs of an :class:`~hybridml.edge.runtime.EdgeRuntime`."""

    def predict(self, rows: Iterable[Any], *, errors: str = ...) -> list[Prediction]: ...

    def predict_text(self, columns: Mapping[str, Sequence[str]], *, errors: str = ...
                     ) -> list[Prediction]: ...


@dataclass(frozen=True)
class Chunk:
    """The input's rows from row ``start`` on: CSV text ``columns`` by header name, or typed
    ``rows`` (JSON)."""

    start: int
    columns: dict[str, list[str]] | None = None
    rows: list[Any] | None = None


@dataclass
class Summary:
    """What :func:`score` wrote: rows, rows answered with an error, rows marked degraded."""

    rows: int = 0
    errors: int = 0
    degraded: int = 0


# ------------------------------------------------------------------------------- reading
def open_input(path: str) -> IO[bytes]:
    """``--input``: a file opened for reading bytes, or stdin's bytes for ``-``."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except OSError as exc:
        raise ConfigError(f"cannot read --input {path}: {exc.strerror}", field="input") from exc


def text_blocks(raw: IO[bytes], path: str = "-") -> Iterator[str]:
    """The input as UTF-8 text blocks (a leading BOM dropped). Bytes are decoded here, not
    by a text stream: its newline translation would rewrite a "\\r" inside a quoted CSV
    cell. :class:`InputError` names the offset of a bad byte (counted after the BOM)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    done = 0  # bytes decoded so far
    first = True
    while True:
        try:
            data = raw.read(_BLOCK)
        except OSError as exc:
            raise ConfigError(f"cannot read --input {path}: {exc.strerror}",
                              field="input") from exc
        if first and data.startswith(_BOM):
            data = data[len(_BOM):]
        first = False
        pending = len(decoder.getstate()[0])
        try:
            text = decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            raise InputError(f"the input is not UTF-8 text (bad byte at offset "
                             f"{done - pending + exc.start}); re-save it as UTF-8",
                             field="input") from None
        done += len(data)
        if text:
            yield text
        if not data:
            return


def _lines(blocks: Iterator[str], newline_only: bool) -> Iterator[str]:
    """Lines with their endings, split at ``\\n`` only (JSON lines) or at ``\\n``, ``\\r``
    and ``\\r\\n`` (for the csv module, as a file opened with ``newline=""`` gives them)."""
    carry = ""
    for block in blocks:
        text = carry + block
        if newline_only:
            parts = text.split("\n")
            carry = parts.pop()
            yield from (part + "\n" for part in parts)
            continue
        parts = io.StringIO(text, newline="").readlines()
        carry = parts.pop()
        yield from parts
        if carry.endswith("\n"):  # a last "\r" may be half of a "\r\n": kept for the next
            yield carry
            carry = ""
    if carry:
        yield carry


def chunks(path: str, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[Chunk]:
    """The input at ``path`` (``-``: stdin) in chunks of ``chunk_rows`` rows; at least one
    chunk (maybe empty), so a wrong CSV header is refused even without rows.

    JSON (a first character ``[`` or ``{``) is strict, as the cloud reads it, and gives
    typed rows; CSV gives text columns by header name, typed later by the model's schema.
    """
    if chunk_rows < 1:
        raise ConfigError(f"--chunk-rows {chunk_rows}: use a positive number of rows",
                          field="chunk_rows")
    raw = open_input(path)
    try:
        blocks = _skip_space(text_blocks(raw, path))
        head = next(blocks, "")
        if not head:
            raise InputError("no input rows: send JSON objects (one per line or an array) or "
                             "CSV with a header", field="input")
        rest = itertools.chain([head], blocks)
        if head[0] in "[{":
            yield from _json_chunks(rest, chunk_rows)
        else:
            yield from _csv_chunks(rest, chunk_rows)
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


def _skip_space(blocks: Iterator[str]) -> Iterator[str]:
    for block in blocks:
        block = block.lstrip()
        if block:
            yield block
            break
    yield from blocks


def explain_input(path: str) -> list[Any] | dict[str, list[str]]:
    """The input of ``predict --explain``, read whole (typed rows, or CSV text columns):
    at most :data:`EXPLAIN_MAX_ROWS` rows, else :class:`InputError`."""
    it = chunks(path, EXPLAIN_MAX_ROWS)
    first = next(it)
    if next(it, None) is not None:
        raise InputError(f"--explain answers at most {EXPLAIN_MAX_ROWS:,} rows at a time; "
                         "split the input, or predict without --explain", field="input")
    if first.columns is not None:
        return first.columns
    assert first.rows is not None
    return first.rows


def _csv_chunks(blocks: Iterator[str], chunk_rows: int) -> Iterator[Chunk]:
    """CSV in chunks of text columns; every cell stays text (a short line's missing cells
    are empty, i.e. missing). Quoted fields may hold newlines."""
    reader = csv.reader(_lines(blocks, False))
    header = [h.strip() for h in next(reader)]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise InputError(f"the CSV header names column {dupes[0]!r} twice", field=dupes[0])
    start = 0
    records: list[list[str]] = []
    emitted = False
    width = len(header)
    for rec in reader:
        if len(rec) != width:
            if not rec:
                continue
            if len(rec) > width:
                n = start + len(records)
                raise InputError(f"CSV row {n} has {len(rec)} fields, the header {width}; "
                                 "fix the quoting or the separators", field="input", row=n)
            rec += [""] * (width - len(rec))  # a short line's missing cells are missing
        records.append(rec)
        if len(records) == chunk_rows:
            yield Chunk(start, columns=_columns(header, records))
            emitted = True
            start, records = start + len(records), []
    if records or not emitted:
        yield Chunk(start, columns=_columns(header, records))


def _columns(header: list[str], records: list[list[str]]) -> dict[str, list[str]]:
    """Records of the header's width as columns by name."""
    if not records:
        return {h: [] for h in header}
    return {h: list(col) for h, col in zip(header, zip(*records))}


def _json_chunks(blocks: Iterator[str], chunk_rows: int) -> Iterator[Chunk]:
    """JSON lines in chunks; any other JSON document is read whole (:func:`_json_rows`).

    The first line decides, as :func:`_json_rows` would: when it is a JSON value and more
    follows, the input is JSON lines (each line one row, numbered from 1 in errors);
    otherwise it is one document.
    """
    lines = _lines(blocks, True)
    first = next(lines)
    try:
        value = jsontext.loads(first.removesuffix("\n"), "input line 1", field="input")
    except InputError:  # a document over several lines (or not JSON): read it whole
        yield from _list_chunks(_json_rows(first + "".join(lines)), chunk_rows)
        return
    ahead: list[str] = []
    for line in lines:
        ahead.append(line)
        if line.strip(_JSON_SPACE):
            break
    if not any(line.strip(_JSON_SPACE) for line in ahead):  # one value: _json_rows's rule
        yield from _list_chunks(_rows_of(value), chunk_rows)
        return
    rows: list[Any] = [value]
    start = 0
    for number, line in enumerate(itertools.chain(ahead, lines), start=2):
        if not line.strip():
            continue
        rows.append(jsontext.loads(line.removesuffix("\n"), f"input line {number}",
                                   field="input"))
        if len(rows) == chunk_rows:
            yield Chunk(start, rows=rows)
            start, rows = start + len(rows), []
    if rows or not start:
        yield Chunk(start, rows=rows)


def _list_chunks(rows: list[Any], chunk_rows: int) -> Iterator[Chunk]:
    for start in range(0, max(len(rows), 1), chunk_rows):
        yield Chunk(start, rows=rows[start:start + chunk_rows])


def _json_rows(text: str) -> list[Any]:
    """The rows of a whole JSON input: one value (:func:`_rows_of`), else JSON lines (one
    row per line). JSON is strict, as the cloud reads it."""
    try:
        data = jsontext.loads(text, "the input", field="input")
    except InputError:  # several JSON values: JSON lines
        rows = []
        for n, line in enumerate(text.split("\n")):  # JSON lines end at \n only
            if line.strip():
                rows.append(jsontext.loads(line, f"input line {n + 1}", field="input"))
        return rows
    return _rows_of(data)


def _rows_of(data: Any) -> list[Any]:
    """The rows of one JSON value: an object is one row; an array is an array of rows when
    every element is a row, else one row in schema order (a bad cell of one row, refused
    naming its column, not an array of rows with numbers in it)."""
    if isinstance(data, dict):
        return [data]
    if data and all(isinstance(v, (list, dict)) for v in data):
        return list(data)
    return [data] if data else []


# ------------------------------------------------------------------------------- scoring
def score(rt: Scorer, path: str, out: IO[str], *, errors: str = "raise",
          as_json: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> Summary:
    """Predict every row of the input at ``path`` with ``rt``, chunk by chunk, writing the
    answers to ``out`` as JSON lines (``as_json``) or a table; errors as in
    :meth:`EdgeRuntime.predict <hybridml.edge.runtime.EdgeRuntime.predict>`, numbered from
    the start of the input."""
    summary = Summary()
    table = _Table(out, chunk_rows)
    for chunk in chunks(path, chunk_rows):
        try:
            if chunk.columns is not None:
                preds = rt.predict_text(chunk.columns, errors=errors)
            else:
                assert chunk.rows is not None
                preds = rt.predict(chunk.rows, errors=errors)
        except InputError as exc:
            raise shifted(exc, chunk.start) from None
        for p in preds:
            if p.error is not None:
                summary.errors += 1
                if chunk.start:
                    p.error = _shifted_body(p.error, chunk.start)
            if p.degraded:
                summary.degraded += 1
        if as_json:
            out.write("".join(_encode(dict(p.to_json(), prediction=short(p.prediction)))
                              + "\n" for p in preds))
        else:
            table.write(chunk.start, preds)
        summary.rows += len(preds)
    if not as_json:
        table.close()
    out.flush()
    return summary


def shifted(err: InputError, offset: int) -> InputError:
    """``err`` about row ``r`` of a chunk, restated for row ``r + offset`` of the input."""
    if err.row is None or not offset:
        return err
    body = _shifted_body(err.to_json()["error"], offset)
    details = dict(body.get("details", {}))
    row, field = details.pop("row"), details.pop("field", None)
    return InputError(body["message"], row=row, field=field, **details)


def _shifted_body(body: dict[str, Any], offset: int) -> dict[str, Any]:
    details = body.get("details") or {}
    row = details.get("row")
    if not isinstance(row, int):
        return body
    message = re.sub(rf"\brow {row}\b", f"row {row + offset}", str(body.get("message")),
                     count=1)
    return dict(body, message=message, details=dict(details, row=row + offset))


def short(value: Any) -> Any:
    """Model outputs are float32: print the shortest text that round-trips, not 23.37200164."""
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


class _Table:
    """The table output, aligned on its first chunk (later rows keep those widths)."""

    def __init__(self, out: IO[str], chunk_rows: int) -> None:
        self.out = out
        self.chunk_rows = chunk_rows
        self.widths: list[int] | None = None

    def write(self, start: int, preds: list[Prediction]) -> None:
        cells = [_cells(start + i, p) for i, p in enumerate(preds)]
        first = self.widths is None
        if self.widths is None:
            self.widths = column_widths(_HEADER, cells)
            if len(preds) >= self.chunk_rows:  # more may follow: room for 7-digit rows
                self.widths[0] = max(self.widths[0], 7)
        if cells or first:
            self.out.write(format_table(_HEADER, cells, rule=False, widths=self.widths,
                                        show_header=first) + "\n")

    def close(self) -> None:
        if self.widths is None:  # no rows: the header alone
            self.write(0, [])


def _cells(i: int, p: Prediction) -> list[str]:
    if p.error:
        return [str(i), "-", "-", "-", "-", f"error: {p.error.get('message')}"]
    return [str(i), str(short(p.prediction)), p.source, f"v{p.model_version}",
            f"{max(p.probabilities.values()):.3f}" if p.probabilities else "-",
            ("degraded " if p.degraded else "") + (f"({p.reason})" if p.reason else "")]


__all__ = ["DEFAULT_CHUNK_ROWS", "EXPLAIN_MAX_ROWS", "Chunk", "Scorer", "Summary", "chunks",
           "explain_input", "open_input", "score", "shifted", "short", "text_blocks"]
