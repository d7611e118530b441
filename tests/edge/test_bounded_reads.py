"""Every body the edge reads is bounded in decoded bytes, decoded by us in bounded steps.

A hostile loopback server (``tests.edge.hostile``) answers with gzip bombs — 1 GiB of zeros
in about 1 MB — as a manifest, an error body, a prediction answer (also one dripped slowly that
the caller abandons) and an artifact. Each call must fail with its typed error within a second
or two, and, measured in a separate process (VmHWM of /proc/self/status), without its peak
memory growing by 50 MB. The decoder itself is checked for the encodings servers send.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.cloud.registry import Registry
from hybridml.cloud.train import train
from hybridml.edge.bodies import CHUNK, BodyLimits, Decoder
from hybridml.edge.client import CloudClient
from hybridml.edge.store import LocalStore
from hybridml.edge.sync import sync
from hybridml.shared.errors import (
    BodyTooLargeError,
    CloudTimeoutError,
    CloudUnavailableError,
    IntegrityError,
    RemoteError,
)
from tests.edge.hostile import GZIP, Answer, HostileServer, gzip_zeros
from tests.edgekit import install

GIB = 1 << 30
QUICK_S = 2.0  # a bounded read of a bomb ends in milliseconds; this is slack for busy CI
RSS_GROWTH = 50 << 20
SHA = "ab" * 32
ERROR_BODY = b'{"error": {"code": "injected", "message": "fault"}}'


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1 GiB of zeros as one gzip member (about 1 MB)."""
    return gzip_zeros(GIB)


@pytest.fixture(scope="module")
def server(bomb: bytes) -> Iterator[HostileServer]:
    """Bombs on every route the edge reads."""
    with HostileServer({
        "/v1/models/warm/manifest": Answer(200, gzip.compress(b'{"format": 1}'), GZIP),
        "/v1/models/bomb/manifest": Answer(200, bomb, GZIP),
        "/v1/models/fails/manifest": Answer(500, bomb, GZIP),
        "/v1/models/refuses/manifest": Answer(400, bomb, GZIP),
        "/v1/models/bomb/predict": Answer(200, bomb, GZIP),
        "/v1/models/drip/predict": Answer(200, bomb[:20_000], GZIP, drip=1, pause_s=0.01),
        "/v1/artifacts/": Answer(200, bomb, {"Content-Encoding": "gzip"}),
    }) as s:
        yield s


# ------------------------------------------------------------------------------- bombs
def test_a_gzip_bomb_manifest_stops_at_one_mebibyte_before_parsing(
        server: HostileServer) -> None:
    client = CloudClient(server.url)
    t0 = time.monotonic()
    with pytest.raises(BodyTooLargeError) as err:
        client.manifest("bomb")
    assert time.monotonic() - t0 < QUICK_S
    assert err.value.code == "body_too_large"
    assert err.value.details["limit"] == 1 << 20
    assert 1 << 20 < err.value.details["read"] <= (1 << 20) + CHUNK
    assert "the manifest of 'bomb'" in err.value.message
    assert "1,048,576" in err.value.message and "nothing from it was used or installed" in \
        err.value.message


