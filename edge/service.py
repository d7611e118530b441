"""``hybridml-edge service print|install``: the agent as a systemd service (docs/device.md §2).

``print`` writes the unit to stdout; ``install`` writes it to ``--unit-dir`` (default
``/etc/systemd/system``) as ``hybridml-edge-<name>.service``, and the environment file holding
``HYBRIDML_TOKEN`` (default ``/etc/hybridml/<name>.env``), then prints what to run next. It
never runs ``systemctl`` or ``useradd`` itself: installing a service is the operator's call.

The unit runs ``hybridml-edge agent`` as a dedicated user, restarts it on failure, logs to the
journal, and confines it: the whole file system read-only (``ProtectSystem=strict``) but the
store (``ReadWritePaths=``), no home directories, a private ``/tmp``, no privilege gain.
systemd stops it with SIGTERM; the agent then stops at its next safe point and exits 0
(:mod:`hybridml.edge.agent`), well within ``TimeoutStopSec``.

The token never appears in the unit or on a command line: ``EnvironmentFile=`` is read by
systemd (as root) before the agent starts, and the file is created with mode 0600 from the
first byte (:func:`hybridml.shared.files.atomic_write` writes a ``mkstemp`` file, which is
0600, and renames it into place). Other lines an operator added to it are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from hybridml.shared.errors import ConfigError, HybridMLError
from hybridml.shared.files import atomic_write
from hybridml.shared.manifest import check_name

from .transport import cloud_urls, read_token_file
from .trust import TrustStore

log = logging.getLogger("hybridml.edge.service")

UNIT_DIR = "/etc/systemd/system"
ENV_DIR = "/etc/hybridml"
DEFAULT_USER = "hybridml"
RESTART_SEC = 10
# The agent stops within one download block or one pointer swap; the rest is slack for a slow
# SD card. Past it systemd sends SIGKILL, which the store survives too (edge/store.py).
TIMEOUT_STOP_SEC = 45
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")  # what useradd accepts by default
# Characters a unit file would read as something else: whitespace and quotes split words,
# a backslash escapes, % is a specifier, $ expands a variable; control characters break lines.
UNSAFE_RE = re.compile(r"[\s\"'\\%$;\x00-\x1f\x7f]")
HOME_DIRS = ("/home", "/root", "/run/user")


@dataclass(frozen=True)
class ServiceSpec:
    """What the unit runs: checked by :meth:`of`, rendered by :func:`unit_text`."""

    store: Path
    name: str
    clouds: tuple[str, ...]
    user: str = DEFAULT_USER
    env_file: Path = Path(ENV_DIR)
    interval: float = 300.0
    ca_bundle: Path | None = None
    allow_http: bool = False
    alias: str = "stable"
    program: tuple[str, ...] = ()

    @classmethod
    def of(cls, store: str, name: str, clouds: list[str], *, user: str = DEFAULT_USER,
           env_file: str | None = None, interval: float = 300.0,
           ca_bundle: str | None = None, allow_http: bool = False,
           alias: str = "stable") -> ServiceSpec:
        """The checked spec; :class:`ConfigError` naming the flag and the fix otherwise."""
        try:
            check_name(name)
        except HybridMLError as exc:
            raise ConfigError(f"--name: {exc.message}", field="name") from None
        if not USER_RE.fullmatch(user):
            raise ConfigError(f"--user {user[:40]!r} is not a system user name: use lower-case "
                              "letters, digits, '_' or '-', starting with a letter or '_'",
                              field="user")
        if not interval > 0:
            raise ConfigError(f"--interval must be a positive number of seconds, got "
                              f"{interval}", field="interval")
        urls = cloud_urls([u for item in clouds for u in item.split(",")], allow_http)
        for url in urls:
            _unit_safe(url, "cloud")
        env = Path(env_file) if env_file else Path(ENV_DIR) / f"{name}.env"
        return cls(store=_absolute(store, "store"), name=name, clouds=urls, user=user,
                   env_file=_absolute(str(env), "env_file"), interval=float(interval),
                   ca_bundle=_absolute(ca_bundle, "ca_bundle") if ca_bundle else None,
                   allow_http=allow_http, alias=_unit_safe(alias, "alias"),
                   program=agent_program())

    @property
    def unit_name(self) -> str:
        """``hybridml-edge-<name>.service``."""
        return f"hybridml-edge-{self.name}.service"

    def exec_start(self) -> list[str]:
        """The agent's command line (no token: that comes from the environment file)."""
        argv = [*self.program, "agent", "--store", str(self.store), "--name", self.name,
                "--cloud", ",".join(self.clouds), "--interval", f"{self.interval:g}"]
        if self.alias != "stable":
            argv += ["--alias", self.alias]
        if self.ca_bundle is not None:
            argv += ["--ca-bundle", str(self.ca_bundle)]
        if self.allow_http:
            argv.append("--allow-http")
        return argv


