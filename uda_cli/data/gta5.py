"""GTA5 ("Playing for Data", Richter, Vineet, Roth, Koltun, ECCV 2016): 24,966 frames of the
game Grand Theft Auto V with pixel labels in the Cityscapes label ids.

The domain ``gta5`` (segmentation, the Cityscapes 19 classes) reads what ``uda download
gta5`` unpacks::

    <root>/gta5/images/00001.png ... 24966.png    RGB frames, mostly 1914x1052
    <root>/gta5/labels/00001.png ... 24966.png    palette ('P') PNGs: index = Cityscapes label id

Labels are read as their palette indices (``dense.read_png_unchanged``), never through the
palette's colours, and mapped to train ids with ``labels.CITYSCAPES_ID_TO_TRAIN``, as
ADVENT, CRST and DAFormer read them. A sample's stem is its file name without ``.png``
(``00001``); samples are in file-name order (the names are zero-padded numbers).

Splits: ``all`` only, which runs train on and evaluate on. UDA papers (ADVENT, CRST,
DAFormer) train on all 24,966 frames and publish no GTA5 train/val list. The project page
is said to offer a ``split.mat`` of train/val/test ids; we could not fetch it to check (no
network where this was written), so no other split is offered: slice ``all`` for a held-out
part, e.g. train on ``gta5:all[:-500]``, evaluate on ``gta5:all[-500:]``.
Default run size (720, 1280), ADVENT's source size.

Departures and checks:
- A few frames' label differs in size from its image (CBST issue #5: "e.g. 1046 x 1914";
  LSD-seg's errata). CRST pre-resizes every file to 1914x1052; we resize that label to its
  image (nearest) while reading (``dense.FilePairSource``), count such pairs when the split
  is listed, and warn once with the count and an example.
- An image without a label or a label without an image (one public download lacks 25 ids,
  IAST-ECCV2020 issue #2) is skipped, and the same warning says how many and which.
- Sizes come from PNG headers (24 bytes a file) and are cached in
  ``<root>/gta5/.uda-cache/sizes-all.json``, keyed by file name, mtime and byte size; a
  cache that cannot be written only costs time. Measured on this repository's 2-core host
  (warm page cache): see ``scan_pairs``.

The pair helpers below (:func:`scan_pairs`, :func:`image_size`, :func:`warn_pairs`) serve
``synthia`` and ``folder:PATH`` too: they are flat image/label folders of the same shape.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Download: the files `uda download gta5` fetches (download/catalogue.py collects them)
# ---------------------------------------------------------------------------------------

from uda_cli.data.download.audit import PairAudit
from uda_cli.data.download.types import MB, Dataset, Resource

# GTA5 ("Playing for Data", Richter et al. ECCV 2016): ten image and ten label zips on the
# project site, which publishes no checksums. The sizes are estimates (about 2,500 PNGs of
# 1914x1052 per image part).
_GTA5_BASE = "https://download.visinf.tu-darmstadt.de/data/from_games/data/"
GTA5_DOWNLOAD = Dataset(
    name="gta5", folder="gta5", mirror_dir="gta5",
    description=(
        "GTA5 (Playing for Data): 24,966 frames of Grand Theft Auto V with pixel labels compatible with "
        "Cityscapes, in ten image and ten label zips; layout <root>/gta5/images/*.png, <root>/gta5/labels/*.png"
    ),
    licence=(
        "research and educational use; the images are from the game Grand Theft Auto V (Rockstar Games); "
        "cite Richter et al., ECCV 2016; see the project page for the terms"
    ),
    homepage="https://download.visinf.tu-darmstadt.de/data/from_games/",
    resources=tuple(
        Resource(f"{i:02d}_{kind}.zip", (f"{_GTA5_BASE}{i:02d}_{kind}.zip",), unpublished="no published checksum",
                 approx_size=size, extracted_size=size, extract=True, into=kind)
        for i in range(1, 11)
        for kind, size in (("images", 5_800 * MB), ("labels", 120 * MB))
    ),
    audit=PairAudit("images", ".png", "labels", ".png", expected=24_966),
)


# ---------------------------------------------------------------------------------------
# Reader: image/label pairs of flat folders, their sizes from PNG headers, the GTA5 domain
# ---------------------------------------------------------------------------------------

import json
import os
import shlex
import struct
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from uda_cli.errors import DataError

CACHE_DIR = ".uda-cache"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIZES_VERSION = 1


def download_hint(dataset: str, folder: Path) -> str:
    """The command that fetches ``dataset`` into the data root holding ``folder``."""
    return f"uda download {dataset} --data-root {shlex.quote(str(folder.parent))}"


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header: a PNG's IHDR (24 bytes read), else PIL's header parse."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise DataError(f"cannot read {path} ({e.strerror or e}); check the file's permissions or remove it") from None
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if head[:8] == _PNG_SIGNATURE[:len(head[:8])] and path.suffix.lower() == ".png":
        raise DataError(f"{path} is a truncated PNG ({len(head)} bytes of header); download it again or remove it")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:  # reads the header only
            return im.height, im.width
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"{path} is not a readable image ({e}); download it again or remove it") from None


def image_sizes(paths: list[str], base: Path, cache: Path | None) -> list[tuple[int, int]]:
    """(H, W) of each file (paths as strings, under ``base``), from the JSON ``cache`` where its
    name, mtime and byte size match, else from its header; the cache is rewritten (atomically)
    when anything was read anew. ``cache=None``: headers every time. Keys are paths relative
    to ``base``. Strings, not ``Path``: pathlib's parsing cost more than the stats."""
    old: dict = {}
    if cache is not None:
        try:
            data = json.loads(cache.read_text())
            if isinstance(data, dict) and data.get("version") == _SIZES_VERSION and isinstance(data.get("files"), dict):
                old = data["files"]
        except (OSError, ValueError):
            old = {}  # absent or damaged: derived data, read the headers again
    new, out, misses = {}, [], 0
    cut = len(os.path.join(str(base), ""))
    for p in paths:
        key = p[cut:].replace(os.sep, "/")
        try:
            st = os.stat(p)
        except OSError as e:
            raise DataError(f"cannot read {p} ({e.strerror or e}); check the file or remove it") from None
        hit = old.get(key)
        if isinstance(hit, list) and len(hit) == 4 and hit[0] == st.st_mtime_ns and hit[1] == st.st_size:
            h, w = int(hit[2]), int(hit[3])
        else:
            h, w = image_size(Path(p))
            misses += 1
        new[key] = [st.st_mtime_ns, st.st_size, h, w]
        out.append((h, w))
    if cache is not None and (misses or len(new) != len(old)):
        _write_json(cache, {"version": _SIZES_VERSION, "files": new})
    return out


