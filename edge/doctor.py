"""``hybridml-edge doctor``: is this device fit to run the edge? (docs/device.md §2)

One line per check, ``ok|warn|FAIL|skip  check  detail``; the command exits 1 when any check
fails. A check that cannot run (no ``--cloud``, say) says so as ``skip``: none is left out.

========  =====================================================================================
python    CPython >= 3.10 (``requires-python``), a 64-bit build
wheels    numpy, onnxruntime, requests, cryptography installed, each within the range the
          installed hybridml's ``Requires-Dist`` gives (the one source: pyproject.toml)
cpu       the machine and the CPU features onnxruntime's wheel needs there (:func:`check_cpu`)
disk      free space on the store's file system: warn under 100 MB, fail under 10 MB
memory    ``MemAvailable``: fail under 64 MB (onnxruntime and a small model take ~55 MB), warn
          under ``HYBRIDML_MEMORY_BUDGET_MB`` or under an active version's estimated need
          (:func:`hybridml.edge.budget.estimate`)
store     the sha256 of every artifact an active, previous or companion pointer names
clock     the wall clock is not before this installation's date; within 5 minutes of each
          reachable cloud's ``Date`` header
cloud     each ``--cloud`` URL answers ``GET /healthz``
token     an authenticated ``GET /v1/models`` answers 2xx (401/403: the token is rejected)
========  =====================================================================================
"""

from __future__ import annotations

import argparse
import calendar
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_tz
from importlib import metadata
from pathlib import Path
from typing import Any

from hybridml.preflight import platform_problem
from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import AuthError, ConfigError, HybridMLError
from hybridml.shared.files import file_sha256
from hybridml.shared.manifest import EDGE_ROLES

from . import budget
from .client import CloudClient
from .store import LocalStore
from .timebase import PLAUSIBLE_FROM
from .transport import read_token_file

log = logging.getLogger("hybridml.edge.doctor")

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
WHEELS = ("numpy", "onnxruntime", "requests", "cryptography")
MB = 1_000_000
DISK_WARN_BYTES, DISK_FAIL_BYTES = 100 * MB, 10 * MB
MEMORY_FAIL_BYTES = 64 << 20
CLOCK_SKEW_S = 300.0
ARM_OPTIONAL = {"asimddp": "dotprod", "i8mm": "i8mm", "bf16": "bf16", "sve": "sve"}
X86_OPTIONAL = ("sse4_1", "avx", "avx2", "avx512f")
BITS32 = ("armv6l", "armv7l", "armv8l", "i386", "i686")


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        """``ok    python  CPython 3.11.2, 64-bit``."""
        return f"{self.status:<6}{self.name:<8}{self.detail}"

    def to_json(self) -> dict[str, str]:
        """The check as JSON (``doctor --json``)."""
        return {"check": self.name, "status": self.status, "detail": self.detail}


# --------------------------------------------------------------------------- this machine
def check_python() -> Check:
    """CPython >= 3.10, 64-bit, on a CPU onnxruntime has wheels for: the install preflight's
    rule (:func:`hybridml.preflight.platform_problem`)."""
    problem = platform_problem()
    if problem is not None:
        return Check("python", FAIL, problem)
    return Check("python", OK,
                 f"{platform.python_implementation()} {platform.python_version()}, 64-bit")


