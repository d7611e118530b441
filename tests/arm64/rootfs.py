"""An emulated Raspberry Pi: a Debian arm64 root and PyPI's aarch64 wheels, run by qemu-user.

Nothing here needs a chroot, binfmt or root, except installing qemu-user-static itself
(``make test-arm64`` does that with apt-get when it is missing):

* the root is Debian bookworm's arm64 ``python3.11`` and ``libstdc++6`` with their
  dependencies, fetched by ``apt-get download`` through a private apt state (the host's
  sources, ``APT::Architectures=arm64``; the host's dpkg configuration is not touched) and
  unpacked with ``dpkg -x``;
* one site directory per version set holds the edge's dependencies as aarch64 wheels, put
  there by the host's pip (``pip install --target --platform manylinux_*_aarch64
  --only-binary=:all:``), so nothing is ever built under emulation;
* one thin root per CPU model links to the shared root and adds what qemu-user 7.2 gets
  wrong: it shows programs the host's x86 ``/proc/cpuinfo``, which onnxruntime ≥ 1.28 fails
  to parse at import. ``qemu-aarch64-static -L ROOT`` looks under ROOT first, so a Pi-like
  ``proc/cpuinfo`` and ``sys/devices/system/cpu/{possible,present}`` there fix it.

Everything is cached under ``$HYBRIDML_ARM64_CACHE`` (default ``~/.cache/hybridml/arm64``);
the project's own wheel is rebuilt for every run. ``python -m tests.arm64.rootfs`` builds the
cache ahead of a test run and prints what it holds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tests.arm64.rootfs")

ROOT_PACKAGES = ("python3.11", "libstdc++6")
PY = "3.11"
PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_27_aarch64",
             "manylinux_2_28_aarch64", "manylinux_2_31_aarch64", "manylinux_2_34_aarch64",
             "manylinux_2_35_aarch64", "manylinux_2_36_aarch64")  # bookworm's glibc is 2.36
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Cpu:
    """A Raspberry Pi's CPU: qemu's model name and the cpuinfo a real board shows."""

    name: str  # QEMU_CPU
    board: str
    part: str  # the MIDR part number
    features: str  # /proc/cpuinfo "Features", as the board's kernel prints them
    cores: int = 4

    def cpuinfo(self) -> str:
        """A ``/proc/cpuinfo`` as the board's arm64 kernel writes it."""
        one = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {f}\nCPU implementer\t: 0x41\n"
               "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: {p}\nCPU revision\t: 3\n\n")
        cores = "".join(one.format(i=i, f=self.features, p=self.part) for i in range(self.cores))
        return cores + f"Model\t\t: {self.board}\n"


CPUS = {
    "cortex-a72": Cpu("cortex-a72", "Raspberry Pi 4 Model B Rev 1.4", "0xd08",
                      "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": Cpu("cortex-a76", "Raspberry Pi 5 Model B Rev 1.0", "0xd0b",
                      "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                      "asimdrdm lrcpc dcpop asimddp"),
}


@dataclass(frozen=True)
class VersionSet:
    """The edge's dependencies at one point of the supported ranges: ``pins`` maps a
    distribution to a version; the others are the newest the range allows."""

    name: str
    pins: tuple[tuple[str, str], ...] = ()

    def requirements(self) -> list[str]:
        """pip requirements: the pinned versions, the rest as the project declares them."""
        pinned = dict(self.pins)
        return [f"{d}=={pinned[d]}" if d in pinned else d for d in EDGE_DISTRIBUTIONS]


#: The edge's dependencies (pyproject.toml's ``dependencies``).
EDGE_DISTRIBUTIONS = ("numpy", "onnxruntime", "requests", "cryptography")


def cache_dir() -> Path:
    """Where roots and site directories are kept between runs."""
    default = Path.home() / ".cache" / "hybridml" / "arm64"
    return Path(os.environ.get("HYBRIDML_ARM64_CACHE", default))


def qemu() -> str:
    """The qemu-user binary; a clear error when it is missing."""
    found = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if found is None:
        raise RuntimeError("qemu-aarch64-static is not installed: `apt-get install "
                           "qemu-user-static` (make test-arm64 does it when run as root)")
    return found


def _run(cmd: list[str], **kw: object) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def debian_root(cache: Path, arch: str = "arm64") -> Path:
    """The root of Debian's ``arch`` (built once): python3.11 and libstdc++6 with their
    dependencies. ``armhf`` is a 32-bit Raspberry Pi OS's userland."""
    root = cache / ("debian-root" if arch == "arm64" else f"debian-root-{arch}")
    if (root / "usr/bin/python3.11").exists():
        return root
    apt = cache / ("apt" if arch == "arm64" else f"apt-{arch}")
    for d in ("state/lists/partial", "cache/archives/partial", "debs"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    opts = [f"-oDir::State={apt / 'state'}", f"-oDir::State::status={apt / 'status'}",
            f"-oDir::Cache={apt / 'cache'}", f"-oAPT::Architecture={arch}",
            f"-oAPT::Architectures::={arch}", "-oDebug::NoLocking=1"]
    _run(["apt-get", *opts, "-qq", "update"])
    deps = subprocess.run(["apt-cache", *opts, "depends", "--recurse", "--no-recommends",
                           "--no-suggests", "--no-conflicts", "--no-breaks", "--no-replaces",
                           "--no-enhances", *ROOT_PACKAGES], check=True, capture_output=True,
                          text=True).stdout.splitlines()
    packages = sorted({d for d in deps if d and not d.startswith((" ", "<"))})
    _run(["apt-get", *opts, "-qq", "download", *packages], cwd=apt / "debs",
         stderr=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="root-", dir=cache))
    for deb in sorted((apt / "debs").glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tmp)])
    tmp.rename(root)
    return root


