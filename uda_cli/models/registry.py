"""Model registry: every network a user can name with ``--set model=NAME``.

Entries are builder functions decorated with ``@register_model(name, task=...)`` (timm's
``register_model``, with the task recorded beside the name). The registry fills by explicit
import: :func:`_ensure_builtin` imports the modules that define the built-in entries, so
asking for a model never depends on what happened to be imported before.

``build_model(name, **options)`` checks the options against the builder's signature, so an
option the network does not take is one line naming the ones it does.

Entries live beside their networks: the digit classifiers (``lenet``, ``svhn_dann``) in
``uda_cli.models.classifiers``, the segmentation networks in ``uda_cli.models.segmentation``.
Generators and discriminators (``generators.py``, ``discriminators.py``) are plain classes
that their methods build: no method lets a user swap them by name.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass
from typing import Callable

from torch import nn

from uda_cli.errors import ConfigError

TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class ModelEntry:
    """One registered network: its name, task and builder."""

    name: str
    task: str
    builder: Callable[..., nn.Module]

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options ``build_model`` accepts for this network."""
        return tuple(inspect.signature(self.builder).parameters)

    @property
    def summary(self) -> str:
        """The first line of the builder's docstring."""
        return (inspect.getdoc(self.builder) or "").split("\n", 1)[0]


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, task: str):
    """Decorator: register a builder ``fn(**options) -> nn.Module`` under ``name`` for ``task``."""
    if task not in TASKS:
        raise ValueError(f"model {name!r}: task must be one of {TASKS}, not {task!r}")

    def deco(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name=name, task=task, builder=fn)
        return fn

    return deco


def _ensure_builtin() -> None:
    # Importing a module runs its @register_model decorators; add a line per new module.
    import uda_cli.models.classifiers  # noqa: F401
    import uda_cli.models.segmentation  # noqa: F401


def list_models(task: str | None = None) -> list[str]:
    """Registered model names, sorted; only those for ``task`` when given."""
    _ensure_builtin()
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    return sorted(n for n, e in _MODELS.items() if task is None or e.task == task)


def model_entry(name: str) -> ModelEntry:
    """The entry of ``name``; an unknown name is a ConfigError with a did-you-mean."""
    _ensure_builtin()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown model {name!r}{hint}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def build_model(name: str, **options) -> nn.Module:
    """Build network ``name`` with ``options`` (each a keyword of its builder)."""
    entry = model_entry(name)
    params = inspect.signature(entry.builder).parameters
    unknown = [k for k in options if k not in params]
    if unknown:
        close = difflib.get_close_matches(unknown[0], params, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model {name!r} has no option {unknown[0]!r}{hint}; its options: {', '.join(params)}")
    return entry.builder(**options)

