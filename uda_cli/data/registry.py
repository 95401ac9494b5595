"""The domain registry: every name a user can pass to ``--src``, ``--tgt`` or ``--domain``.

A domain is a task, its classes, the image size a run uses by default, its splits, and a
reader for the original files.

- classification: a reader returns the split at its native size as ``uint8`` numpy arrays
  ``images [N, H, W, C]`` (C is 1 or 3) and ``labels [N]`` (int64); :func:`load_domain` turns
  that into one uint8 tensor at the run's size and channel count, the only copy a run keeps.
- segmentation: a reader returns a :class:`~uda_cli.data.dense.DenseSource`, read one sample
  at a time (dense data does not fit in memory); :func:`load_dense` gives it, with a
  ``[START:STOP]`` part applied.

Files live under ``<data root>/<dataset>/`` where the data root comes from ``--data-root``,
``UDA_DATA_ROOT``, or ``$XDG_CACHE_HOME/uda/data`` (``~/.cache/uda/data``).

This module imports no torch at import time (``uda --help`` stays instant).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from uda_cli.errors import ConfigError, did_you_mean

Task = Literal["classification", "segmentation"]
DIGIT_CLASSES = tuple(str(i) for i in range(10))


@dataclass(frozen=True)
class DomainSpec:
    name: str
    task: Task
    classes: tuple[str, ...]
    channels: int  # native channel count (1 grey, 3 colour)
    image_size: tuple[int, int]  # (H, W) every image is resized to
    splits: tuple[str, ...]
    train_split: str  # what a run trains on
    eval_split: str  # what a run evaluates on by default
    dataset: str | None  # the `uda download` name holding its files; None: ships in the package
    # (dataset folder, split) -> (images, labels) for classification, a DenseSource for segmentation
    reader: Callable[[Path, str], Any]
    description: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    # Segmentation: named subsets of the classes (train ids) that evaluation also averages
    # over, e.g. SYNTHIA's ("16", ...) and ("13", ...) of the Cityscapes 19.
    class_subsets: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Segmentation: one (r, g, b) per class, for colouring predictions; () when none is given.
    palette: tuple[tuple[int, int, int], ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_DOMAINS: dict[str, DomainSpec] = {}
_BUILTIN_LOADED = False


def register_domain(spec: DomainSpec) -> DomainSpec:
    _ensure_builtin()
    if spec.name in _DOMAINS:
        raise ValueError(f"domain {spec.name!r} registered twice")
    _DOMAINS[spec.name] = spec
    return spec


def list_domains() -> list[str]:
    _ensure_builtin()
    return sorted(_DOMAINS)


def parse_domain(text: str) -> tuple[str, str | None]:
    """``"usps:test"`` -> ``("usps", "test")``; ``"usps"`` -> ``("usps", None)``.

    ``folder:PATH[:SPLIT]`` keeps ``:`` inside PATH: see :func:`uda_cli.data.folder.split_folder_text`.
    """
    text = text.strip()
    if text.startswith("folder:"):
        from uda_cli.data.folder import split_folder_text

        return split_folder_text(text)
    name, sep, split = text.partition(":")
    return name.strip(), (split.strip() if sep else None)


def get_domain(name: str) -> DomainSpec:
    if name.startswith("folder:"):
        # Built on demand from the folder's contents (cached per resolved path), never
        # registered: list_domains() names only the built-in domains.
        from uda_cli.data.folder import folder_domain

        return folder_domain(name)
    _ensure_builtin()
    if name not in _DOMAINS:
        known = ", ".join(sorted(_DOMAINS))
        raise ConfigError(f"unknown domain {name!r}{did_you_mean(name, _DOMAINS)}; known domains: {known}, "
                          "or folder:PATH for your own images")
    return _DOMAINS[name]


_SLICE_RE = re.compile(r"^(?P<base>[^\[\]]*?)\s*\[\s*(?P<start>[+-]?\d*)\s*:\s*(?P<stop>[+-]?\d*)\s*\]$")


def split_slice(split: str) -> tuple[str, slice | None]:
    """``"train[:-1000]"`` -> ``("train", slice(None, -1000))``; ``"train"`` -> ``("train", None)``.

    A split may end in ``[START:STOP]``, Python's slice of its images in file order (negative
    counts from the end, either side may be empty, no step). That carves a labelled hold-out
    from a target's train split for choosing settings: train on ``mnist:train[:-5000]``,
    evaluate on ``mnist:train[-5000:]``, report ``mnist:test``.
    """
    if "[" not in split and "]" not in split:
        return split, None
    m = _SLICE_RE.match(split)
    if not m:
        raise ConfigError(f"cannot read the split {split!r}; a part of a split is written SPLIT[START:STOP], "
                          "e.g. train[:-1000] or train[50000:]")
    if m["start"] in ("+", "-") or m["stop"] in ("+", "-"):
        raise ConfigError(f"cannot read the split {split!r}; START and STOP are whole numbers, e.g. train[:-1000]")
    return m["base"], slice(int(m["start"]) if m["start"] else None, int(m["stop"]) if m["stop"] else None)


def _slice_text(base: str, sl: slice | None) -> str:
    if sl is None:
        return base
    return f"{base}[{'' if sl.start is None else sl.start}:{'' if sl.stop is None else sl.stop}]"


def flat_name(text: str) -> str:
    """A domain text as a flat, shell-safe part of a file name: one ``_`` per character other
    than letters, digits, ``.`` and ``-``, so that parts of a split stay apart. ``mnist:test`` ->
    ``mnist_test``, ``mnist:train[:-1000]`` -> ``mnist_train__-1000_``, ``mnist:train[-1000:]`` ->
    ``mnist_train_-1000__``, ``folder:/data/x:all`` -> ``folder__data_x_all``."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", text)