def test_a_plain_body_past_its_bound_is_refused_too() -> None:
    with HostileServer({"/v1/models/big/manifest": Answer(200, b" " * 300_000)}) as s:
        client = CloudClient(s.url, limits=BodyLimits(manifest_bytes=100_000))
        with pytest.raises(BodyTooLargeError, match="100,000 bytes"):
            client.manifest("big")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with iris (logreg)."""
    root = tmp_path_factory.mktemp("bounded") / "reg"
    reg = Registry(root)
    train(reg, "iris", dataset="iris", model="logreg")
    reg.close()
    return root


def test_sync_of_a_bomb_manifest_fails_typed_and_keeps_the_active_version(
        server: HostileServer, registry: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    reg = Registry(registry)
    installed = install(reg, "iris", store)
    reg.close()
    bomb_route = server.routes["/v1/models/bomb/manifest"]
    server.routes["/v1/models/iris/manifest"] = bomb_route
    try:
        with pytest.raises(BodyTooLargeError):
            sync(store, CloudClient(server.url), "iris")
    finally:
        del server.routes["/v1/models/iris/manifest"]
    active = store.active("iris")
    assert active is not None and active.dumps() == installed.dumps()
    assert "body_too_large" in store.sync_state("iris")["last_error"]


def test_an_error_body_bomb_is_not_parsed(server: HostileServer) -> None:
    client = CloudClient(server.url)
    with pytest.raises(CloudUnavailableError) as err:  # a 5xx: the cloud cannot answer
        client.manifest("fails")
    assert "HTTP 500" in err.value.message and "over 65,536 bytes; not parsed" in \
        err.value.message
    with pytest.raises(BodyTooLargeError, match=r"HTTP 400 .* over 65,536 bytes; not parsed"):
        client.manifest("refuses")


def test_a_gzip_bomb_prediction_answer_stops_at_its_bound(server: HostileServer) -> None:
    client = CloudClient(server.url)
    t0 = time.monotonic()
    with pytest.raises(BodyTooLargeError) as err:
        client.predict("bomb", [{"x": 1.0}] * 3, 10.0)
    assert time.monotonic() - t0 < QUICK_S
    limits = client.limits  # 64 KiB + 4 KiB for each of the 3 rows
    assert err.value.details["limit"] == limits.answer_bytes + 3 * limits.row_bytes
    with pytest.raises(BodyTooLargeError, match="10,000 bytes"):
        client.predict("bomb", [{"x": 1.0}], 10.0, max_bytes=10_000)


def test_an_abandoned_prediction_stops_reading_and_drops_the_connection(
        server: HostileServer) -> None:
    client = CloudClient(server.url)
    t0 = time.monotonic()
    with pytest.raises(CloudTimeoutError, match=r"within 0\.3 s"):
        client.predict("drip", [{"x": 1.0}], 0.3)
    gave_up = time.monotonic()
    assert gave_up - t0 < 0.3 + 0.5
    seen = server.requests_to("/v1/models/drip/predict")[-1]
    deadline = time.monotonic() + 3.0
    while seen.gone_at is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen.gone_at is not None, "the abandoned call kept reading the answer"
    assert seen.gone_at - gave_up < 1.0


def test_a_gzip_bomb_artifact_is_refused_at_the_manifest_size_and_dropped(
        server: HostileServer, tmp_path: Path) -> None:
    part = tmp_path / f"{SHA}.part"
    client = CloudClient(server.url)
    t0 = time.monotonic()
    with pytest.raises(IntegrityError, match="longer than the manifest's 1048576 bytes"):
        client.download(SHA, part, 1 << 20)
    assert time.monotonic() - t0 < QUICK_S
    assert not part.exists()


RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from hybridml.edge.client import CloudClient
    from hybridml.shared.errors import HybridMLError

    def hwm():
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmHWM:"))

    url, tmp = sys.argv[1], Path(sys.argv[2])
    client = CloudClient(url)
    try:
        client.manifest("warm")  # loads every module and opens the pooled connection
    except HybridMLError:
        pass
    calls = {
        "manifest": lambda: client.manifest("bomb"),
        "error body": lambda: client.manifest("fails"),
        "prediction": lambda: client.predict("bomb", [{"x": 1.0}] * 10, 10.0),
        "artifact": lambda: client.download("ab" * 32, tmp / "a.part", 1 << 20),
    }
    out = {}
    for name, call in calls.items():
        before = hwm()
        try:
            call()
            error = None
        except HybridMLError as exc:
            error = exc.code
        out[name] = {"before": before, "after": hwm(), "error": error}
    print(json.dumps(out))
""")


