"""Refuse a model this device's onnxruntime cannot run, before anything is fetched.

The cloud's compression guard (docs/device.md §4) records the lowest onnxruntime the shipped
model needs in ``manifest["compression"]["requires_onnxruntime"]`` (``null``: every version
the edge supports). The guard only ships such a model when the package's own floor allows it,
but a device can still hold an older onnxruntime (installed outside pip's resolver, or a
package built before the floor was raised). :func:`check` turns what would be a cryptic
"Could not find an implementation for TreeEnsemble(5)" at load into a typed refusal naming
both versions and the fix; ``sync`` calls it before downloading, so the active version keeps
serving. Manifests without a compression block (older cloud) need nothing.
"""

from __future__ import annotations

import re
from importlib import metadata
from typing import Any

from hybridml.shared.errors import ModelLoadError
from hybridml.shared.manifest import Manifest


def version_tuple(text: str) -> tuple[int, ...]:
    """``"1.21.0"`` -> ``(1, 21, 0)``; local and pre-release tails are ignored."""
    return tuple(int(p) for p in re.findall(r"\d+", str(text).split("+")[0])[:3])


def required_onnxruntime(manifest: Manifest) -> str | None:
    """The lowest onnxruntime the manifest's model needs, or ``None`` when any supported one."""
    block: Any = manifest.raw.get("compression")
    need = block.get("requires_onnxruntime") if isinstance(block, dict) else None
    return str(need) if need else None


def installed_onnxruntime() -> str:
    """The installed onnxruntime's version, read without importing it."""
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return "0"


def check(manifest: Manifest, installed: str | None = None) -> None:
    """Raise :class:`ModelLoadError` when ``installed`` (default: this device's onnxruntime)
    is older than what the manifest's model needs."""
    need = required_onnxruntime(manifest)
    if need is None:
        return
    have = installed or installed_onnxruntime()
    if version_tuple(have) < version_tuple(need):
        raise ModelLoadError(
            f"model v{manifest.version} needs onnxruntime >= {need}; this device has {have}. "
            f"Upgrade it (pip install 'onnxruntime>={need}') or have the cloud retrain with "
            "the device's version as its floor", field="onnxruntime", required=need,
            installed=have)