def _write_json(path: Path, data: dict) -> None:
    """Whole or not at all; a cache that cannot be written (read-only root, full disk) only costs time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".tmp-", suffix=".json", delete=False) as f:
            tmp = Path(f.name)
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def list_files(folder: Path, suffix: str) -> dict[str, str]:
    """``{stem: path as a string}`` of the visible files in ``folder`` whose name ends in
    ``suffix`` (case-insensitive), the stem being the name without it."""
    n = len(suffix)
    return {e.name[:-n]: e.path for e in os.scandir(folder)
            if not e.name.startswith(".") and e.name.lower().endswith(suffix.lower()) and e.is_file()}


@dataclass
class PairScan:
    """Matched image/label pairs in order, and what did not match or differed in size."""

    stems: list[str]
    images: list[str]  # paths as strings (see image_sizes)
    labels: list[str]
    no_label: list[str] = field(default_factory=list)  # images without a label
    no_image: list[str] = field(default_factory=list)  # labels without an image
    # (label, its (H, W), image, its (H, W)) for each pair whose sizes differ
    resized: list[tuple[str, tuple[int, int], str, tuple[int, int]]] = field(default_factory=list)


def scan_pairs(images: Mapping[str, str], labels: Mapping[str, str], base: Path, cache: Path | None,
               key: Callable[[str], object] | None = None, check_sizes: bool = True) -> PairScan:
    """Pair ``images`` and ``labels`` (``{stem: path}``) by stem, in ``sorted(stems, key=key)`` order.

    With ``check_sizes`` the pairs' sizes are read from headers (:func:`image_sizes`, cached
    in ``cache``). Measured (2-core development host, warm page cache, 10,000 pairs = 20,000
    PNGs, listing included): 0.25 s reading every header, 0.085 s from the cache (one ``stat``
    a file), so about 0.6 s and 0.2 s for GTA5's 24,966 pairs. On a cold page cache or a
    network disk a header read is a seek per file; the cache is what keeps that away.
    """
    both = sorted(images.keys() & labels.keys(), key=key)
    scan = PairScan(stems=both, images=[images[s] for s in both], labels=[labels[s] for s in both],
                    no_label=[images[s] for s in sorted(images.keys() - labels.keys(), key=key)],
                    no_image=[labels[s] for s in sorted(labels.keys() - images.keys(), key=key)])
    if check_sizes and both:
        sizes = image_sizes(scan.images + scan.labels, base, cache)
        n = len(both)
        for i in range(n):
            if sizes[i] != sizes[n + i]:
                scan.resized.append((scan.labels[i], sizes[n + i], scan.images[i], sizes[i]))
    return scan


def _hw(size: tuple[int, int]) -> str:
    return f"{size[1]}x{size[0]}"


def _rel(path: str, base: Path) -> str:
    return Path(path).relative_to(base).as_posix()


def _examples(paths: list[str], base: Path, k: int = 3) -> str:
    shown = ", ".join(_rel(p, base) for p in paths[:k])
    return shown + (", ..." if len(paths) > k else "")


def warn_pairs(name: str, scan: PairScan, base: Path) -> None:
    """One warning for a split's odd pairs: labels resized to their image, pairs skipped."""
    parts = []
    if scan.resized:
        label, lsize, image, isize = scan.resized[0]
        parts.append(f"{len(scan.resized):,} labels differ in size from their image and are resized to it (nearest), "
                     f"e.g. {_rel(label, base)} is {_hw(lsize)} (W x H), {_rel(image, base)} {_hw(isize)}")
    if scan.no_label:
        parts.append(f"{len(scan.no_label):,} images without a label are skipped ({_examples(scan.no_label, base)})")
    if scan.no_image:
        parts.append(f"{len(scan.no_image):,} labels without an image are skipped ({_examples(scan.no_image, base)})")
    if parts:
        warnings.warn(f"{name} in {base}: {len(scan.stems):,} pairs; " + "; ".join(parts), stacklevel=3)


