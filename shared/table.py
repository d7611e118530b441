"""The precomputed-predictions table: one file the edge memory-maps and answers from.

Layout (format 1; every integer little-endian)::

    offset 0   magic  b"HMLTBL01"
    offset 8   uint64 length L of the JSON header
    offset 16  JSON header (UTF-8), L bytes
               zero padding up to the next multiple of 64: the data section starts there
    data       the arrays, each starting at a 64-byte aligned offset *relative to the data
               section*, as listed in the header:
                 hashes         <u8  [N]     stable 64-bit hash of each key, sorted ascending
                 keys           |u1  [N, W]  canonical key bytes, same order as ``hashes``
                 labels         <i4  [N]     class index (classifiers)
                 probabilities  <f4  [N, C]  class probabilities (classifiers)
                 values         <f4  [N]     prediction (regression)

The header holds ``format``, ``hash`` (the hash's name), ``model_sha256``, ``task``,
``n_rows``, ``key_width``, ``n_classes``, ``data_bytes`` and ``arrays`` (name -> dtype, shape,
offset). Keys come from :meth:`hybridml.shared.schema.InputSchema.keys`; the hash is blake2b
with an 8-byte digest read as a little-endian integer, identical in every process and on every
platform. A lookup hashes the key, binary-searches the hashes and then compares the full key
bytes of every row with an equal hash, so a hash collision can never produce a wrong answer.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import sys
from bisect import bisect_left
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import TableError
from .files import atomic_write

try:  # CPython's built-in BLAKE2: the same digests as hashlib's, without loading OpenSSL
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - other interpreters
    from hashlib import blake2b

MAGIC = b"HMLTBL01"
FORMAT = 1
HASH_NAME = "blake2b-64-le"
ALIGN = 64
_PREFIX = len(MAGIC) + 8
_MAX_HEADER = 1 << 20  # a real header is a few hundred bytes; more means corruption
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TASKS = ("binary", "multiclass", "regression")
# Tables whose keys fit in about this much Python memory are also indexed by a dict on first
# lookup: ~0.05 µs per lookup instead of ~1 µs for hash + binary search. Bigger tables stay
# purely memory-mapped (a 1M-row table must not cost the device its RAM).
INDEX_MAX_BYTES = 2 << 20
_INDEX_ENTRY_OVERHEAD = 100  # bytes object header + dict slot, per key
_DTYPES = {"hashes": "<u8", "keys": "|u1", "labels": "<i4", "probabilities": "<f4",
           "values": "<f4"}


def key_hash(key: bytes) -> int:
    """Return the table hash of one canonical key (an unsigned 64-bit integer)."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "little")