def check_wheels(versions: dict[str, str | None] | None = None,
                 requires: list[str] | None = None) -> Check:
    """The edge's dependencies, against the installed hybridml's ``Requires-Dist``
    (arguments: for tests; default what is installed)."""
    versions = versions if versions is not None else {d: _version(d) for d in WHEELS}
    missing = [d for d, v in versions.items() if v is None]
    if missing:
        return Check("wheels", FAIL, ", ".join(missing) + " not installed; pip install "
                     "hybridml (a 64-bit OS and Python: there are no 32-bit onnxruntime wheels)")
    found = ", ".join(f"{d} {v}" for d, v in versions.items())
    try:
        from packaging.requirements import Requirement  # onnxruntime depends on packaging
    except ImportError:
        return Check("wheels", WARN, f"{found}; ranges not checked: packaging is missing")
    try:
        texts = requires if requires is not None else metadata.requires("hybridml") or []
        required = [Requirement(text) for text in texts]
    except metadata.PackageNotFoundError:
        return Check("wheels", WARN, f"{found}; ranges not checked: hybridml's metadata is "
                     "not installed (pip install hybridml)")
    ranges = {r.name.lower(): r.specifier for r in required
              if r.marker is None or r.marker.evaluate({"extra": ""})}
    bad = [f"{d} {v} is outside {ranges[d]} (pip install '{d}{ranges[d]}')"
           for d, v in versions.items()
           if d in ranges and not ranges[d].contains(str(v), prereleases=True)]
    if bad:
        return Check("wheels", FAIL, "; ".join(bad))
    return Check("wheels", OK, ", ".join(f"{d} {v}" + (f" ({ranges[d]})" if d in ranges else "")
                                         for d, v in versions.items()))


def check_cpu(machine: str | None = None, cpuinfo: str | None = None,
              ort_version: str | None = None) -> Check:
    """The CPU features onnxruntime needs here (arguments: for tests; default this machine).

    aarch64: the wheels are built for ARMv8-A with NEON (``asimd``); dotprod, i8mm, bf16 and
    SVE kernels are chosen at run time when present (reported, not required). onnxruntime
    1.21.0's aarch64 wheel died with SIGILL on Cortex-A72 (Pi 4, no dotprod: onnxruntime#23957).
    x86_64: MLAS picks SSE/AVX/AVX2/AVX-512 kernels at run time (onnxruntime#7010), so the
    x86-64 baseline (SSE2) is what is required; the rest is reported.
    """
    machine = (machine or platform.machine()).lower()
    if machine in BITS32:
        return Check("cpu", FAIL, f"{machine} is 32-bit: onnxruntime has no wheel for it "
                     "(onnxruntime#24511); install a 64-bit OS (arm64/aarch64)")
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError as exc:
            return Check("cpu", WARN, f"{machine}; cannot read /proc/cpuinfo ({exc.strerror})")
    flags = _cpu_flags(cpuinfo)
    if machine in ("aarch64", "arm64"):
        if "asimd" not in flags:
            return Check("cpu", FAIL, f"{machine} without asimd (NEON), which onnxruntime's "
                         "aarch64 wheels need")
        ort = ort_version if ort_version is not None else _version("onnxruntime")
        if ort == "1.21.0" and "asimddp" not in flags:
            return Check("cpu", FAIL, "onnxruntime 1.21.0 dies with 'Illegal instruction' on "
                         "CPUs without dotprod such as this one (onnxruntime#23957); install "
                         "another version")
        extra = ", ".join(f"{label} {'yes' if flag in flags else 'no'}"
                          for flag, label in ARM_OPTIONAL.items())
        return Check("cpu", OK, f"{machine}, asimd (NEON); optional: {extra}")
    if machine in ("x86_64", "amd64"):
        if "sse2" not in flags:
            return Check("cpu", FAIL, f"{machine} without sse2: not an x86-64 CPU "
                         "onnxruntime can run on")
        extra = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in X86_OPTIONAL)
        return Check("cpu", OK, f"{machine}, sse2; optional: {extra}")
    return Check("cpu", WARN, f"{machine}: not a CPU hybridml is tested on (aarch64, x86_64)")


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("features", "flags"):
            return set(value.split())
    return set()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_disk(root: Path) -> Check:
    """Free bytes on the file system that holds (or will hold) the store."""
    where = root
    while not where.exists() and where != where.parent:
        where = where.parent
    free = shutil.disk_usage(where).free
    detail = f"{free / MB:,.0f} MB free on the file system of {root}"
    if free < DISK_FAIL_BYTES:
        return Check("disk", FAIL, f"{detail}: under {DISK_FAIL_BYTES // MB} MB, a sync cannot "
                     "land; free space")
    if free < DISK_WARN_BYTES:
        return Check("disk", WARN, f"{detail}: under {DISK_WARN_BYTES // MB} MB")
    return Check("disk", OK, detail)


