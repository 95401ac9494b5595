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

Segmentation folders (task "segmentation"): the user's own image/label pairs, as GTA5 and
SYNTHIA ship theirs, plus a table of classes::

    PATH/images/<stem>.png|.jpg|.jpeg|.webp   RGB (grey is repeated)
    PATH/labels/<stem>.png                    one channel (grey or palette indices), 8 or 16 bits
    PATH/classes.json                         {"names": [...], "ids": [...], "colors": [[r, g, b], ...],
                                               "ignore": [...]}

``names`` are the classes, in train-id order. ``ids`` (default ``0..K-1``) are the values
the label PNGs store for each class; a palette PNG's values are its indices, never its
colours. ``ignore`` lists values that mark unlabelled pixels (read as 255, ignored); any
other value is a one-line error naming the file and the value. ``colors`` (optional) is the
palette predictions are drawn in. A folder is read as segmentation when it has
``classes.json`` (or its manifest says ``"task": "segmentation"``, which then needs one).
Every image needs its label and every label its image (same stem), at the same size: each
is checked from the file headers when the split is read, and a mismatch is a one-line error
naming the file (unlike GTA5's reader, which resizes: a user's own labels of another size
are more likely a mistake than a rendering quirk). One split, ``all``; the run size is the
first image's (in natural order of stems).
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
CLASSES = "classes.json"  # a segmentation folder's classes
SEG_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")  # what torchvision.io decodes
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


def _signature(root: Path) -> tuple[int, ...]:
    return (root.stat().st_mtime_ns,
            *((f.stat().st_mtime_ns if f.is_file() else 0) for f in (root / MANIFEST, root / CLASSES)))


def folder_domain(name: str):
    """The :class:`DomainSpec` of ``folder:PATH`` (``name`` without a split), cached per path."""
    from uda_cli.data.registry import DomainSpec

    raw = name[len(PREFIX):]
    if not raw:
        raise ConfigError("folder: needs a path: folder:PATH (one sub-folder per class, or images/, labels/ "
                          "and classes.json for segmentation)")
    root = Path(raw).expanduser().resolve()
    if not root.is_dir():
        hint = " (folder:PATH has one split, 'all': write folder:PATH or folder:PATH:all)" if ":" in raw else ""
        raise ConfigError(f"no folder at {raw}{hint}; folder:PATH takes a folder with one sub-folder per class, "
                          f"or images/, labels/ and {CLASSES} for segmentation")
    sig = _signature(root)
    hit = _CACHE.get(root)
    if hit is not None and hit[0] == sig:
        return hit[1]

    manifest = read_manifest(root)
    dirs = _visible_dirs(root)
    task = (manifest or {}).get("task", "classification")
    if task == "segmentation" or (root / CLASSES).is_file():
        spec = segmentation_domain(root)
        _CACHE[root] = (sig, spec)
        return spec
    if task != "classification":
        raise ConfigError(f"{root} is a {task} folder ({MANIFEST} says so); folder:PATH reads classification "
                          "and segmentation folders")
    if set(dirs) == {"images", "labels"} and not (manifest and manifest.get("classes")):
        raise ConfigError(f"{root} has images/ and labels/ but no {CLASSES}: a segmentation folder needs one, e.g. "
                          '{"names": ["road", "car"]}; (a classification folder whose classes are named images and '
                          f"labels: list them in {MANIFEST} as {{\"classes\": [\"images\", \"labels\"]}})")
    if manifest and manifest.get("classes"):
        classes = tuple(str(c) for c in manifest["classes"])
        stray = sorted(set(dirs) - set(classes))
        if stray:
            raise DataError(f"{root} has folders {stray} that its {MANIFEST} does not list as classes; move them out")
    else:
        classes = tuple(dirs)
    if not classes:
        raise ConfigError(f"{root} has no class sub-folders; folder:PATH takes one sub-folder per class "
                          f"(PATH/<class>/<image>), or images/, labels/ and {CLASSES} for segmentation")

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


# ---- segmentation folders: images/ + labels/ + classes.json ------------------------------------