def resolve_split(spec: DomainSpec, split: str | None, default: str) -> str:
    """The split to read, checked against the domain's; a ``[START:STOP]`` part is kept (normalised)."""
    base, sl = split_slice(split or default)
    if base not in spec.splits:
        raise ConfigError(
            f"domain {spec.name!r} has no split {base!r}; its splits are: {', '.join(spec.splits)}"
        )
    return _slice_text(base, sl)


def default_data_root() -> Path:
    env = os.environ.get("UDA_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "uda" / "data"


def resolve_data_root(data_root: Path | str | None) -> Path:
    return Path(data_root).expanduser() if data_root else default_data_root()


def load_domain(
    name: str,
    split: str,
    data_root: Path | str | None = None,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
):
    """Read ``name:split`` and return ``(images uint8 [N, C, H, W], labels int64 [N])`` tensors.

    Grey images are repeated to 3 channels when ``channels == 3``; colour images are turned
    grey (ITU-R 601 luma) when ``channels == 1``. ``split`` may select part of a split,
    ``train[:-1000]`` (:func:`split_slice`); only that part is kept.
    """
    import numpy as np
    import torch

    from uda_cli.data.transforms import to_channels, resize_uint8

    spec = get_domain(name)
    split = resolve_split(spec, split, spec.train_split)
    root = resolve_data_root(data_root)
    folder = root / spec.dataset if spec.dataset else Path()
    base, sl = split_slice(split)
    images, labels = spec.reader(folder, base)
    if sl is not None:
        n = len(labels)
        # Python would clip a bound past the end: train[-70000:] of 60,000 images would quietly
        # read 60,000, not the 70,000 asked for. Refuse it instead.
        if any(b is not None and not -n <= b <= n for b in (sl.start, sl.stop)):
            raise ConfigError(f"{name}:{split} reaches past the {n:,} images of {name}:{base}; "
                              f"pick START and STOP within -{n:,}..{n:,}")
        # Copy the part: a view would keep the whole split alive behind the run's tensor.
        images, labels = np.array(images[sl]), np.array(labels[sl])
        if len(labels) == 0:
            raise ConfigError(f"{name}:{split} selects no images ({name}:{base} has {n:,}); "
                              f"pick START below STOP, e.g. {name}:{base}[:-{max(n // 10, 1)}]")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW view
    del images
    x = to_channels(x, channels or spec.channels)
    x = resize_uint8(x, size or spec.image_size)
    y = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return x.contiguous(), y


def load_dense(name: str, split: str, data_root: Path | str | None = None):
    """``name:split`` of a segmentation domain as a :class:`~uda_cli.data.dense.DenseSource`."""
    from uda_cli.data.dense import SubsetSource

    spec = get_domain(name)
    if spec.task != "segmentation":
        raise ConfigError(f"{name} is a {spec.task} domain, not a segmentation one")
    split = resolve_split(spec, split, spec.train_split)
    root = resolve_data_root(data_root)
    folder = root / spec.dataset if spec.dataset else Path()
    base, sl = split_slice(split)
    source = spec.reader(folder, base)
    if sl is None:
        return source
    n = len(source)
    if any(b is not None and not -n <= b <= n for b in (sl.start, sl.stop)):
        raise ConfigError(f"{name}:{split} reaches past the {n:,} images of {name}:{base}; "
                          f"pick START and STOP within -{n:,}..{n:,}")
    indices = range(n)[sl]
    if len(indices) == 0:
        raise ConfigError(f"{name}:{split} selects no images ({name}:{base} has {n:,}); "
                          f"pick START below STOP, e.g. {name}:{base}[:-{max(n // 10, 1)}]")
    return SubsetSource(source, indices, f"{name}:{split}")


def _ensure_builtin() -> None:
    global _BUILTIN_LOADED
    if not _BUILTIN_LOADED:
        _BUILTIN_LOADED = True
        from uda_cli.data import domains  # noqa: F401  (fills the registry)