def hash_keys(keys: np.ndarray) -> np.ndarray:
    """Return the table hash of every row of ``keys`` (``uint8 [N, W]``) as ``uint64 [N]``."""
    keys = np.ascontiguousarray(keys, dtype=np.uint8)
    if keys.ndim != 2:
        raise TableError(f"keys must be a 2-D uint8 array [N, key_width], got shape {keys.shape}")
    n, w = keys.shape
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    flat = keys.data.cast("B")
    # One hashlib call per row (~0.5 µs); slicing a memoryview copies nothing.
    digests = b"".join([blake2b(flat[i:i + w], digest_size=8).digest()
                        for i in range(0, n * w, w)])
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def write_table(path: str | os.PathLike[str], *, model_sha256: str, task: str,
                keys: np.ndarray, labels: np.ndarray | None = None,
                probabilities: np.ndarray | None = None,
                values: np.ndarray | None = None) -> None:
    """Write a table atomically (temp file, fsync, rename) bound to ``model_sha256``.

    Classifiers (``task`` binary/multiclass) need ``labels [N]`` and ``probabilities [N, C]``;
    regression needs ``values [N]``. Rows are sorted by key hash here. Duplicate keys are
    refused with :class:`TableError`: the caller must count duplicates before writing.
    """
    if not isinstance(model_sha256, str) or not _SHA_RE.fullmatch(model_sha256):
        raise TableError(f"model_sha256 must be 64 lowercase hex digits, got {model_sha256!r}",
                         field="model_sha256")
    if task not in _TASKS:
        raise TableError(f"task {task!r} is not one of {_TASKS}", field="task")
    keys = np.ascontiguousarray(keys)
    if keys.dtype != np.uint8 or keys.ndim != 2 or keys.shape[1] == 0:
        raise TableError(f"keys must be uint8 [N, key_width], got {keys.dtype} {keys.shape}; "
                         "build them with InputSchema.keys", field="keys")
    n, width = keys.shape
    outputs: dict[str, np.ndarray] = {}
    if task == "regression":
        if values is None or labels is not None or probabilities is not None:
            raise TableError("a regression table takes values= only", field="values")
        outputs["values"] = _column(values, "values", np.float32, (n,))
        n_classes = 0
    else:
        if labels is None or probabilities is None or values is not None:
            raise TableError("a classifier table takes labels= and probabilities=",
                             field="labels")
        probs = np.asarray(probabilities)
        if probs.ndim != 2 or probs.shape[1] < 2:
            raise TableError(f"probabilities must be [N, n_classes >= 2], got {probs.shape}",
                             field="probabilities")
        n_classes = int(probs.shape[1])
        outputs["labels"] = _column(labels, "labels", np.int32, (n,))
        outputs["probabilities"] = _column(probs, "probabilities", np.float32, (n, n_classes))

    hashes = hash_keys(keys)
    order = np.lexsort((keys.view(np.dtype((np.void, width))).ravel(), hashes))
    hashes, keys = hashes[order], keys[order]
    same = np.flatnonzero(hashes[1:] == hashes[:-1])
    if same.size:
        dup = same[(keys[same] == keys[same + 1]).all(axis=1)]
        if dup.size:
            first = keys[dup[0]].tobytes().hex()
            raise TableError(f"{dup.size} duplicate key(s) given (first: {first}); count "
                             "duplicate rows before writing the table", field="keys")
    arrays = {"hashes": hashes.astype("<u8"), "keys": keys}
    arrays.update({name: np.ascontiguousarray(arr[order].astype(_DTYPES[name]))
                   for name, arr in outputs.items()})

    layout: dict[str, Any] = {}
    offset = 0
    for name, arr in arrays.items():
        layout[name] = {"dtype": _DTYPES[name], "shape": list(arr.shape), "offset": offset}
        offset = _align(offset + arr.nbytes)
    header = json.dumps({
        "format": FORMAT, "hash": HASH_NAME, "model_sha256": model_sha256, "task": task,
        "n_rows": n, "key_width": width, "n_classes": n_classes, "data_bytes": offset,
        "arrays": layout}, sort_keys=True).encode("utf-8")
    start = _align(_PREFIX + len(header))
    head = MAGIC + len(header).to_bytes(8, "little") + header

    def write(f: BinaryIO) -> None:
        f.write(head)
        f.write(b"\0" * (start - len(head)))
        for name, arr in arrays.items():
            if arr.size:  # a view with a zero in its shape cannot be cast to bytes
                f.seek(start + layout[name]["offset"])
                f.write(arr.data.cast("B"))
        f.truncate(start + offset)  # trailing alignment padding of the last array

    atomic_write(Path(path), write)


