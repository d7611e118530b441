"""Settings from ``HYBRIDML_*`` environment variables: one loader, one way to spell a value.

Settings are small frozen dataclasses with defaults. :func:`load_env` maps each field to the
variable ``PREFIX + FIELD.upper()`` and parses it by the field's annotated type::

    @dataclass(frozen=True)
    class FallbackPolicy:
        timeout_ms: float = 250.0        # HYBRIDML_FALLBACK_TIMEOUT_MS=500
        on_unseen: bool = True           # HYBRIDML_FALLBACK_ON_UNSEEN=off

    policy = load_env(FallbackPolicy, prefix="HYBRIDML_FALLBACK_")

Spellings, for every variable:

* ``bool``: ``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off``
  (any case); anything else is an error, never a silent False;
* ``int`` and ``float``: Python's literals (``4096``, ``0.25``, ``1e3``);
* ``str``: the value as given;
* ``X | None``: as ``X``.

A variable that is unset or empty (or only blanks) keeps the field's default. A bad value is a
:class:`~hybridml.shared.errors.ConfigError` that names the variable, the value and the
accepted spellings. The class's own checks (``__post_init__``) then run as usual.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from .errors import ConfigError

PREFIX = "HYBRIDML_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")

T = TypeVar("T")


def parse_bool(variable: str, raw: str, field: str | None = None) -> bool:
    """``raw`` as a bool (:data:`TRUE` / :data:`FALSE`, any case); ConfigError otherwise."""
    word = raw.strip().lower()
    if word in TRUE:
        return True
    if word in FALSE:
        return False
    raise ConfigError(f"{variable}={raw!r} is not a yes/no value; use one of "
                      f"{'/'.join(TRUE)} or {'/'.join(FALSE)}", field=field or variable,
                      variable=variable)


def env_flag(variable: str, default: bool = False, env: Mapping[str, str] | None = None
             ) -> bool:
    """One boolean variable (unset or empty: ``default``), spelled as :func:`parse_bool` says."""
    raw = (os.environ if env is None else env).get(variable)
    if raw is None or not raw.strip():
        return default
    return parse_bool(variable, raw)


def load_env(cls: type[T], prefix: str = PREFIX, env: Mapping[str, str] | None = None,
             **overrides: Any) -> T:
    """Build the frozen dataclass ``cls`` from ``env`` (default ``os.environ``).

    Each field ``name`` reads ``{prefix}{NAME}``; unset or empty variables keep the default.
    ``overrides`` (e.g. command-line flags) win over the environment; an override of None
    means "not given" and is ignored. An unknown override name is a ConfigError.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_env needs a dataclass, got {cls!r}")
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no setting {', '.join(unknown)}; settings: "
                          f"{', '.join(sorted(names))}", field=unknown[0])
    kwargs: dict[str, Any] = {}
    for name in sorted(names):
        variable = prefix + name.upper()
        raw = env.get(variable)
        if raw is not None and raw.strip():
            kwargs[name] = _parse(variable, name, raw, hints[name])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**kwargs)


def _parse(variable: str, name: str, raw: str, kind: Any) -> Any:
    """``raw`` as the annotated type ``kind`` (``X | None`` parses as ``X``)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            kind = rest[0]
    if kind is bool:
        return parse_bool(variable, raw, name)
    if kind is str:
        return raw
    if kind in (int, float):
        try:
            return kind(raw.strip())
        except ValueError:
            what, example = ("an integer", "4096") if kind is int else ("a number", "0.25")
            raise ConfigError(f"{variable}={raw!r} is not {what}; use e.g. "
                              f"{variable}={example}", field=name, variable=variable) from None
    raise TypeError(f"setting {name!r} has type {kind!r}; load_env reads bool, int, float, "
                    "str and X | None")


__all__ = ["FALSE", "PREFIX", "TRUE", "env_flag", "load_env", "parse_bool"]
