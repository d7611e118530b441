"""``hybridml-edge service print|install``: the systemd unit, the token's environment file.

The unit is checked key by key (configparser), and by ``systemd-analyze verify`` where the
machine has it (stated in the output otherwise); its ``ExecStart`` must parse as the agent's
own command line. ``install`` writes into a temporary ``--unit-dir``/``--env-file``.
"""

from __future__ import annotations

import configparser
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from hybridml.edge.cli import build_parser, cmd_agent, main
from hybridml.edge.service import ServiceSpec, unit_text
from hybridml.shared.errors import ConfigError

NAME = "eta"
CLOUDS = ["https://cloud-a.example:8443", "https://cloud-b.example"]
TOKEN = "hml_device_token_for_the_test"
NO_USER = "hybridml-no-such-user"  # useradd is suggested for it


def service_args(command: str, store: Path, *extra: str) -> list[str]:
    return ["service", command, "--store", str(store), "--name", NAME, "--cloud", CLOUDS[0],
            "--cloud", CLOUDS[1], "--interval", "120", *extra]


def parse_unit(text: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    unit.read_string(text)
    return unit


def test_printed_unit_has_every_hardening_key_and_runs_the_agent(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(service_args("print", store)) == 0
    text = capsys.readouterr().out
    svc = parse_unit(text)["Service"]
    expected = {"Type": "simple", "Restart": "on-failure", "RestartSec": "10",
                "User": "hybridml", "Group": "hybridml",
                "EnvironmentFile": f"/etc/hybridml/{NAME}.env", "ProtectSystem": "strict",
                "ReadWritePaths": str(store), "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                "ProtectHome": "yes", "StandardOutput": "journal", "StandardError": "journal",
                "SyslogIdentifier": f"hybridml-edge-{NAME}", "KillSignal": "SIGTERM",
                "TimeoutStopSec": "45"}
    assert {k: svc.get(k) for k in expected} == expected
    assert parse_unit(text)["Install"]["WantedBy"] == "multi-user.target"
    argv = svc["ExecStart"].split()
    assert os.path.isabs(argv[0]) and os.access(argv[0], os.X_OK)
    args = build_parser().parse_args(argv[1:])  # the agent's own parser takes it
    assert args.func is cmd_agent and args.store == str(store) and args.name == NAME
    assert args.cloud == ",".join(CLOUDS) and args.interval == 120.0
    assert "TOKEN" not in text


def test_printed_unit_passes_systemd_analyze_verify(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    analyze = shutil.which("systemd-analyze")
    assert main(service_args("print", tmp_path / "store")) == 0
    path = tmp_path / f"hybridml-edge-{NAME}.service"
    path.write_text(capsys.readouterr().out)
    if analyze is None:  # the key-by-key test above still ran; say what did not
        print("SERVICE systemd-analyze is not installed: unit checked by configparser only")
        return
    done = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True,
                          timeout=60)
    print(f"SERVICE systemd-analyze verify: rc={done.returncode} {done.stderr.strip()!r}")
    # verify only warns (rc 0) on unknown keys and bad values: no output at all is the bar
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_install_writes_the_unit_and_a_0600_env_file_and_prints_the_next_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYBRIDML_TOKEN", TOKEN)
    units, env = tmp_path / "units", tmp_path / "etc" / f"{NAME}.env"
    store = tmp_path / "store"
    old = os.umask(0)  # even with no umask the token file is never readable by others
    try:
        assert main(service_args("install", store, "--unit-dir", str(units), "--env-file",
                                 str(env), "--user", NO_USER)) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    unit = (units / f"hybridml-edge-{NAME}.service").read_text()
    assert parse_unit(unit)["Service"]["EnvironmentFile"] == str(env)
    assert parse_unit(unit)["Service"]["User"] == NO_USER
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert f"HYBRIDML_TOKEN={TOKEN}\n" in env.read_text()
    assert TOKEN not in unit and TOKEN not in out
    assert list(env.parent.glob(".*.tmp")) == []
    for step in (f"useradd --system --no-create-home --shell /usr/sbin/nologin {NO_USER}",
                 f"install -d -m 0750 {store}", "trust add CLOUD_KEY.pub --store",
                 f"chown -R {NO_USER}:{NO_USER} {store}",
                 "systemctl daemon-reload", f"systemctl enable --now hybridml-edge-{NAME}"):
        assert step in out
    assert "runs none of them" in out

    # Again, with the token from a file: the token is replaced, the operator's lines kept.
    env.write_text(env.read_text() + "HYBRIDML_MEMORY_BUDGET_MB=256\n")
    token_file = tmp_path / "token"
    token_file.write_text("hml_new_token\n")
    token_file.chmod(0o600)
    assert main(service_args("install", store, "--unit-dir", str(units), "--env-file",
                             str(env), "--token-file", str(token_file))) == 0
    lines = env.read_text().splitlines()
    assert "HYBRIDML_TOKEN=hml_new_token" in lines and "HYBRIDML_MEMORY_BUDGET_MB=256" in lines
    assert not any(TOKEN in line for line in lines)
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_install_without_a_token_or_with_a_readable_token_file_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("HYBRIDML_TOKEN", raising=False)
    where = ["--unit-dir", str(tmp_path / "u"), "--env-file", str(tmp_path / "e.env")]
    assert main(service_args("install", tmp_path / "s", *where)) == 2
    assert "needs the device token" in capsys.readouterr().err
    loose = tmp_path / "token"
    loose.write_text(TOKEN)
    loose.chmod(0o644)
    assert main(service_args("install", tmp_path / "s", *where, "--token-file",
                             str(loose))) == 2
    assert "chmod 600" in capsys.readouterr().err
    assert not (tmp_path / "u").exists() and not (tmp_path / "e.env").exists()


@pytest.mark.parametrize(("change", "field", "says"), [
    ({"store": "relative/store"}, "store", "absolute path"),
    ({"store": "/var/lib/my store"}, "store", "without spaces"),
    ({"store": "/var/lib/100%"}, "store", "'%'"),
    ({"name": "eta/../x"}, "name", "invalid model name"),
    ({"name": "eta x"}, "name", "invalid model name"),
    ({"clouds": ["ftp://cloud.example"]}, "cloud", "https://"),
    ({"clouds": ["http://cloud.example"]}, "cloud", "refusing plain http"),
    ({"user": "Root!"}, "user", "system user name"),
    ({"interval": 0.0}, "interval", "positive"),
    ({"env_file": "etc/eta.env"}, "env_file", "absolute path"),
])
def test_bad_service_settings_are_refused_naming_the_flag(
        change: dict[str, object], field: str, says: str) -> None:
    settings: dict[str, object] = {"store": "/var/lib/hybridml", "name": NAME,
                                   "clouds": CLOUDS}
    settings.update(change)
    store, name, clouds = settings.pop("store"), settings.pop("name"), settings.pop("clouds")
    with pytest.raises(ConfigError, match=says) as info:
        ServiceSpec.of(store, name, clouds, **settings)  # type: ignore[arg-type]
    assert info.value.details["field"] == field


def test_a_store_under_a_home_directory_keeps_home_read_only_not_hidden() -> None:
    spec = ServiceSpec.of("/root/hybridml", NAME, CLOUDS)
    svc = parse_unit(unit_text(spec))["Service"]
    assert svc["ProtectHome"] == "read-only" and svc["ReadWritePaths"] == "/root/hybridml"