def _column(arr: np.ndarray, name: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    out = np.asarray(arr)
    if out.shape != shape:
        raise TableError(f"{name} has shape {out.shape}; expected {shape} (one per key)",
                         field=name)
    if dtype is np.int32 and out.dtype.kind not in "iu":
        raise TableError(f"{name} must hold integer class indices, got {out.dtype}", field=name)
    return out.astype(dtype, copy=False)


class Table:
    """A read-only, memory-mapped precomputed table; open it with :meth:`Table.open`.

    The arrays stay on disk (the page cache holds what lookups touch), so a table of a million
    rows costs the process almost no private memory.
    """

    def __init__(self, path: Path, mm: mmap.mmap, header: dict[str, Any], start: int) -> None:
        self.path = path
        self._mm = mm
        self._header = header
        self._n = int(header["n_rows"])
        self._width = int(header["key_width"])
        self._arrays: dict[str, np.ndarray] = {}
        for name, spec in header["arrays"].items():
            count = int(np.prod(spec["shape"], dtype=np.int64))
            arr = np.frombuffer(mm, dtype=spec["dtype"], count=count,
                                offset=start + spec["offset"])
            self._arrays[name] = arr.reshape(spec["shape"])
        self._keys_offset = start + header["arrays"]["keys"]["offset"]
        self._hashes = self._arrays["hashes"]
        # bisect on a native-order memoryview is the cheapest binary search from Python; on a
        # big-endian host fall back to the (byte-swapping) numpy array.
        self._hash_seq: Sequence[int] | np.ndarray = self._hashes
        self._hash_view: memoryview | None = None
        if sys.byteorder == "little" and self._n:
            self._hash_view = memoryview(mm)[start + header["arrays"]["hashes"]["offset"]:][
                :8 * self._n].cast("Q")
            self._hash_seq = self._hash_view
        self._index: dict[bytes, int] | None = None
        self._indexable = self._n * (self._width + _INDEX_ENTRY_OVERHEAD) <= INDEX_MAX_BYTES

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, model_sha256: str | None = None) -> Table:
        """Memory-map and validate the table at ``path``.

        When ``model_sha256`` is given, the table must have been built for that model.
        Raises :class:`TableError` naming what is wrong (missing, truncated, bad magic, wrong
        format version, inconsistent header, other model).
        """
        p = Path(path)
        try:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < _PREFIX:
                    raise TableError(f"table {p} is truncated ({size} bytes); "
                                     "download or precompute it again", path=str(p))
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise TableError(f"cannot open table {p}: {exc.strerror or exc}",
                             path=str(p)) from exc
        try:
            header, start = _read_header(p, mm, size)
        except BaseException:
            mm.close()
            raise
        table = cls(p, mm, header, start)
        if model_sha256 is not None and header["model_sha256"] != model_sha256:
            built = header["model_sha256"]
            table.close()
            raise TableError(f"table was built for model {built[:12]}, the active model is "
                             f"{model_sha256[:12]}; run precompute again", path=str(p),
                             table_model=built, model=model_sha256)
        return table

    # --------------------------------------------------------------------------------- lookup
    def lookup(self, key: bytes) -> int:
        """Return the row index of ``key`` (canonical key bytes), or -1 when it is absent."""
        if type(key) is not bytes:
            key = bytes(key)
        index = self._index
        if index is not None:
            return index.get(key, -1)
        if self._indexable:
            return self._build_index().get(key, -1)
        h = int.from_bytes(blake2b(key, digest_size=8).digest(), "little")
        hashes, n, w = self._hash_seq, self._n, self._width
        i = bisect_left(hashes, h)  # type: ignore[arg-type]
        # Equal hashes sit next to each other: compare full key bytes until one matches.
        while i < n and hashes[i] == h:
            offset = self._keys_offset + i * w
            if self._mm[offset:offset + w] == key:
                return i
            i += 1
        return -1

    def key_index(self) -> dict[bytes, int] | None:
        """The in-memory ``key -> row`` dict of a small table (built on first use), or None
        for a table too big to index (use :meth:`lookup`). Do not modify it."""
        if self._index is None and self._indexable:
            self._build_index()
        return self._index

    def _build_index(self) -> dict[bytes, int]:
        """Map every key to its row (a small table only); the first row wins, as in lookup.

        A row whose stored hash is not its key's hash is left out: the binary search could
        never find it either, so both paths give the same answers even on a forged file.
        """
        w = self._width
        keys = self._arrays["keys"] if self._n else np.empty((0, w), dtype=np.uint8)
        data = keys.tobytes()
        good = (hash_keys(keys) == self._hashes).tolist() if self._n else []
        index = {data[i * w:(i + 1) * w]: i for i in range(self._n - 1, -1, -1) if good[i]}
        self._index = index
        return index

    def lookup_many(self, keys: np.ndarray) -> np.ndarray:
        """Return the row index of each key row (``uint8 [M, key_width]``), -1 where absent."""
        keys = np.ascontiguousarray(keys, dtype=np.uint8)
        if keys.ndim != 2 or keys.shape[1] != self._width:
            raise TableError(f"keys have shape {keys.shape}; this table's keys are "
                             f"{self._width} bytes wide (was it built for another schema?)",
                             field="keys")
        m = keys.shape[0]
        out = np.full(m, -1, dtype=np.int64)
        if not m or not self._n:
            return out
        if self._indexable:
            index = self._index if self._index is not None else self._build_index()
            data, w = keys.tobytes(), self._width
            return np.fromiter((index.get(data[i:i + w], -1) for i in range(0, m * w, w)),
                               dtype=np.int64, count=m)
        h = hash_keys(keys)
        idx = np.searchsorted(self._hashes, h)
        pos = np.minimum(idx, self._n - 1)
        hit = self._hashes[pos] == h
        rows = np.flatnonzero(hit)
        exact = (self._arrays["keys"][pos[rows]] == keys[rows]).all(axis=1)
        out[rows[exact]] = pos[rows[exact]]
        # A hash match whose key differs is a collision: scan its neighbours one by one.
        for r in rows[~exact]:
            out[r] = self.lookup(keys[r].tobytes())
        return out

    # -------------------------------------------------------------------------------- outputs
    def label(self, i: int) -> int:
        """Class index stored in row ``i`` (classifiers)."""
        return int(self._output("labels")[i])

    def probabilities(self, i: int) -> np.ndarray:
        """Class probabilities of row ``i`` as a fresh ``float32 [C]`` array (classifiers)."""
        return np.array(self._output("probabilities")[i], dtype=np.float32)

    def value(self, i: int) -> float:
        """Prediction stored in row ``i`` (regression)."""
        return float(self._output("values")[i])

    def keys(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """A copy of the key bytes of ``rows``, ``uint8 [len(rows), key_width]`` (the rows'
        inputs, as :meth:`InputSchema.keys <hybridml.shared.schema.InputSchema.keys>` wrote
        them)."""
        return np.array(self._arrays["keys"][np.asarray(rows, dtype=np.intp)], dtype=np.uint8)

    def take(self, rows: np.ndarray | Sequence[int]
             ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Return copies of ``(labels int64, probabilities float32, values float32)`` at
        ``rows`` (the same order as :class:`hybridml.edge.session.Outputs`); absent ones None.
        """
        idx = np.asarray(rows, dtype=np.intp)
        if self.task == "regression":
            return None, None, np.array(self._arrays["values"][idx], dtype=np.float32)
        return (self._arrays["labels"][idx].astype(np.int64),
                np.array(self._arrays["probabilities"][idx], dtype=np.float32), None)

    def _output(self, name: str) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None:
            raise TableError(f"this is a {self.task} table and holds no {name}", field=name)
        return arr

    # ----------------------------------------------------------------------------- properties
    def __len__(self) -> int:
        return self._n

    @property
    def model_sha256(self) -> str:
        """sha256 of the model this table was built with."""
        return str(self._header["model_sha256"])

    @property
    def task(self) -> str:
        """``binary``, ``multiclass`` or ``regression``."""
        return str(self._header["task"])

    @property
    def key_width(self) -> int:
        """Bytes per key."""
        return self._width

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for regression)."""
        return int(self._header["n_classes"])

    @property
    def nbytes(self) -> int:
        """Size of the table file in bytes."""
        return len(self._mm)

    def verify(self) -> None:
        """Check every row (O(N), reads the whole file): hashes sorted and matching the keys."""
        hashes = self._hashes
        if self._n and not bool((hashes[1:] >= hashes[:-1]).all()):
            raise TableError(f"table {self.path} is corrupt: hashes are not sorted")
        if not np.array_equal(hash_keys(self._arrays["keys"]), hashes):
            raise TableError(f"table {self.path} is corrupt: a key does not match its hash")

    def close(self) -> None:
        """Unmap the file; arrays returned by :meth:`take` and friends are copies and stay valid."""
        if self._hash_view is not None:
            self._hash_view.release()
            self._hash_view = None
        self._hash_seq = ()
        self._index = None
        self._indexable = False
        self._arrays = {}
        self._hashes = np.empty(0, dtype=np.uint64)
        self._n = 0
        # Someone may still hold a view into the map; it is then unmapped when they let go.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def __enter__(self) -> Table:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Table({str(self.path)!r}, task={self.task!r}, rows={self._n}, "
                f"model={self.model_sha256[:12]})")


def _read_header(path: Path, mm: mmap.mmap, size: int) -> tuple[dict[str, Any], int]:
    """Parse and check the header against the file size; return it and the data start."""
    magic = mm[:len(MAGIC)]
    if magic != MAGIC:
        if magic[:6] == MAGIC[:6]:
            raise TableError(f"table {path} has format {magic[6:].decode('ascii', 'replace')!r}; "
                             f"this kit reads {MAGIC[6:].decode()}: upgrade hybridml or "
                             "precompute the table again", path=str(path))
        raise TableError(f"{path} is not a hybridml table (bad magic {magic!r})", path=str(path))
    length = int.from_bytes(mm[len(MAGIC):_PREFIX], "little")
    if length > _MAX_HEADER:
        raise TableError(f"table {path} is corrupt: header length {length}", path=str(path))
    if _PREFIX + length > size:
        raise TableError(f"table {path} is truncated ({size} bytes, header needs "
                         f"{_PREFIX + length}); download or precompute it again", path=str(path))
    try:
        header = json.loads(mm[_PREFIX:_PREFIX + length].decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise TableError(f"table {path} has a corrupt header: {exc}", path=str(path)) from exc
    if not isinstance(header, dict):
        raise TableError(f"table {path} has a corrupt header (not an object)", path=str(path))
    if header.get("format") != FORMAT or header.get("hash") != HASH_NAME:
        raise TableError(f"table {path} has format {header.get('format')!r} / hash "
                         f"{header.get('hash')!r}; this kit reads format {FORMAT} with "
                         f"{HASH_NAME}: precompute the table again", path=str(path))
    start = _align(_PREFIX + length)
    _check_layout(path, header, size - start)
    return header, start


def _check_layout(path: Path, h: dict[str, Any], available: int) -> None:
    def bad(what: str) -> TableError:
        return TableError(f"table {path} has an inconsistent header: {what}", path=str(path))

    n, w, c = h.get("n_rows"), h.get("key_width"), h.get("n_classes")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (n, w, c)):
        raise bad("n_rows, key_width and n_classes must be non-negative integers")
    assert isinstance(n, int) and isinstance(w, int) and isinstance(c, int)
    if h.get("task") not in _TASKS or not isinstance(h.get("model_sha256"), str):
        raise bad(f"task {h.get('task')!r} / model_sha256 {h.get('model_sha256')!r}")
    outputs = {"values": [n]} if h["task"] == "regression" else {"labels": [n],
                                                                  "probabilities": [n, c]}
    expected = {"hashes": [n], "keys": [n, w], **outputs}
    arrays = h.get("arrays")
    if not isinstance(arrays, dict) or sorted(arrays) != sorted(expected):
        raise bad(f"arrays must be {sorted(expected)}")
    data_bytes = h.get("data_bytes")
    if not isinstance(data_bytes, int) or data_bytes < 0:
        raise bad(f"data_bytes {data_bytes!r}")
    for name, shape in expected.items():
        spec = arrays[name]
        if not isinstance(spec, dict) or spec.get("dtype") != _DTYPES[name] \
                or spec.get("shape") != shape:
            raise bad(f"array {name!r} must be {_DTYPES[name]} {shape}, got {spec!r}")
        off = spec.get("offset")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[name]).itemsize
        if not isinstance(off, int) or off < 0 or off % ALIGN or off + nbytes > data_bytes:
            raise bad(f"array {name!r} has offset {off!r}")
    if available < data_bytes:
        raise TableError(f"table {path} is truncated ({available} of {data_bytes} data bytes); "
                         "download or precompute it again", path=str(path))
    if available > data_bytes:
        raise TableError(f"table {path} has {available - data_bytes} unexpected trailing bytes; "
                         "download or precompute it again", path=str(path))