def require_dir(path: Path, what: str, dataset: str, folder: Path) -> None:
    """A one-line DataError when a folder a reader needs is not there."""
    if not folder.is_dir():
        raise DataError(f"{dataset} is not downloaded: no folder {folder}; run: {download_hint(dataset, folder)}")
    if not path.is_dir():
        raise DataError(f"{dataset} is incomplete: {what} folder {path} is missing (an unfinished download or "
                        f"extraction?); run: {download_hint(dataset, folder)}")


def require_pairs(scan: PairScan, name: str, dataset: str, folder: Path, images: Path, labels: Path) -> None:
    if not scan.stems:
        raise DataError(f"{name}: no image/label pairs in {images} and {labels} ({len(scan.no_label):,} images, "
                        f"{len(scan.no_image):,} labels with no partner); run: {download_hint(dataset, folder)}")


# ---- GTA5 ------------------------------------------------------------------------------

GTA5_PAIRS = 24_966
GTA5_SIZE = (720, 1280)  # (H, W): ADVENT's source size (its aspect is 2 % off the frames' 1052x1914)
SPLITS = ("all",)


def read_gta5(folder: Path, split: str):
    """``<folder>/images/*.png`` with ``<folder>/labels/*.png`` -> a :class:`~uda_cli.data.dense.FilePairSource`."""
    from uda_cli.data.dense import FilePairSource, LookupLabels
    from uda_cli.data.labels import CITYSCAPES_ID_TO_TRAIN

    if split not in SPLITS:
        raise DataError(f"gta5 has one split, 'all', not {split!r}")
    images, labels = folder / "images", folder / "labels"
    require_dir(images, "its images", "gta5", folder)
    require_dir(labels, "its labels", "gta5", folder)
    scan = scan_pairs(list_files(images, ".png"), list_files(labels, ".png"), folder,
                      folder / CACHE_DIR / f"sizes-{split}.json")
    name = f"gta5:{split}"
    require_pairs(scan, name, "gta5", folder, images, labels)
    warn_pairs(name, scan, folder)
    return FilePairSource(name, scan.stems, scan.images, scan.labels,
                          LookupLabels(CITYSCAPES_ID_TO_TRAIN, what="Cityscapes label id"))


def _register() -> None:
    # Imported here, at the end: registry -> domains -> this module -> registry must not
    # find this module half-built (see domains.py's last line).
    from uda_cli.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    from uda_cli.data.registry import DomainSpec, register_domain

    register_domain(DomainSpec(
        name="gta5", task="segmentation", classes=CITYSCAPES_CLASSES, channels=3, image_size=GTA5_SIZE,
        splits=SPLITS, train_split="all", eval_split="all", dataset="gta5", reader=read_gta5,
        description=(f"GTA5 (Playing for Data): {GTA5_PAIRS:,} game frames, mostly 1914x1052, labelled in the "
                     "Cityscapes 19 classes; one split, all (slice it for a held-out part: gta5:all[-500:])"),
        palette=CITYSCAPES_PALETTE,
    ))


_register()