def check_memory(meminfo: str | None = None, needs: Sequence[tuple[str, float]] = ()
                 ) -> Check:
    """``MemAvailable`` against the floor, the budget (:func:`hybridml.edge.budget.budget_mb`)
    and ``needs``: (version, MB) estimates of the active versions (:func:`budget.estimate`).
    MB here are MiB, as in :mod:`hybridml.edge.budget`."""
    try:
        text = Path("/proc/meminfo").read_text() if meminfo is None else meminfo
        kb = next(int(line.split()[1]) for line in text.splitlines()
                  if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, IndexError, ValueError):
        return Check("memory", WARN, "no MemAvailable in /proc/meminfo (not Linux?)")
    avail = kb / 1024
    detail = f"MemAvailable {avail:,.0f} MB"
    if avail * (1 << 20) < MEMORY_FAIL_BYTES:
        return Check("memory", FAIL, f"{detail}: under {MEMORY_FAIL_BYTES >> 20} MB, "
                     "onnxruntime and a model do not fit")
    try:
        limit = budget.budget_mb()
    except ConfigError as exc:
        return Check("memory", FAIL, exc.message)
    detail += f"; budget {limit:g} MB" if limit is not None else f"; no {budget.ENV} set"
    worst = max(needs, key=lambda n: n[1], default=None)
    if worst is not None:
        detail += f"; {worst[0]} needs about {worst[1]:.0f} MB (estimate)"
    if limit is not None and avail < limit:
        return Check("memory", WARN, f"{detail}: less available than the budget, the kernel "
                     "may kill the edge before the budget refuses a model")
    if worst is not None and worst[1] > min(avail, limit or avail):
        return Check("memory", WARN, f"{detail}: more than this device can give it")
    return Check("memory", OK, detail)


def check_store(store: LocalStore, name: str | None = None) -> Check:
    """Recompute the sha256 of every artifact the active, previous and companion pointers
    name; a FAIL names each file that is missing (active) or does not match."""
    if not store.root.is_dir():
        return Check("store", WARN, f"no store at {store.root} yet (the first sync makes it)")
    names = [name] if name else store.model_names()
    if not names:
        return Check("store", WARN, f"no model in {store.root} (run hybridml-edge sync)")
    fails: list[str] = []
    warns: list[str] = []
    digests: dict[str, str] = {}
    total = 0
    for n in names:
        try:
            pointers = {"active": store.active(n), "previous": store.previous(n),
                        "companion": store.companion(n)}
        except HybridMLError as exc:
            fails.append(f"{n}: {exc.message}")
            continue
        if pointers["active"] is None:
            warns.append(f"{n}: no active version (run hybridml-edge sync)")
        for which, m in pointers.items():
            if m is None:
                continue
            for a in m.artifacts:
                if a.role not in EDGE_ROLES:
                    continue
                path = store.artifact_path(a.sha256)
                where = f"{n} v{m.version} ({which}) {a.role} {path}"
                if not path.is_file():
                    (fails if which == "active" else warns).append(f"{where} is missing")
                    continue
                if a.sha256 not in digests:
                    digests[a.sha256] = file_sha256(path)
                    total += path.stat().st_size
                if digests[a.sha256] != a.sha256:
                    fails.append(f"{where} is corrupted (sha256 {digests[a.sha256][:12]}, the "
                                 f"manifest says {a.sha256[:12]}): delete it"
                                 + (f" and {store.model_dir(n) / 'active.json'}"
                                    if which == "active" else "") + ", then sync")
    detail = f"{len(digests)} artifact(s), {total:,} B of {', '.join(names)} verified"
    if fails:
        return Check("store", FAIL, "; ".join(fails + warns))
    if warns:
        return Check("store", WARN, f"{detail}; " + "; ".join(warns))
    return Check("store", OK, detail)


