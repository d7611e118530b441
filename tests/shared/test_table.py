"""shared.table: the memory-mapped precomputed-predictions file and its exact-match lookups."""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridml.shared.errors import TableError
from hybridml.shared.schema import Feature, InputSchema
from hybridml.shared.table import MAGIC, Table, hash_keys, key_hash, write_table

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


@pytest.fixture
def schema() -> InputSchema:
    return InputSchema((
        Feature("hour", "numeric", 0.0, 23.0),
        Feature("shop", "categorical", categories=("r001", "r002", "r003")),
        Feature("distance", "numeric", 0.0, 10.0),
    ))


def rows(n: int, seed: int = 0) -> list[list[Any]]:
    rng = np.random.default_rng(seed)
    shops = ["r001", "r002", "r003", "zzz"]
    return [[float(i % 24), shops[i % 4], float(rng.integers(0, 1000)) / 100] for i in range(n)]


def classifier_table(path: Path, schema: InputSchema, n: int = 200
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keys = schema.keys(schema.encode(rows(n)))
    keys = np.unique(keys, axis=0)
    rng = np.random.default_rng(1)
    probs = rng.random((len(keys), 3)).astype(np.float32)
    labels = probs.argmax(axis=1)
    write_table(path, model_sha256=SHA, task="multiclass", keys=keys, labels=labels,
                probabilities=probs)
    return keys, labels, probs


def header_of(path: Path) -> tuple[dict[str, Any], int]:
    """Parse the documented layout by hand: magic, uint64 length, JSON, 64-byte alignment."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[8:16], "little")
    return json.loads(raw[16:16 + length]), -(-(16 + length) // 64) * 64


def test_classifier_table_round_trips_labels_and_probabilities(
        tmp_path: Path, schema: InputSchema) -> None:
    path = tmp_path / "t.tbl"
    keys, labels, probs = classifier_table(path, schema)
    with Table.open(path, model_sha256=SHA) as table:
        assert len(table) == len(keys) and table.task == "multiclass"
        assert table.model_sha256 == SHA and table.n_classes == 3
        assert table.key_width == schema.key_width and table.nbytes == path.stat().st_size
        for r in range(len(keys)):
            i = table.lookup(keys[r].tobytes())
            assert i >= 0
            assert table.label(i) == labels[r]
            assert np.array_equal(table.probabilities(i), probs[r])
        idx = table.lookup_many(keys)
        got_labels, got_probs, got_values = table.take(idx)
        assert got_values is None and got_probs is not None
        assert np.array_equal(got_labels, labels) and np.array_equal(got_probs, probs)


def test_regression_table_round_trips_values(tmp_path: Path, schema: InputSchema) -> None:
    keys = np.unique(schema.keys(schema.encode(rows(100))), axis=0)
    values = np.linspace(-5, 5, len(keys)).astype(np.float32)
    write_table(tmp_path / "r.tbl", model_sha256=SHA, task="regression", keys=keys,
                values=values)
    with Table.open(tmp_path / "r.tbl") as table:
        assert table.task == "regression" and table.n_classes == 0
        idx = table.lookup_many(keys)
        assert [table.value(int(i)) for i in idx] == values.tolist()
        with pytest.raises(TableError, match="regression table and holds no labels"):
            table.label(0)


def test_nan_and_negative_zero_rows_hit_the_row_built_from_their_canonical_twin(
        tmp_path: Path, schema: InputSchema) -> None:
    stored = schema.encode([[0.0, "r001", math.nan], [None, "r002", 1.5]])
    write_table(tmp_path / "t.tbl", model_sha256=SHA, task="regression",
                keys=schema.keys(stored), values=np.array([1.0, 2.0], np.float32))
    asked = schema.encode([[-0.0, "r001", None], [math.nan, "r002", 1.5], [0.0, "r002", 1.5]])
    with Table.open(tmp_path / "t.tbl") as table:
        hits = table.lookup_many(schema.keys(asked))
        assert [table.value(int(i)) for i in hits[:2]] == [1.0, 2.0]
        assert hits[2] == -1
        assert table.lookup(schema.keys(asked)[0].tobytes()) == hits[0]


def test_keys_not_in_the_table_never_hit(tmp_path: Path, schema: InputSchema) -> None:
    path = tmp_path / "t.tbl"
    keys, _, _ = classifier_table(path, schema, n=500)
    rng = np.random.default_rng(7)
    strangers = rng.integers(0, 256, (3000, keys.shape[1]), dtype=np.uint8)
    # Keys one bit away from stored ones: the likeliest near misses.
    flipped = keys.copy()
    flipped[:, -1] ^= 1
    with Table.open(path) as table:
        for probe in (strangers, flipped):
            assert (table.lookup_many(probe) == -1).all()
            assert all(table.lookup(k.tobytes()) == -1 for k in probe)


def test_equal_hashes_are_told_apart_by_exact_key_bytes(tmp_path: Path) -> None:
    a, b = bytes(range(8)), bytes(range(1, 9))
    path = tmp_path / "t.tbl"
    write_table(path, model_sha256=SHA, task="regression",
                keys=np.frombuffer(a + b, np.uint8).reshape(2, 8),
                values=np.array([10.0, 20.0], np.float32))
    # Forge a collision on disk: both rows get a's hash, and b's key sits first, so finding a
    # means stepping past an equal hash whose key differs.
    header, start = header_of(path)
    raw = bytearray(path.read_bytes())
    arr = header["arrays"]
    hashes = np.frombuffer(raw, "<u8", 2, start + arr["hashes"]["offset"])
    keys = np.frombuffer(raw, np.uint8, 16, start + arr["keys"]["offset"]).reshape(2, 8)
    values = np.frombuffer(raw, "<f4", 2, start + arr["values"]["offset"])
    hashes[:] = key_hash(a)
    keys[0], keys[1] = np.frombuffer(b, np.uint8), np.frombuffer(a, np.uint8)
    values[:] = [20.0, 10.0]
    path.write_bytes(bytes(raw))
    with Table.open(path) as table:
        assert table.value(table.lookup(a)) == 10.0
        assert table.lookup_many(np.frombuffer(a, np.uint8).reshape(1, 8)).tolist() == [1]
        assert table.lookup(b) == -1  # b's real hash is not in the table: a miss, not row 0
        assert table.lookup(a[:-1] + b"\xff") == -1
        with pytest.raises(TableError, match="a key does not match its hash"):
            table.verify()


def test_duplicate_keys_are_refused(tmp_path: Path, schema: InputSchema) -> None:
    keys = schema.keys(schema.encode([[1.0, "r001", 2.0], [1.0, "r001", 2.0]]))
    with pytest.raises(TableError, match="duplicate key") as err:
        write_table(tmp_path / "t.tbl", model_sha256=SHA, task="regression", keys=keys,
                    values=np.zeros(2, np.float32))
    assert err.value.code == "table"
    assert not list(tmp_path.iterdir())  # nothing written, not even a temp file


def test_write_leaves_only_the_final_file(tmp_path: Path, schema: InputSchema) -> None:
    classifier_table(tmp_path / "t.tbl", schema)
    classifier_table(tmp_path / "t.tbl", schema)  # replacing an existing table
    assert [p.name for p in tmp_path.iterdir()] == ["t.tbl"]


@pytest.mark.parametrize("keep", [0, 10, 40, -1])
def test_truncated_file_is_a_table_error(tmp_path: Path, schema: InputSchema,
                                         keep: int) -> None:
    path = tmp_path / "t.tbl"
    classifier_table(path, schema)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    with pytest.raises(TableError, match="truncated"):
        Table.open(path)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda raw: b"PK\x03\x04" + raw[4:], "not a hybridml table"),
    (lambda raw: MAGIC[:6] + b"02" + raw[8:], "has format '02'"),
    (lambda raw: raw.replace(b'"format": 1', b'"format": 2'), "format 2"),
    (lambda raw: raw.replace(b'"n_rows": ', b'"n_rows":-'), "inconsistent header"),
    (lambda raw: raw.replace(b'"task": "multiclass"', b'"task": "multiclass}'),
     "corrupt header"),
    (lambda raw: raw + b"\0" * 64, "trailing bytes"),
])
def test_corrupt_file_is_a_table_error_naming_the_problem(
        tmp_path: Path, schema: InputSchema, edit: Any, needle: str) -> None:
    path = tmp_path / "t.tbl"
    classifier_table(path, schema)
    path.write_bytes(edit(path.read_bytes()))
    with pytest.raises(TableError, match=needle):
        Table.open(path)


def test_missing_file_is_a_table_error(tmp_path: Path) -> None:
    with pytest.raises(TableError, match="cannot open table"):
        Table.open(tmp_path / "absent.tbl")


def test_table_built_for_another_model_is_refused(tmp_path: Path, schema: InputSchema) -> None:
    classifier_table(tmp_path / "t.tbl", schema)
    with pytest.raises(TableError) as err:
        Table.open(tmp_path / "t.tbl", model_sha256=OTHER_SHA)
    assert str(err.value) == (f"table was built for model {SHA[:12]}, the active model is "
                              f"{OTHER_SHA[:12]}; run precompute again")


def test_arrays_are_memory_mapped_not_read_into_memory(tmp_path: Path,
                                                       schema: InputSchema) -> None:
    classifier_table(tmp_path / "t.tbl", schema)
    table = Table.open(tmp_path / "t.tbl")
    for arr in table._arrays.values():
        base: Any = arr
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, memoryview):
            base = base.obj
        assert isinstance(base, mmap.mmap)
        assert not arr.flags.writeable
    _, start = header_of(tmp_path / "t.tbl")
    assert start % 64 == 0
    table.close()


def test_take_returns_copies_that_outlive_close(tmp_path: Path, schema: InputSchema) -> None:
    keys, labels, probs = classifier_table(tmp_path / "t.tbl", schema)
    table = Table.open(tmp_path / "t.tbl")
    got_labels, got_probs, _ = table.take(table.lookup_many(keys[:5]))
    table.close()
    assert got_labels is not None and np.array_equal(got_labels, labels[:5])
    assert got_probs is not None and np.array_equal(got_probs, probs[:5])


def test_lookup_many_rejects_keys_of_another_width(tmp_path: Path, schema: InputSchema) -> None:
    classifier_table(tmp_path / "t.tbl", schema)
    with Table.open(tmp_path / "t.tbl") as table, pytest.raises(TableError, match="12 bytes"):
        table.lookup_many(np.zeros((2, 8), np.uint8))


def test_empty_table_opens_and_misses(tmp_path: Path) -> None:
    write_table(tmp_path / "e.tbl", model_sha256=SHA, task="binary",
                keys=np.zeros((0, 8), np.uint8), labels=np.zeros(0, np.int64),
                probabilities=np.zeros((0, 2), np.float32))
    with Table.open(tmp_path / "e.tbl") as table:
        assert len(table) == 0
        assert table.lookup(bytes(8)) == -1
        assert table.lookup_many(np.zeros((3, 8), np.uint8)).tolist() == [-1, -1, -1]


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"model_sha256": "nothex"}, "model_sha256 must be 64"),
    ({"task": "ranking"}, "task 'ranking'"),
    ({"labels": np.zeros(3, np.int64)}, "labels has shape"),
    ({"labels": np.zeros(2, np.float32)}, "integer class indices"),
    ({"values": np.zeros(2, np.float32)}, "labels= and probabilities="),
])
def test_bad_write_arguments_name_the_field(tmp_path: Path, kwargs: dict[str, Any],
                                            needle: str) -> None:
    args: dict[str, Any] = {"model_sha256": SHA, "task": "binary",
                            "keys": np.arange(16, dtype=np.uint8).reshape(2, 8),
                            "labels": np.zeros(2, np.int64),
                            "probabilities": np.full((2, 2), 0.5, np.float32)}
    args.update(kwargs)
    with pytest.raises(TableError, match=needle):
        write_table(tmp_path / "t.tbl", **args)


def test_hash_is_stable_blake2b_of_the_key_bytes() -> None:
    keys = np.arange(24, dtype=np.uint8).reshape(3, 8)
    hashes = hash_keys(keys)
    assert hashes.dtype == np.uint64
    assert hashes.tolist() == [key_hash(k.tobytes()) for k in keys]
    # Pinned: a change here would orphan every table already deployed.
    assert key_hash(bytes(range(8))) == 8466348944351632863
