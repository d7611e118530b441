"""The bearer check reads tokens through a kept-open connection: changes must still show at once."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from hybridml.cloud.tokens import TokenStore

BIN = Path(sys.executable).parent


def test_revocation_from_another_process_is_seen_at_once(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    info, token = store.create("device", "edge-1")
    assert store.authenticate(token) == info  # the reader connection is open now
    subprocess.run([str(BIN / "hybridml-cloud"), "tokens", "revoke", info.id, "--registry",
                    str(tmp_path)], check=True, capture_output=True, timeout=60)
    assert store.authenticate(token) is None


def test_tokens_of_a_deleted_token_file_stop_working(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    _, old = store.create("admin", "ops")
    assert store.authenticate(old) is not None
    store.path.unlink()  # an operator's "revoke everything"
    assert store.authenticate(old) is None
    info, new = TokenStore(tmp_path).create("device", "edge-2")  # a new file, a new inode
    assert store.authenticate(old) is None
    assert store.authenticate(new) == info


def test_a_registry_without_a_token_file_authenticates_nobody(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    assert store.authenticate("hml_0123456789ab_" + "x" * 43) is None
    assert not store.path.exists()


def test_threads_authenticate_concurrently_with_their_own_connections(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    info, token = store.create("device", "edge-1")
    _, other = store.create("device", "edge-2")
    results: list[bool] = []

    def check() -> None:
        for _ in range(50):
            results.append(store.authenticate(token) == info
                           and store.authenticate(other) is not None
                           and store.authenticate(token + "x") is None)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 200 and all(results)
