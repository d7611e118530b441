"""Lazy re-exports for a package's ``__init__``: names load with their module on first use.

``import hybridml.cloud`` must stay cheap and must not load scikit-learn or onnxruntime: the
CLI imports the package for every command, and gunicorn's master imports it before it forks
workers (a forked child of a process that loaded onnxruntime hangs at exit). So the package's
``__init__`` declares where each public name lives and calls :func:`export_lazily`::

    export_lazily(__name__, {"registry": ("Registry",), "train": ("TrainResult", "train")})

``from hybridml.cloud import train`` then imports ``hybridml.cloud.train`` and returns its
function. A function named like its module is kept as the package attribute even after the
module is imported elsewhere (Python would otherwise rebind ``hybridml.cloud.train`` to the
module); reach such a module with :func:`importlib.import_module`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class _LazyPackage(types.ModuleType):
    """A package module whose public names are loaded from their submodules on first use."""

    _homes: ClassVar[dict[str, str]] = {}

    def __getattr__(self, name: str) -> Any:
        home = self._homes.get(name)
        if home is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{home}"), name)
        types.ModuleType.__setattr__(self, name, value)  # later lookups are plain attributes
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if (name in self._homes and isinstance(value, types.ModuleType)
                and value.__name__ == f"{self.__name__}.{name}"):
            return  # the import system binding submodule ``name`` over the name it exports
        types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._homes))


def export_lazily(package: str, homes: Mapping[str, Sequence[str]]) -> None:
    """Make ``package`` load each name of ``homes`` (submodule -> names) on first use."""
    module = sys.modules[package]
    by_name = {name: home for home, names in homes.items() for name in names}
    module.__class__ = type(_LazyPackage.__name__, (_LazyPackage,), {"_homes": by_name})
    for name, home in by_name.items():
        # A submodule imported before this call already holds its name: give it back.
        if isinstance(module.__dict__.get(name), types.ModuleType) and home == name:
            del module.__dict__[name]


__all__ = ["export_lazily"]
