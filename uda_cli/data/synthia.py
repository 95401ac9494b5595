"""SYNTHIA-RAND-CITYSCAPES (Ros, Sellart, Materzynska, Vazquez, Lopez, "The SYNTHIA Dataset",
CVPR 2016): 9,400 rendered street scenes, 1280x760, labelled in SYNTHIA's 23 classes.

The domain ``synthia`` (segmentation, predicted in the Cityscapes 19 classes) reads what
``uda download synthia`` unpacks from ``SYNTHIA_RAND_CITYSCAPES.rar``::

    <root>/synthia/RAND_CITYSCAPES/RGB/0000000.png ... 0009399.png          8-bit RGB
    <root>/synthia/RAND_CITYSCAPES/GT/LABELS/0000000.png ... 0009399.png    16-bit, several channels

The class id is the label PNG's *first* channel (what DAFormer's converter and ADVENT/DADA
read; the other channels hold instance data, values past 255). ``torchvision.io.decode_png``
with ``ImageReadMode.UNCHANGED`` gives the 16-bit values with channels in file order
(``tests/test_dense_readers.py`` writes such a PNG by hand and checks it). Ids map to the
Cityscapes train ids of the 16 shared classes with ``labels.SYNTHIA_ID_TO_TRAIN``; the
domain's ``class_subsets`` name the 16 and 13 classes the papers average over.

Splits: ``all`` (9,400), trained on and evaluated on (SYNTHIA is a source). Default run
size (760, 1280): native, as ADVENT trains on it. A sample's stem is its file name without
``.png``; samples are in file-name order.

Departures and checks:
- Lanemarking (SYNTHIA id 22) is ignored (255), as ADVENT, DADA and DAFormer do; CRST maps
  it to road (see ``labels.py``).
- An image without a label or a label without an image is skipped, and a label of another
  size than its image resized to it (nearest), with one warning naming the counts and an
  example (a complete download has none; sizes from PNG headers, cached in
  ``<root>/synthia/.uda-cache/sizes-all.json``).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Download: the files `uda download synthia` fetches (download/catalogue.py collects them)
# ---------------------------------------------------------------------------------------

from uda_cli.data.download.audit import PairAudit
from uda_cli.data.download.types import GB, Dataset, Resource

# SYNTHIA-RAND-CITYSCAPES (Ros et al. CVPR 2016): one RAR archive (an unpacker is needed)
# that unpacks to RAND_CITYSCAPES/{RGB,Depth/Depth,GT/COLOR,GT/LABELS}/*.png, 9,400 frames
# (0000000.png-0009399.png; the download page says 9,000). No checksum is published.
SYNTHIA_DOWNLOAD = Dataset(
    name="synthia", folder="synthia", mirror_dir="synthia",
    description=(
        "SYNTHIA-RAND-CITYSCAPES: 9,400 rendered street scenes with labels compatible with Cityscapes; "
        "layout <root>/synthia/RAND_CITYSCAPES/RGB/*.png, .../GT/LABELS/*.png (also GT/COLOR, Depth); "
        "a RAR archive: needs bsdtar, unrar or 7z"
    ),
    licence="CC BY-NC-SA 3.0 (non-commercial); cite Ros et al., CVPR 2016",
    homepage="http://synthia-dataset.net/downloads/",
    resources=(
        Resource("SYNTHIA_RAND_CITYSCAPES.rar",
                 ("http://synthia-dataset.cvc.uab.cat/SYNTHIA_RAND_CITYSCAPES.rar",
                  "http://synthia-dataset.net/download/808/"),
                 unpublished="no published checksum", approx_size=21 * GB, extracted_size=22 * GB, extract=True),
    ),
    audit=PairAudit("RAND_CITYSCAPES/RGB", ".png", "RAND_CITYSCAPES/GT/LABELS", ".png", expected=9_400),
)


# ---------------------------------------------------------------------------------------
# Reader: RAND_CITYSCAPES/RGB + GT/LABELS (first channel), and the synthia domain
# ---------------------------------------------------------------------------------------

from pathlib import Path

from uda_cli.errors import DataError

SYNTHIA_PAIRS = 9_400
SYNTHIA_SIZE = (760, 1280)  # (H, W): native
SPLITS = ("all",)
IMAGES = "RAND_CITYSCAPES/RGB"  # below <root>/synthia, as SYNTHIA_DOWNLOAD's audit counts them
LABELS = "RAND_CITYSCAPES/GT/LABELS"


def read_synthia(folder: Path, split: str):
    """``RAND_CITYSCAPES/RGB/*.png`` with ``GT/LABELS/*.png`` -> a :class:`~uda_cli.data.dense.FilePairSource`."""
    from uda_cli.data.dense import FilePairSource, LookupLabels
    from uda_cli.data.pairs import CACHE_DIR, list_files, require_dir, require_pairs, scan_pairs, warn_pairs
    from uda_cli.data.labels import SYNTHIA_ID_TO_TRAIN

    if split not in SPLITS:
        raise DataError(f"synthia has one split, 'all', not {split!r}")
    images, labels = folder / IMAGES, folder / LABELS
    require_dir(images, f"its images ({IMAGES})", "synthia", folder)
    require_dir(labels, f"its labels ({LABELS})", "synthia", folder)
    scan = scan_pairs(list_files(images, ".png"), list_files(labels, ".png"), folder,
                      folder / CACHE_DIR / f"sizes-{split}.json")
    name = f"synthia:{split}"
    require_pairs(scan, name, "synthia", folder, images, labels)
    warn_pairs(name, scan, folder)
    return FilePairSource(name, scan.stems, scan.images, scan.labels,
                          LookupLabels(SYNTHIA_ID_TO_TRAIN, channel=0, what="SYNTHIA class id"))


def _register() -> None:
    # Imported here, at the end: registry -> domains -> this module -> registry must not
    # find this module half-built (see domains.py's last line).
    from uda_cli.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, SYNTHIA13, SYNTHIA16
    from uda_cli.data.registry import DomainSpec, register_domain

    register_domain(DomainSpec(
        name="synthia", task="segmentation", classes=CITYSCAPES_CLASSES, channels=3, image_size=SYNTHIA_SIZE,
        splits=SPLITS, train_split="all", eval_split="all", dataset="synthia", reader=read_synthia,
        description=(f"SYNTHIA-RAND-CITYSCAPES: {SYNTHIA_PAIRS:,} rendered street scenes, 1280x760, labelled in the "
                     "16 classes it shares with Cityscapes (mIoU also over 16 and 13); one split, all"),
        class_subsets=(("16", SYNTHIA16), ("13", SYNTHIA13)),
        palette=CITYSCAPES_PALETTE,
    ))


_register()
