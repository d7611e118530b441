"""The edge's transport rules: https or loopback, pinned CAs, tokens off the command line,
no redirects.

Servers are real loopback HTTP(S) servers (``tests.edge.hostile``) with certificates from a
throwaway CA (``tests.tlskit``).
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridml.edge import cli
from hybridml.edge.client import CloudClient, read_token_file
from hybridml.edge.runtime import EdgeRuntime
from hybridml.shared.errors import CloudUnavailableError, ConfigError, RemoteError
from tests.edge.hostile import GZIP, Answer, HostileServer, gzip_zeros
from tests.tlskit import TLSFiles, make_tls

MANIFEST = "/v1/models/iris/manifest"
BODY = b'{"format": 1}'


@pytest.fixture(autouse=True)
def _no_ambient_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HYBRIDML_ALLOW_HTTP", "HYBRIDML_CA_BUNDLE", "HYBRIDML_TOKEN",
                 "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HYBRIDML_CLOUD"):
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------------ plain http
@pytest.mark.parametrize("url", ["http://example.com", "http://10.1.2.3:8000/",
                                 "http://[2001:db8::1]:8000", "HTTP://192.168.0.7"])
def test_http_to_a_host_off_this_machine_is_refused_before_any_connection(url: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err:
        CloudClient(url, token="hml_secret")
    assert time.monotonic() - t0 < 0.5  # no DNS, no connect: refused at construction
    message = err.value.message
    assert "refusing plain http://" in message and "read this device's token" in message
    assert "https://" in message and "--allow-http" in message
    assert err.value.details["field"] == "cloud"


def test_http_off_this_machine_is_allowed_when_the_operator_says_the_network_is_trusted(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert CloudClient("http://10.1.2.3:8000", allow_http=True).host == "10.1.2.3"
    with pytest.raises(ConfigError):
        EdgeRuntime(tmp_path / "s", "iris", "http://10.1.2.3:8000")
    rt = EdgeRuntime(tmp_path / "s", "iris", "http://10.1.2.3:8000", allow_http=True)
    assert rt.client is not None
    monkeypatch.setenv("HYBRIDML_ALLOW_HTTP", "1")
    assert CloudClient("http://10.1.2.3:8000").host == "10.1.2.3"
    monkeypatch.setenv("HYBRIDML_ALLOW_HTTP", "perhaps")
    with pytest.raises(ConfigError, match="HYBRIDML_ALLOW_HTTP='perhaps' is not a yes/no"):
        CloudClient("http://10.1.2.3:8000")


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.8.9.10",
                                 "http://localhost:8000/", "http://[::1]:8000",
                                 "https://example.com"])
def test_loopback_http_and_any_https_are_accepted(url: str) -> None:
    assert CloudClient(url).base_url == url.rstrip("/")


@pytest.mark.parametrize("url", ["ftp://example.com", "127.0.0.1:8000", "file:///tmp/x",
                                 "https://", "https://host:notaport"])
def test_only_http_and_https_urls_with_a_host_are_accepted(url: str) -> None:
    with pytest.raises(ConfigError, match="https://HOST"):
        CloudClient(url)


# ----------------------------------------------------------------------------------- TLS
@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A CA, a loopback certificate it signed, and a stranger CA."""
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def https(tls: TLSFiles) -> Iterator[HostileServer]:
    """An https server whose certificate the test CA signed (for 127.0.0.1 and localhost)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls.cert, tls.key)
    with HostileServer({MANIFEST: Answer(200, BODY)}, tls=ctx) as s:
        yield s


def test_a_pinned_ca_bundle_verifies_the_cloud(https: HostileServer, tls: TLSFiles,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert CloudClient(https.url, ca_bundle=tls.ca).manifest("iris").body == BODY
    # The pin wins over requests' own environment variable ...
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls.other_ca))
    assert CloudClient(https.url, ca_bundle=str(tls.ca)).manifest("iris").body == BODY
    # ... and $HYBRIDML_CA_BUNDLE pins it when no argument does.
    monkeypatch.setenv("HYBRIDML_CA_BUNDLE", str(tls.ca))
    assert CloudClient(https.url).manifest("iris").body == BODY


def test_an_unverified_certificate_is_cloud_unavailable_saying_what_to_do(
        https: HostileServer, tls: TLSFiles) -> None:
    with pytest.raises(CloudUnavailableError) as err:
        CloudClient(https.url).manifest("iris")
    message = err.value.message
    assert "TLS certificate of 127.0.0.1 could not be verified against the system CAs" in \
        message
    assert "certificate verify failed" in message or "self-signed" in message or \
        "unable to get local issuer" in message
    assert "--ca-bundle" in message
    with pytest.raises(CloudUnavailableError, match=f"against {tls.other_ca}"):
        CloudClient(https.url, ca_bundle=tls.other_ca).manifest("iris")


def test_a_certificate_for_another_name_is_refused(tls: TLSFiles, tmp_path: Path) -> None:
    other = make_tls(tmp_path / "other", names=("cloud.example",))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(other.cert, other.key)
    with HostileServer({MANIFEST: Answer(200, BODY)}, tls=ctx) as s, \
            pytest.raises(CloudUnavailableError, match=r"could not be verified.*match"):
        CloudClient(s.url, ca_bundle=other.ca).manifest("iris")


def test_a_missing_or_unusable_ca_bundle_is_a_config_error_naming_the_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"--ca-bundle .*nope.pem: cannot read it"):
        CloudClient("https://cloud.example", ca_bundle=tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        CloudClient("https://cloud.example", ca_bundle=junk)
    monkeypatch.setenv("HYBRIDML_CA_BUNDLE", str(tmp_path / "gone.pem"))
    with pytest.raises(ConfigError, match=r"\$HYBRIDML_CA_BUNDLE .*gone.pem"):
        CloudClient("https://cloud.example")


# --------------------------------------------------------------------------------- tokens
def token_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_token_file_only_its_owner_can_read_gives_the_stripped_token(tmp_path: Path) -> None:
    f = token_file(tmp_path / "token", "  hml_abc_123\n\n")
    assert read_token_file(f) == "hml_abc_123"
    assert read_token_file(token_file(tmp_path / "ro", "hml_x", 0o400)) == "hml_x"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602, 0o660])
def test_a_token_file_others_may_read_or_write_is_refused_saying_chmod_600(
        tmp_path: Path, mode: int) -> None:
    f = token_file(tmp_path / "token", "hml_abc", mode)
    with pytest.raises(ConfigError, match=f"run 'chmod 600 {f}'") as err:
        read_token_file(f)
    assert f"mode {mode:o}" in err.value.message


def test_a_token_file_that_is_not_one_token_in_a_regular_file_is_refused(
        tmp_path: Path) -> None:
    cases = {
        "empty": (token_file(tmp_path / "empty", " \n"), "is empty"),
        "missing": (tmp_path / "missing", "cannot open it"),
        "directory": (tmp_path, "not a regular file"),
        "two words": (token_file(tmp_path / "two", "hml_a hml_b"), "one word"),
        "huge": (token_file(tmp_path / "huge", "x" * 10_000), "not a token file"),
    }
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    cases["fifo"] = (fifo, "not a regular file")  # refused without waiting for a writer
    for name, (path, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            read_token_file(path)
        assert name


def test_a_token_that_cannot_be_a_header_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="the token argument"):
        CloudClient("http://127.0.0.1:1", token="hml_a\r\nX-Evil: 1")
    monkeypatch.setenv("HYBRIDML_TOKEN", "hml_a b")
    with pytest.raises(ConfigError, match=r"\$HYBRIDML_TOKEN"):
        CloudClient("http://127.0.0.1:1")


# ------------------------------------------------------------------------------------ CLI
@pytest.mark.parametrize("flag", [["--token", "hml_secret"], ["--token=hml_secret"], ["--token"]])
def test_the_cli_refuses_a_token_on_the_command_line(
        flag: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["sync", "--cloud", "http://127.0.0.1:1", "--name", "iris", "--store",
                  str(tmp_path), *flag])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--token is not accepted" in err and "$HYBRIDML_TOKEN" in err
    assert "--token-file" in err and "chmod 600" in err


def test_the_cli_sends_the_token_from_a_token_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = token_file(tmp_path / "token", "hml_from_file\n")
    with HostileServer() as s:  # answers 404: the sync fails after asking
        code = cli.main(["sync", "--cloud", s.url, "--name", "iris", "--store",
                         str(tmp_path / "store"), "--token-file", str(f)])
        assert code == 2
        assert s.requests_to(MANIFEST)[-1].headers["Authorization"] == "Bearer hml_from_file"
    loose = token_file(tmp_path / "loose", "hml_x", 0o644)
    code = cli.main(["status", "--cloud", "http://127.0.0.1:1", "--store",
                     str(tmp_path / "store"), "--token-file", str(loose)])
    assert code == 2 and f"chmod 600 {loose}" in capsys.readouterr().err


def test_the_cli_passes_ca_bundle_and_allow_http_to_the_client(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(tmp_path / "store")
    code = cli.main(["sync", "--cloud", "http://10.1.2.3:9", "--name", "iris", "--store", store])
    assert code == 2 and "--allow-http" in capsys.readouterr().err
    code = cli.main(["sync", "--cloud", "https://127.0.0.1:1", "--name", "iris", "--store", store,
                     "--ca-bundle", str(tmp_path / "nope.pem")])
    assert code == 2 and "--ca-bundle" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["sync", "--cloud", "http://10.1.2.3:9", "--name", "x",
                                          "--allow-http", "--ca-bundle", "ca.pem"])
    assert args.allow_http and args.ca_bundle == "ca.pem"


# ------------------------------------------------------------------------------ redirects
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_its_body_never_read(status: int) -> None:
    with HostileServer() as elsewhere:
        target = f"{elsewhere.url}/steal{MANIFEST}"
        bomb = Answer(status, gzip_zeros(256 << 20), dict(GZIP, Location=target))
        with HostileServer({MANIFEST: bomb, "/v1/models/iris/predict": bomb}) as s:
            client = CloudClient(s.url, token="hml_secret")
            t0 = time.monotonic()
            with pytest.raises(RemoteError, match=f"HTTP {status} .*a redirect to "
                                                  "'127.0.0.1'; not followed"):
                client.manifest("iris")
            with pytest.raises(RemoteError, match="not followed"):
                client.predict("iris", [{"x": 1}], 5.0)
            assert time.monotonic() - t0 < 2.0
        assert elsewhere.seen == []  # the token went nowhere else
