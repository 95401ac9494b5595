"""``folder:PATH``: a user's own images as a domain (and what ``uda adapt-images`` writes).

Layout (classification, as torchvision's ``ImageFolder``): one sub-folder per class, its
images inside::

    PATH/<class name>/<anything>.png|.jpg|.jpeg|.bmp|.ppm|.pgm|.tif|.tiff|.webp
    PATH/manifest.json      optional; written by `uda adapt-images`

Classes are the sub-folder names in sorted order, unless ``manifest.json`` lists them (an
export keeps its source's class order, so labels mean the same thing as in the source
domain). Hidden files and folders (a leading ``.``: the temporary names of atomic writes
among them) are ignored, and so are files beside the class folders (``manifest.json``,
``preview.png``).

A folder domain has one split, ``all``, used for training and evaluation alike (a folder
holds one set of images; split it into two folders for a held-out set).

Writing ``folder:PATH:SPLIT`` is accepted so that names the trainer writes back
(``folder:/abs/path:all``) parse again; see :func:`split_folder_text` for the rule that
keeps paths with ``:`` in them working.

Image size and channels: from the manifest when there is one; else the first image (in
sorted order) decides: its size is the run size, and it is grey (1 channel) when its PIL
mode is ``L``/``1``/``I``/``I;16``/``F``, else colour (3). Images of another size are
resized (bilinear) and of another mode converted while reading, so a folder of mixed
images still reads as one array.

The spec is built from a cheap scan (the class folders and one image) and cached per
resolved path; the cache entry is rebuilt when the folder's or the manifest's mtime
changes. The reader lists the files again each time it runs, so images added after the
spec was built are read.

Segmentation folders (``images/`` + ``labels/``, what adapt-images will write for LSD-seg)
come with the segmentation issue; one whose manifest says so is refused here in one line.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from uda_cli.errors import ConfigError, DataError

PREFIX = "folder:"
SPLIT = "all"
MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_GREY_MODES = {"1", "L", "I", "I;16", "F", "LA"}
# PATH:SPLIT where SPLIT is a word, or part of one (all[:100], see registry.split_slice)
_TAIL_RE = re.compile(r"^(?P<head>.+):(?P<tail>[A-Za-z0-9_-]+(\[[^\[\]]*\])?)$")

_CACHE: dict[Path, tuple[tuple[int, int], object]] = {}


def is_folder_name(name: str) -> bool:
    return name.startswith(PREFIX)


def split_folder_text(text: str) -> tuple[str, str | None]:
    """``folder:PATH[:SPLIT]`` -> ``("folder:PATH", SPLIT or None)``.

    The rule: when everything after ``folder:`` names an existing folder, all of it is the
    path (so a path may contain ``:``); otherwise a trailing ``:WORD`` (letters, digits,
    ``_``, ``-``), or part of one, ``:WORD[START:STOP]``, is the split. ``folder:/data/x:all``
    is the folder ``/data/x``, split ``all``, unless a folder named ``x:all`` exists there.
    """
    rest = text[len(PREFIX):]
    if rest and not Path(rest).expanduser().is_dir():
        m = _TAIL_RE.match(rest)  # the last ``:`` outside a [START:STOP] part
        if m:
            return PREFIX + m["head"], m["tail"]
    return PREFIX + rest, None


def natural_key(name: str) -> tuple:
    """``"2.png"`` before ``"10.png"``: digits compare as numbers."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)


def _visible_dirs(root: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    names = [e.name for e in os.scandir(folder)
             if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file()]
    return sorted(names, key=natural_key)


def read_manifest(root: Path) -> dict | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a uda manifest (not a JSON object); fix or delete it")
    return data


def _signature(root: Path) -> tuple[int, int]:
    m = root / MANIFEST
    return root.stat().st_mtime_ns, (m.stat().st_mtime_ns if m.is_file() else 0)


def folder_domain(name: str):
    """The :class:`DomainSpec` of ``folder:PATH`` (``name`` without a split), cached per path."""
    from uda_cli.data.registry import DomainSpec

    raw = name[len(PREFIX):]
    if not raw:
        raise ConfigError("folder: needs a path: folder:PATH (one sub-folder per class)")
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        hint = " (folder:PATH has one split, 'all': write folder:PATH or folder:PATH:all)" if ":" in raw else ""
        raise ConfigError(f"no folder at {raw}{hint}; folder:PATH takes a folder with one sub-folder per class")
    sig = _signature(root)
    hit = _CACHE.get(root)
    if hit is not None and hit[0] == sig:
        return hit[1]

    manifest = read_manifest(root)
    dirs = _visible_dirs(root)
    task = (manifest or {}).get("task", "classification")
    if task != "classification":
        raise ConfigError(f"{root} is a {task} folder; folder:PATH reads classification folders only so far")
    if manifest and manifest.get("classes"):
        classes = tuple(str(c) for c in manifest["classes"])
        stray = sorted(set(dirs) - set(classes))
        if stray:
            raise DataError(f"{root} has folders {stray} that its {MANIFEST} does not list as classes; move them out")
    else:
        classes = tuple(dirs)
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders; folder:PATH takes one sub-folder per class (PATH/<class>/<image>)")

    if manifest and manifest.get("image_size") and manifest.get("channels"):
        size = tuple(int(s) for s in manifest["image_size"])
        channels = int(manifest["channels"])
    else:
        size, channels = _peek(root, classes)
    spec = DomainSpec(
        name=f"{PREFIX}{root}", task="classification", classes=classes, channels=channels,
        image_size=size, splits=(SPLIT,), train_split=SPLIT, eval_split=SPLIT, dataset=None,
        reader=lambda _folder, split: read_folder(root, classes, size, channels, split),
        description=f"images in {root}, one sub-folder per class",
        notes={"root": str(root)},
    )
    _CACHE[root] = (sig, spec)
    return spec


def _peek(root: Path, classes: tuple[str, ...]) -> tuple[tuple[int, int], int]:
    from PIL import Image

    for c in classes:
        files = _image_files(root / c) if (root / c).is_dir() else []
        if files:
            path = root / c / files[0]
            try:
                with Image.open(path) as im:
                    return (im.height, im.width), (1 if im.mode in _GREY_MODES else 3)
            except OSError as e:
                raise DataError(f"{path} is not a readable image ({e}); remove it") from None
    raise ConfigError(f"{root} has class folders but no images ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)})")


def _decode(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            a = np.asarray(im, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path} is not a readable image ({e}); remove it or replace it") from None
    return a[:, :, None] if a.ndim == 2 else a


def read_folder(root: Path, classes: tuple[str, ...], size: tuple[int, int], channels: int, split: str):
    """Every image under ``root/<class>/`` -> ``(uint8 [N, H, W, C], int64 [N])``, classes in order."""
    if split != SPLIT:
        raise DataError(f"folder domains have one split, {SPLIT!r}, not {split!r}")
    present = set(_visible_dirs(root))
    listing = [(k, c, _image_files(root / c)) for k, c in enumerate(classes) if c in present]
    n = sum(len(files) for _, _, files in listing)
    if n == 0:
        raise DataError(f"{root} holds no images in its class folders; nothing to read")
    images = np.empty((n, size[0], size[1], channels), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    i = 0
    for k, c, files in listing:
        for f in files:
            images[i] = _decode(root / c / f, size, channels)
            labels[i] = k
            i += 1
    return images, labels