def agent_program() -> tuple[str, ...]:
    """The absolute command that runs ``hybridml-edge`` from this installation: the script
    beside this Python (a venv's ``bin``), else the one on ``$PATH``."""
    beside = Path(sys.executable).parent / "hybridml-edge"
    found = str(beside) if beside.is_file() else shutil.which("hybridml-edge")
    if found is None:
        raise ConfigError(f"no hybridml-edge script beside {sys.executable} or on $PATH; "
                          "install hybridml in the environment the service should run",
                          field="program")
    return (_absolute(found, "program").as_posix(),)


def unit_text(spec: ServiceSpec) -> str:
    """The systemd unit for ``spec``."""
    # ProtectHome=yes would hide a program, store or CA bundle under a home directory from the
    # service itself: then read-only (the store stays writable through ReadWritePaths).
    paths = [spec.program[0], str(spec.store), str(spec.ca_bundle or "")]
    home = any(p == h or p.startswith(h + "/") for p in paths for h in HOME_DIRS)
    lines = [
        f"# {spec.unit_name}: written by 'hybridml-edge service'; see docs/device.md §2",
        "[Unit]",
        f"Description=hybridml edge agent: sync and push model {spec.name}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"User={spec.user}",
        f"Group={spec.user}",
        f"EnvironmentFile={spec.env_file}",
        "ExecStart=" + " ".join(spec.exec_start()),
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={TIMEOUT_STOP_SEC}",
        "ProtectSystem=strict",
        f"ReadWritePaths={spec.store}",
        "ProtectHome=" + ("read-only" if home else "yes"),
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "StandardOutput=journal",
        "StandardError=journal",
        f"SyslogIdentifier=hybridml-edge-{spec.name}",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Installed:
    """What :func:`install` wrote, and the commands left to the operator."""

    unit_path: Path
    env_file: Path
    token_source: str
    next_steps: tuple[str, ...]


def install(spec: ServiceSpec, token: str, token_source: str, unit_dir: str = UNIT_DIR
            ) -> Installed:
    """Write the unit into ``unit_dir`` and ``HYBRIDML_TOKEN=token`` into the environment
    file (mode 0600 from creation; other lines kept); returns what to run next."""
    unit_path = _absolute(unit_dir, "unit_dir") / spec.unit_name
    try:
        unit_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(unit_path, unit_text(spec).encode(), mode=0o644)
        spec.env_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(spec.env_file, _env_text(spec.env_file, token).encode(), mode=0o600)
    except OSError as exc:
        raise ConfigError(f"cannot write {exc.filename or unit_path}: {exc.strerror or exc}; "
                          "run 'service install' as root, or give --unit-dir and --env-file "
                          "you can write", field="unit_dir") from None
    log.info("wrote %s and %s", unit_path, spec.env_file)
    return Installed(unit_path, spec.env_file, token_source, tuple(next_steps(spec)))


def next_steps(spec: ServiceSpec) -> list[str]:
    """The commands the operator runs next, as root (a missing user and store first)."""
    steps: list[str] = []
    try:
        pwd.getpwnam(spec.user)
    except KeyError:
        steps.append(f"useradd --system --no-create-home --shell /usr/sbin/nologin {spec.user}")
    if not spec.store.is_dir():
        steps.append(f"install -d -m 0750 {spec.store}")
    if not _trusts_a_key(spec.store):  # else the agent refuses every signed manifest
        steps.append(f"{spec.program[0]} trust add CLOUD_KEY.pub --store {spec.store}")
    steps += [f"chown -R {spec.user}:{spec.user} {spec.store}", "systemctl daemon-reload",
              f"systemctl enable --now {spec.unit_name}", f"journalctl -u {spec.unit_name} -f"]
    return steps


def _trusts_a_key(store: Path) -> bool:
    try:
        return bool(TrustStore(store).keys()) if store.is_dir() else False
    except (OSError, HybridMLError):
        return False


def token_for_install(token_file: str | None) -> tuple[str, str]:
    """(token, where it came from): ``--token-file`` (owner-only, as everywhere), else
    ``$HYBRIDML_TOKEN``; :class:`ConfigError` when there is none."""
    if token_file:
        return read_token_file(token_file), f"--token-file {token_file}"
    from .transport import check_token

    token = (os.environ.get("HYBRIDML_TOKEN") or "").strip()
    if not token:
        raise ConfigError("service install needs the device token: set $HYBRIDML_TOKEN or "
                          "pass --token-file FILE (chmod 600); it goes into the environment "
                          "file, never into the unit", field="token")
    return check_token(token, "$HYBRIDML_TOKEN"), "$HYBRIDML_TOKEN"


def _env_text(path: Path, token: str) -> str:
    """The environment file: ``HYBRIDML_TOKEN=token`` plus the other lines already there."""
    try:
        old = path.read_text().splitlines()
    except FileNotFoundError:
        old = ["# hybridml-edge agent: read by systemd (root) before the agent starts; "
               "keep mode 0600"]
    kept = [line for line in old if not line.strip().startswith("HYBRIDML_TOKEN=")]
    return "\n".join([*kept, f"HYBRIDML_TOKEN={token}"]) + "\n"


def _absolute(value: str, field: str) -> Path:
    flag = "--" + field.replace("_", "-")
    if not os.path.isabs(value):
        raise ConfigError(f"{flag} {value[:200]!r} must be an absolute path: a service starts "
                          f"in /, not here (try {flag} {os.path.abspath(value)})", field=field)
    return Path(os.path.normpath(_unit_safe(value, field)))


def _unit_safe(value: str, field: str) -> str:
    bad = UNSAFE_RE.search(value)
    if bad is not None:
        raise ConfigError(f"--{field.replace('_', '-')} {value[:200]!r} holds "
                          f"{bad.group()!r}, which a systemd unit would read as something "
                          "else; choose one without spaces, quotes, '\\', '%', '$' or ';'",
                          field=field)
    return value


# ------------------------------------------------------------------------------------ CLI
def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``service print`` and ``service install`` to ``hybridml-edge``."""
    sv = sub.add_parser("service", help="run the agent as a systemd service")
    ssub = sv.add_subparsers(dest="service_command", required=True)
    for command, helptext in (("print", "print the systemd unit"),
                              ("install", "write the unit and the token's environment file")):
        p = ssub.add_parser(command, help=helptext)
        p.add_argument("--store", required=True, help="the device store (absolute path)")
        p.add_argument("--name", required=True, help="the model the agent syncs")
        p.add_argument("--cloud", action="append", required=True, metavar="URL",
                       help="cloud URL (repeat, or URL1,URL2, for replicas)")
        p.add_argument("--user", default=DEFAULT_USER, help="the service's user and group "
                       f"(default {DEFAULT_USER})")
        p.add_argument("--env-file", default=None, metavar="PATH",
                       help=f"the token's environment file (default {ENV_DIR}/NAME.env)")
        p.add_argument("--interval", type=float, default=300.0, help="seconds between syncs")
        p.add_argument("--alias", default="stable", help="the alias the device follows")
        p.add_argument("--ca-bundle", default=None, metavar="PEM",
                       help="pin the cloud's CAs (absolute path)")
        p.add_argument("--allow-http", action="store_true",
                       help="allow plain http:// to a cloud off this machine")
        p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
        p.add_argument("--verbose", "-v", action="store_true", help="log INFO messages")
        if command == "install":
            p.add_argument("--unit-dir", default=UNIT_DIR,
                           help=f"where the unit goes (default {UNIT_DIR})")
            p.add_argument("--token-file", default=None, metavar="PATH",
                           help="file holding the device token (chmod 600); default: "
                           "$HYBRIDML_TOKEN")
        p.set_defaults(func=cmd_service)


def cmd_service(args: argparse.Namespace) -> int:
    """``service print|install``."""
    spec = ServiceSpec.of(args.store, args.name, args.cloud, user=args.user,
                          env_file=args.env_file, interval=args.interval,
                          ca_bundle=args.ca_bundle, allow_http=args.allow_http,
                          alias=args.alias)
    if args.service_command == "print":
        sys.stdout.write(unit_text(spec))
        return 0
    token, source = token_for_install(args.token_file)
    done = install(spec, token, source, args.unit_dir)
    print(f"wrote {done.unit_path}")
    print(f"wrote {done.env_file} (mode 0600, HYBRIDML_TOKEN from {done.token_source})")
    print("next, as root (this command runs none of them):")
    for step in done.next_steps:
        print(f"  {step}")
    return 0


__all__ = ["Installed", "ServiceSpec", "add_commands", "agent_program", "install",
           "next_steps", "unit_text"]
