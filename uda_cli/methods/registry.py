"""Method registry, filled by explicit import in ``uda_cli/methods/__init__.py``."""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from uda_cli.errors import ConfigError

if TYPE_CHECKING:
    from uda_cli.methods.base import Method

_METHODS: dict[str, type["Method"]] = {}


def register_method(name: str):
    def deco(cls):
        if name in _METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return deco


def _ensure_builtin() -> None:
    import uda_cli.methods  # noqa: F401  (its imports register the built-in methods)


def list_methods() -> list[str]:
    _ensure_builtin()
    return sorted(_METHODS)


def get_method(name: str) -> type["Method"]:
    _ensure_builtin()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, _METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
