"""Method registry, filled by explicit import in ``uda_cli/methods/__init__.py``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from uda_cli.errors import ConfigError, did_you_mean

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
        raise ConfigError(f"unknown method {name!r}{did_you_mean(name, _METHODS)}; "
                          f"known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]