_CLASSES_KEYS = ("names", "ids", "colors", "ignore")
_UNKNOWN = 256  # a label value classes.json does not list (train ids are 0..254, 255 ignore)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_classes(root: Path) -> tuple[tuple[str, ...], tuple[int, ...], tuple[int, ...], tuple]:
    """``PATH/classes.json`` -> (names, ids, ignore, colors), checked; a problem is one line naming the file."""
    path = root / CLASSES
    if not path.is_file():
        raise ConfigError(f"{root} is a segmentation folder ({MANIFEST} says so) but has no {CLASSES}; add one, "
                          'e.g. {"names": ["road", "car"]} (label values 0, 1)')
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); fix it: {{\"names\": [...]}}") from None
    if not isinstance(data, dict):
        raise DataError(f'{path} is not a JSON object; write {{"names": [...], "ids": [...]}}')
    extra = sorted(set(data) - set(_CLASSES_KEYS))
    if extra:
        raise DataError(f"{path}: unknown key {extra[0]!r}; {CLASSES} takes {', '.join(_CLASSES_KEYS)}")
    names = data.get("names")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names)):
        raise DataError(f'{path}: "names" must be a non-empty list of class names, e.g. ["road", "car"]')
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise DataError(f'{path}: the class {dup!r} is named twice in "names"; give each class once')
    if len(names) > 255:
        raise DataError(f"{path}: {len(names)} classes; at most 255 (train ids 0..254, 255 marks ignored pixels)")
    k = len(names)
    ids = data.get("ids", list(range(k)))
    if not isinstance(ids, list) or len(ids) != k or not all(_whole(v) and 0 <= v <= 65535 for v in ids):
        raise DataError(f'{path}: "ids" must list {k} label values (whole numbers 0..65535), one per name')
    if len(set(ids)) != k:
        dup = next(v for v in ids if ids.count(v) > 1)
        raise DataError(f'{path}: the label value {dup} is given to two classes in "ids"; give each class its own')
    ignore = data.get("ignore", [])
    if not isinstance(ignore, list) or not all(_whole(v) and 0 <= v <= 65535 for v in ignore):
        raise DataError(f'{path}: "ignore" must list label values (whole numbers 0..65535) that mark unlabelled pixels')
    both = sorted(set(ignore) & set(ids))
    if both:
        raise DataError(f'{path}: the label value {both[0]} is both a class in "ids" and in "ignore"; keep it in one')
    colors = data.get("colors", [])
    if colors and (not isinstance(colors, list) or len(colors) != k or not all(
            isinstance(c, list) and len(c) == 3 and all(_whole(v) and 0 <= v <= 255 for v in c) for c in colors)):
        raise DataError(f'{path}: "colors" must list {k} [r, g, b] colours (0..255), one per name')
    return tuple(names), tuple(ids), tuple(ignore), tuple(tuple(c) for c in colors)


class FolderLabels:
    """A picklable label decoder for a segmentation folder: one-channel PNG values -> train ids
    through ``classes.json`` (ids -> 0..K-1, ignore -> 255); any other value is an error."""

    def __init__(self, ids: tuple[int, ...], ignore: tuple[int, ...], classes_file: Path):
        table = np.full(65536, _UNKNOWN, dtype=np.uint16)
        table[list(ids)] = np.arange(len(ids), dtype=np.uint16)
        table[list(ignore)] = 255
        self.table, self.classes_file = table, classes_file

    def __call__(self, path: Path) -> np.ndarray:
        from uda_cli.data.dense import read_png_unchanged

        a = read_png_unchanged(path)
        if a.ndim == 3:
            raise DataError(f"{path} has {a.shape[-1]} channels; a label is a one-channel PNG of class values "
                            "(grey or palette), as listed in " + str(self.classes_file))
        out = self.table[a]
        bad = out == _UNKNOWN
        if bad.any():
            v = int(a[bad][0])
            raise DataError(f'{path} holds the label value {v}, which {self.classes_file} lists neither in "ids" nor '
                            f'in "ignore"; add it to one of them (e.g. "ignore": [{v}])')
        return out.astype(np.uint8)