def cpu_root(cache: Path, cpu: Cpu) -> Path:
    """A thin root for ``cpu``: links to the Debian root plus the board's cpuinfo."""
    base = debian_root(cache)
    root = cache / f"root-{cpu.name}"
    root.mkdir(exist_ok=True)
    for entry in base.iterdir():
        link = root / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text(cpu.cpuinfo())
    cpus = root / "sys/devices/system/cpu"
    cpus.mkdir(parents=True, exist_ok=True)
    for f in ("possible", "present", "online"):
        (cpus / f).write_text(f"0-{cpu.cores - 1}\n")
    return root


def site(cache: Path, versions: VersionSet) -> Path:
    """The site directory of ``versions`` (aarch64 wheels, installed once per set of
    requirements; an unpinned "newest" is what pip picked when the cache was made)."""
    key = hashlib.sha256(" ".join(versions.requirements()).encode()).hexdigest()[:10]
    target = cache / f"site-{versions.name}-{key}"
    if (target / ".complete").exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    platforms = [f"--platform={p}" for p in PLATFORMS]
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--target", str(target), "--only-binary=:all:", f"--python-version={PY}",
          "--implementation=cp", *platforms, *versions.requirements()])
    (target / ".complete").write_text(json.dumps(installed(target)))
    return target


def installed(target: Path) -> dict[str, str]:
    """The distributions in a site directory and their versions."""
    out = {}
    for info in target.glob("*.dist-info"):
        name, _, version = info.name[: -len(".dist-info")].partition("-")
        out[name.lower().replace("_", "-")] = version
    return dict(sorted(out.items()))


def project(cache: Path) -> Path:
    """This checkout's wheel, unpacked (rebuilt every run: the code under test)."""
    target = cache / "project"
    shutil.rmtree(target, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix="wheel-", dir=cache))
    # Built from a copy: setuptools' build/ directory in the checkout could hold stale files.
    src = work / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*-work"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
          "--no-deps", "-w", str(work), str(src)], stdout=subprocess.DEVNULL)
    (wheel,) = work.glob("hybridml-*.whl")
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--no-deps", "--target", str(target), str(wheel)])
    shutil.rmtree(work)
    return target


@dataclass(frozen=True)
class Device:
    """How to start a Python on an emulated board with a version set."""

    cpu: Cpu
    root: Path
    site: Path
    project: Path

    def command(self, *args: str) -> list[str]:
        """argv of ``python3.11 args...`` on the emulated board."""
        return [qemu(), "-L", str(self.root), str(self.root / "usr/bin/python3.11"), *args]

    def env(self) -> dict[str, str]:
        """The environment: the CPU model, the project before the wheels, nothing of the
        host's Python."""
        keep = {k: v for k, v in os.environ.items()
                if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_"))}
        return dict(keep, QEMU_CPU=self.cpu.name, PYTHONNOUSERSITE="1",
                    PYTHONPATH=f"{self.project}{os.pathsep}{self.site}",
                    PYTHONDONTWRITEBYTECODE="1")


def device(cpu: str, versions: VersionSet, built: Path | None = None) -> Device:
    """A ready device: root for ``cpu``, the wheels of ``versions``, the project (``built``:
    an already unpacked project to reuse)."""
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    return Device(CPUS[cpu], cpu_root(cache, CPUS[cpu]), site(cache, versions),
                  built or project(cache))


def main(argv: list[str] | None = None) -> int:
    """Build the cache for the given version sets and print what each one holds."""
    from tests.arm64.matrix import VERSION_SETS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--versions", nargs="*", default=list(VERSION_SETS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    qemu()
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    for cpu in CPUS.values():
        cpu_root(cache, cpu)
    for name in args.versions:
        got = installed(site(cache, VERSION_SETS[name]))
        log.info("%s: %s", name, ", ".join(f"{k} {v}" for k, v in got.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