def test_bombs_do_not_grow_peak_memory_by_50_mb(server: HostileServer, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, server.url, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print("RSS VmHWM growth per bomb:", {k: f"{(v['after'] - v['before']) / 2**20:.2f} MiB "
                                         f"(peak {v['after'] / 2**20:.1f} MiB)"
                                         for k, v in out.items()})
    assert {k: v["error"] for k, v in out.items()} == {
        "manifest": "body_too_large", "error body": "cloud_unavailable",
        "prediction": "body_too_large", "artifact": "integrity"}
    first = out["manifest"]["before"]
    for name, v in out.items():
        assert v["after"] - first < RSS_GROWTH, f"{name}: peak memory grew by " \
            f"{(v['after'] - first) / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------ decoding
def decode_all(decoder: Decoder, data: bytes, step: int = 7_000) -> bytes:
    out = []
    for at in range(0, len(data), step):
        for block in decoder.feed(data[at:at + step]):
            assert len(block) <= CHUNK
            out.append(block)
    decoder.finish()
    return b"".join(out)


TEXT = json.dumps({"rows": list(range(20_000))}).encode()


@pytest.mark.parametrize(("header", "encode"), [
    (None, lambda b: b),
    ("identity", lambda b: b),
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("gzip", lambda b: gzip.compress(b[:1000]) + gzip.compress(b[1000:])),  # two members
    ("deflate", zlib.compress),  # zlib-wrapped, as the RFC says
    ("deflate", lambda b: zlib.compress(b)[2:-4]),  # raw deflate, as some servers send
])
def test_the_decoder_reads_what_servers_send(header: str | None, encode: object) -> None:
    data = encode(TEXT)  # type: ignore[operator]
    assert decode_all(Decoder.for_header(header, "a body"), data) == TEXT
    with HostileServer({"/v1/models/m/manifest": Answer(
            200, data, {"Content-Encoding": header} if header else {})}) as s:
        assert CloudClient(s.url).manifest("m").body == TEXT


def test_one_decoding_step_never_yields_more_than_a_chunk(bomb: bytes) -> None:
    decoder = Decoder("gzip")
    blocks = decoder.feed(bomb[:100_000])  # ~100 MB of zeros, decoded lazily
    sizes = [len(next(blocks)) for _ in range(50)]
    assert max(sizes) <= CHUNK and sum(sizes) > 40 * CHUNK


@pytest.mark.parametrize("header", ["br", "zstd", "gzip, gzip", "compress", "gzip, br"])
def test_an_encoding_this_device_does_not_read_is_a_remote_error_naming_it(
        header: str) -> None:
    answer = Answer(200, b"{}", {"Content-Encoding": header})
    with HostileServer({"/v1/models/m/manifest": answer}) as s, \
            pytest.raises(RemoteError, match=f"Content-Encoding '{header}'") as err:
        CloudClient(s.url).manifest("m")
    assert err.value.details["encoding"] == header


@pytest.mark.parametrize("case", ["corrupt", "truncated", "trailing garbage", "deflate tail"])
def test_a_broken_compressed_body_is_a_remote_error(case: str) -> None:
    good = gzip.compress(TEXT)
    body, coding = {
        "corrupt": (good[:200] + bytes(b ^ 0xFF for b in good[200:400]) + good[400:], "gzip"),
        "truncated": (good[:len(good) // 2], "gzip"),
        "trailing garbage": (good + b"garbage!", "gzip"),
        "deflate tail": (zlib.compress(TEXT) + b"more", "deflate"),
    }[case]
    answer = Answer(200, body, {"Content-Encoding": coding})
    with HostileServer({"/v1/models/m/manifest": answer}) as s, \
            pytest.raises(RemoteError, match=f"not a valid {coding} stream"):
        CloudClient(s.url).manifest("m")


def test_the_client_asks_only_for_encodings_it_decodes(server: HostileServer) -> None:
    CloudClient(server.url).manifest("warm")
    seen = server.requests_to("/v1/models/warm/manifest")[-1]
    assert seen.headers["Accept-Encoding"] == "gzip, deflate"
