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

The pair helpers (listing, PNG-header sizes and their cache, the one warning) are
``uda_cli/data/pairs.py``'s, shared with ``synthia``, ``cityscapes`` and ``folder:PATH``.
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
# Reader
# ---------------------------------------------------------------------------------------

from pathlib import Path

from uda_cli.data.pairs import CACHE_DIR, list_files, require_dir, require_pairs, scan_pairs, warn_pairs

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