def installed_at() -> float:
    """The earliest time the clock can read now: this installation's files' mtime, never
    before :data:`hybridml.edge.timebase.PLAUSIBLE_FROM` (this code did not exist yet)."""
    import hybridml

    try:
        return max(PLAUSIBLE_FROM, Path(hybridml.__file__).stat().st_mtime)
    except (OSError, TypeError):
        return PLAUSIBLE_FROM


def check_clock(now: float, floor: float, cloud_dates: Sequence[tuple[str, float]],
                clouds_given: bool) -> Check:
    """The wall clock against ``floor`` and each cloud's ``Date`` (url, POSIX seconds)."""
    if now < floor:
        return Check("clock", FAIL, f"the wall clock reads {utc_iso(now)}, before this "
                     f"installation ({utc_iso(floor)}): no real-time clock and no NTP yet? "
                     "Signed manifests' validity is judged by it; set the time (timedatectl)")
    off = [(url, now - date) for url, date in cloud_dates if abs(now - date) > CLOCK_SKEW_S]
    if off:
        return Check("clock", WARN, "; ".join(
            f"{abs(d):,.0f} s {'ahead of' if d > 0 else 'behind'} the clock of {url}"
            for url, d in off) + f" (more than {CLOCK_SKEW_S:g} s; check NTP)")
    worst = max((abs(now - date) for _, date in cloud_dates), default=0.0)
    against = (f"{worst:.0f} s from the cloud's Date (bound {CLOCK_SKEW_S:g} s)"
               if cloud_dates else "not compared with a cloud ("
               + ("none reachable" if clouds_given else "no --cloud") + ")")
    return Check("clock", OK, f"{utc_iso(now)}, after the install date {utc_iso(floor)[:10]}; "
                 f"{against}")


# ---------------------------------------------------------------------------- the cloud
@dataclass(frozen=True)
class Options:
    """What ``doctor`` looks at."""

    store: Path
    name: str | None = None
    clouds: tuple[str, ...] = ()
    token_file: str | None = None
    ca_bundle: str | None = None
    allow_http: bool = False


def check_cloud(opts: Options) -> tuple[list[Check], list[tuple[str, float]]]:
    """The ``cloud`` line of each URL and the ``token`` line; the clouds' ``Date`` s."""
    if not opts.clouds:
        return ([Check("cloud", SKIP, "no --cloud given ($HYBRIDML_CLOUD unset)"),
                 Check("token", SKIP, "no --cloud to check it against")], [])
    token, source = None, "$HYBRIDML_TOKEN"
    token_error = None
    try:
        if opts.token_file:
            token, source = read_token_file(opts.token_file), f"--token-file {opts.token_file}"
    except ConfigError as exc:
        token_error = exc.message
    checks: list[Check] = []
    dates: list[tuple[str, float]] = []
    up: CloudClient | None = None
    for url in opts.clouds:
        try:
            client = CloudClient(url, token=token, ca_bundle=opts.ca_bundle,
                                 allow_http=opts.allow_http)
            t0 = time.perf_counter()
            status, headers, _ = client.probe("/healthz")
        except HybridMLError as exc:
            checks.append(Check("cloud", FAIL, f"{url}: {exc.message}"))
            continue
        ms = (time.perf_counter() - t0) * 1000
        checks.append(Check("cloud", OK, f"{url} answered /healthz (HTTP {status}, "
                            f"{ms:.0f} ms)"))
        date = parsedate_tz(headers.get("Date", ""))
        if date is not None:
            dates.append((url, float(calendar.timegm(date[:9]) - (date[9] or 0))))
        if up is None:
            up = client
        else:
            client.close()
    checks.append(_check_token(up, token_error, source, opts.name, token is not None or
                               bool(os.environ.get("HYBRIDML_TOKEN"))))
    if up is not None:
        up.close()
    return checks, dates