def _seg_listing(folder: Path, labels: bool = False) -> dict[str, str]:
    """``{stem: path}`` of the visible image files in ``folder`` (labels: PNGs); two files with
    one stem, or a label that is an image but no PNG, are an error."""
    extensions = (".png",) if labels else SEG_IMAGE_EXTENSIONS
    out: dict[str, str] = {}
    for e in os.scandir(folder):
        if e.name.startswith(".") or not e.is_file():
            continue
        stem, ext = os.path.splitext(e.name)
        if ext.lower() not in extensions:
            if labels and ext.lower() in IMAGE_EXTENSIONS:
                raise DataError(f"{e.path} is not a PNG; labels must be lossless PNGs of class values: convert it")
            continue
        if stem in out:
            raise DataError(f"{folder} holds two files with the stem {stem!r} ({Path(out[stem]).name}, {e.name}); "
                            "keep one")
        out[stem] = e.path
    return out


def _seg_dirs(root: Path) -> tuple[Path, Path]:
    images, labels = root / "images", root / "labels"
    for d in (images, labels):
        if not d.is_dir():
            raise ConfigError(f"{root} is a segmentation folder (it has {CLASSES}) but no {d.name}/ folder; "
                              "it needs images/<stem>.png and labels/<stem>.png")
    return images, labels


def segmentation_domain(root: Path):
    """The :class:`DomainSpec` of a segmentation folder: classes from ``classes.json``, the run
    size from the first image's header (natural order of stems)."""
    from uda_cli.data.pairs import image_size
    from uda_cli.data.registry import DomainSpec

    names, ids, ignore, colors = read_classes(root)
    images, _labels = _seg_dirs(root)
    files = _seg_listing(images)
    if not files:
        raise ConfigError(f"{images} holds no images ({', '.join(e.lstrip('.') for e in SEG_IMAGE_EXTENSIONS)})")
    first = files[min(files, key=natural_key)]
    size = image_size(Path(first))
    return DomainSpec(
        name=f"{PREFIX}{root}", task="segmentation", classes=names, channels=3, image_size=size,
        splits=(SPLIT,), train_split=SPLIT, eval_split=SPLIT, dataset=None,
        reader=lambda _folder, split: read_segmentation_folder(root, ids, ignore, split),
        description=f"image/label pairs in {root}, {len(names)} classes from its {CLASSES}",
        notes={"root": str(root)}, palette=colors,
    )


def read_segmentation_folder(root: Path, ids: tuple[int, ...], ignore: tuple[int, ...], split: str):
    """``PATH/images`` with ``PATH/labels`` -> a :class:`~uda_cli.data.dense.FilePairSource`, every
    pair checked: matched stems, same size (from the headers)."""
    from uda_cli.data.dense import FilePairSource
    from uda_cli.data.pairs import scan_pairs

    if split != SPLIT:
        raise DataError(f"folder domains have one split, {SPLIT!r}, not {split!r}")
    images, labels = _seg_dirs(root)
    scan = scan_pairs(_seg_listing(images), _seg_listing(labels, labels=True), root, None, key=natural_key)
    if scan.no_label:
        p = Path(scan.no_label[0])
        raise DataError(f"{p} has no label: expected {labels / (p.stem + '.png')} (every image needs one; "
                        f"{len(scan.no_label):,} images lack theirs)")
    if scan.no_image:
        p = Path(scan.no_image[0])
        raise DataError(f"{p} has no image: expected {images / p.stem}.png (or .jpg, .jpeg, .webp; "
                        f"{len(scan.no_image):,} labels lack theirs)")
    if not scan.stems:
        raise DataError(f"{root} holds no image/label pairs in images/ and labels/")
    if scan.resized:
        label, lsize, image, isize = scan.resized[0]
        raise DataError(f"{label} is {lsize[1]}x{lsize[0]} but its image {Path(image).name} is {isize[1]}x{isize[0]} "
                        f"(W x H); a label must have its image's size ({len(scan.resized):,} pairs differ)")
    return FilePairSource(f"{PREFIX}{root}:{split}", scan.stems, scan.images, scan.labels,
                          FolderLabels(ids, ignore, root / CLASSES))
