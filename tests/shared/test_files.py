"""shared.files, shared.clock and shared.signature: the small helpers both sides share."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from hybridml.shared.clock import utc_iso
from hybridml.shared.files import CRASH_ENV, atomic_write, file_sha256, fsync_dir
from hybridml.shared.signature import KEY_ID_RE, key_id_of, signed_payload


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_the_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_bytes(b"old")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and temp_files(tmp_path) == []


def test_atomic_write_takes_a_writer_for_large_content(tmp_path: Path) -> None:
    def write(fh: BinaryIO) -> None:
        fh.write(b"head")
        fh.seek(8)
        fh.write(b"tail")

    atomic_write(tmp_path / "t.table", write)
    assert (tmp_path / "t.table").read_bytes() == b"head\0\0\0\0tail"


def test_atomic_write_sets_the_mode_before_the_file_appears(tmp_path: Path) -> None:
    atomic_write(tmp_path / "k.pub", b"pem", 0o640)
    assert (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o640


def test_a_failing_writer_keeps_the_old_file_and_removes_its_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_bytes(b"old")

    def write(fh: BinaryIO) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, write)
    assert target.read_bytes() == b"old" and temp_files(tmp_path) == []


def test_sigkill_before_the_rename_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "active.json"
    target.write_bytes(b"old")
    code = ("import sys; from pathlib import Path; from hybridml.shared.files import atomic_write;"
            " atomic_write(Path(sys.argv[1]), b'new')")
    env = {**os.environ, CRASH_ENV: "before_replace:active.json"}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=env, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert target.read_bytes() == b"old"
    assert len(temp_files(tmp_path)) == 1  # whole but never renamed: the next writer's to sweep


def test_file_sha256_matches_hashlib_across_chunks(tmp_path: Path) -> None:
    data = os.urandom(3000)
    (tmp_path / "blob").write_bytes(data)
    assert file_sha256(tmp_path / "blob", chunk=1024) == hashlib.sha256(data).hexdigest()


def test_fsync_dir_accepts_a_directory(tmp_path: Path) -> None:
    fsync_dir(tmp_path)


def test_predicting_processes_do_not_pay_for_hashlib_or_tempfile() -> None:
    code = ("import sys, hybridml.shared.files, hybridml.shared.signature, "
            "hybridml.shared.clock; print(sorted({'hashlib', 'tempfile'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_utc_iso_is_whole_seconds_with_z_and_sorts_as_text() -> None:
    assert utc_iso(0) == "1970-01-01T00:00:00Z"
    assert utc_iso(1_764_270_067.9) == "2025-11-27T19:01:07Z"
    now = utc_iso()
    assert len(now) == 20 and now.endswith("Z")
    assert utc_iso(time.time() - 86400) < now


def test_key_id_is_16_hex_of_the_raw_keys_sha256() -> None:
    raw = bytes(range(32))
    assert key_id_of(raw) == hashlib.sha256(raw).hexdigest()[:16]
    assert KEY_ID_RE.fullmatch(key_id_of(raw))


def test_signed_payload_ignores_the_signature_and_key_order() -> None:
    a = {"name": "eta", "version": 2, "signature": {"alg": "ed25519"}}
    assert signed_payload(a) == signed_payload({"version": 2, "name": "eta"})
    assert signed_payload(a) == b'{"name":"eta","version":2}'