def _check_token(client: CloudClient | None, error: str | None, source: str,
                 name: str | None, have: bool) -> Check:
    if error is not None:
        return Check("token", FAIL, error)
    if client is None:
        return Check("token", SKIP, "no cloud answered to check it against")
    where = client.base_url
    try:
        _, _, body = client.probe("/v1/models")
    except AuthError as exc:  # ForbiddenError too
        if not have:
            return Check("token", FAIL, f"no token set and {where} requires one: set "
                         "$HYBRIDML_TOKEN or pass --token-file FILE")
        return Check("token", FAIL, f"token rejected by {where} ({exc.message}); token from "
                     f"{source}")
    except HybridMLError as exc:
        return Check("token", WARN, f"could not check it: {exc.message}")
    detail = (f"accepted by {where} (from {source})" if have else
              f"no token set; {where} takes requests without one")
    if name is not None:
        try:
            listed = {m.get("name") for m in json.loads(body).get("models", [])}
        except (ValueError, AttributeError):
            listed = {name}
        if name not in listed:
            return Check("token", WARN, f"{detail}, but the cloud lists no model {name!r}")
    return Check("token", OK, detail)


def run(opts: Options, *, now: float | None = None) -> list[Check]:
    """Every check, in the order of the module docstring."""
    store = LocalStore(opts.store)
    cloud, dates = check_cloud(opts)
    clock = check_clock(time.time() if now is None else now, installed_at(), dates,
                        bool(opts.clouds))
    return [check_python(), check_wheels(), check_cpu(), check_disk(store.root),
            check_memory(needs=_needs(store, opts.name)), check_store(store, opts.name),
            clock, *cloud]


def _needs(store: LocalStore, name: str | None) -> list[tuple[str, float]]:
    """(``name vN``, MB) the active versions need, by :func:`budget.estimate`."""
    out = []
    for n in [name] if name else store.model_names():
        try:
            m = store.active(n)
        except HybridMLError:  # the store check reports it
            continue
        if m is not None:
            out.append((f"{n} v{m.version}", budget.estimate(m).needed_mb))
    return out


# ------------------------------------------------------------------------------------ CLI
def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``doctor`` to ``hybridml-edge``."""
    p = sub.add_parser("doctor", help="check this device: versions, CPU, disk, memory, store, "
                       "clock, cloud and token")
    p.add_argument("--store", default=os.environ.get("HYBRIDML_STORE", "~/.hybridml"),
                   help="local store directory (default: $HYBRIDML_STORE or ~/.hybridml)")
    p.add_argument("--name", default=None, help="one model (default: every model in store)")
    p.add_argument("--cloud", action="append", default=None, metavar="URL",
                   help="cloud URL to check (repeat, or URL1,URL2; default $HYBRIDML_CLOUD)")
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the device token (chmod 600); default: $HYBRIDML_TOKEN")
    p.add_argument("--ca-bundle", default=None, metavar="PEM",
                   help="check the cloud's TLS certificate against these CAs only")
    p.add_argument("--allow-http", action="store_true",
                   help="allow plain http:// to a cloud off this machine")
    p.add_argument("--json", action="store_true", help="the checks as JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="log INFO messages")
    p.set_defaults(func=cmd_doctor)


def cmd_doctor(args: argparse.Namespace) -> int:
    """``doctor``: print the checks; 1 when any failed."""
    given = args.cloud or ([os.environ["HYBRIDML_CLOUD"]] if os.environ.get("HYBRIDML_CLOUD")
                           else [])
    clouds = tuple(u.strip().rstrip("/") for item in given for u in item.split(",")
                   if u.strip())
    opts = Options(Path(args.store).expanduser(), args.name, clouds, args.token_file,
                   args.ca_bundle, args.allow_http)
    checks = run(opts)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        doc: dict[str, Any] = {"ok": not failed, "checks": [c.to_json() for c in checks]}
        print(json.dumps(doc))
    else:
        print("\n".join(c.line() for c in checks))
    return 1 if failed else 0


__all__ = ["Check", "Options", "add_command", "check_clock", "check_cloud", "check_cpu",
           "check_disk", "check_memory", "check_python", "check_store", "check_wheels", "run"]
