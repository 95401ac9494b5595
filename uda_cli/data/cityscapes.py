"""Cityscapes (Cordts et al., "The Cityscapes Dataset for Semantic Urban Scene Understanding",
CVPR 2016): 5,000 finely labelled street scenes from 50 cities, 2048x1024.

The domain ``cityscapes`` (segmentation, the 19 evaluated classes) reads what ``uda
download cityscapes`` unpacks (the site's ``leftImg8bit_trainvaltest.zip`` and
``gtFine_trainvaltest.zip``)::

    <root>/cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_xxxxxx_yyyyyy_leftImg8bit.png
    <root>/cityscapes/gtFine/{train,val,test}/<city>/<city>_xxxxxx_yyyyyy_gtFine_labelIds.png

Labels are the ``labelIds`` PNGs (8-bit, the label ids of cityscapesScripts'
``helpers/labels.py``), mapped to train ids with ``labels.CITYSCAPES_ID_TO_TRAIN`` (7 road
-> 0, ..., 33 bicycle -> 18, every other id -> 255). A sample's stem is
``<city>_xxxxxx_yyyyyy``; samples are sorted by city, then file name.

Splits: ``train`` (2,975), ``val`` (500) and ``test`` (1,525). Runs adapt on ``train``
(its labels unused by UDA methods) and evaluate on ``val``, as UDA papers report. ``test``'s
public labels are placeholders, so it is read without labels (``labelled=False``): for
predictions to submit to the benchmark server. Default run size (512, 1024), half the
native resolution, as ADVENT and CRST train on; evaluation's protocol (full-resolution
labels) is the evaluator's business, not this reader's.

Departures and checks:
- An image without its ``labelIds`` PNG (or a label without its image) in train/val is
  skipped with one warning naming the count and an example, rather than refused; a complete
  download has none.
- A label of another size than its image is resized to it (nearest) with the same warning
  (a complete download has none; sizes come from PNG headers, cached in
  ``<root>/cityscapes/.uda-cache/sizes-<split>.json``).
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------
# Download: the files `uda download cityscapes` fetches (download/catalogue.py collects them)
# ---------------------------------------------------------------------------------------

from uda_cli.data.download.audit import PairAudit
from uda_cli.data.download.types import GB, MB, Dataset, LoginForm, Resource

# Cityscapes (Cordts et al. CVPR 2016): behind a login. The site's own downloader
# (cityscapesScripts, csDownload) POSTs username/password/submit=Login to /login, takes a
# 302 as success, reads each package's md5 from /md5-sum/?packageID=N and the package from
# /file-handling/?packageID=N. Package 1 is gtFine_trainvaltest.zip (241 MB), package 3
# leftImg8bit_trainvaltest.zip (11 GB). Both zips also hold a README and license.txt.
_CITYSCAPES = "https://www.cityscapes-dataset.com/"
CITYSCAPES_DOWNLOAD = Dataset(
    name="cityscapes", folder="cityscapes", mirror_dir="cityscapes",
    description=(
        "Cityscapes: 5,000 finely labelled street scenes (2,975 train / 500 val / 1,525 test) from 50 cities; "
        "layout <root>/cityscapes/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png and "
        "<root>/cityscapes/gtFine/{train,val,test}/<city>/*_gtFine_labelIds.png"
    ),
    licence=(
        "Cityscapes terms of use: non-commercial research and teaching only, no redistribution; "
        "needs an account; cite Cordts et al., CVPR 2016"
    ),
    homepage=_CITYSCAPES + "downloads/",
    login=LoginForm(
        site="Cityscapes", url=_CITYSCAPES + "login/", protects=_CITYSCAPES,
        user_env="CITYSCAPES_USERNAME", password_env="CITYSCAPES_PASSWORD",
        register_url=_CITYSCAPES + "register/",
    ),
    resources=(
        Resource("gtFine_trainvaltest.zip", (_CITYSCAPES + "file-handling/?packageID=1",),
                 md5_url=_CITYSCAPES + "md5-sum/?packageID=1", approx_size=241 * MB, extracted_size=700 * MB,
                 extract=True, owns=("gtFine",)),
        Resource("leftImg8bit_trainvaltest.zip", (_CITYSCAPES + "file-handling/?packageID=3",),
                 md5_url=_CITYSCAPES + "md5-sum/?packageID=3", approx_size=11 * GB, extracted_size=11 * GB,
                 extract=True, owns=("leftImg8bit",)),
    ),
    audit=PairAudit("leftImg8bit", "_leftImg8bit.png", "gtFine", "_gtFine_labelIds.png", expected=5_000),
)


# ---------------------------------------------------------------------------------------
# Reader: leftImg8bit + gtFine labelIds, and the cityscapes domain
# ---------------------------------------------------------------------------------------

import os
from pathlib import Path

from uda_cli.errors import DataError

CITYSCAPES_SIZE = (512, 1024)  # (H, W) a run resizes to by default: half of 1024x2048
SPLITS = ("train", "val", "test")
SPLIT_SIZES = {"train": 2_975, "val": 500, "test": 1_525}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def _cities(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _listing(root: Path, suffix: str) -> dict[str, str]:
    """``{stem: path}`` over ``root/<city>/*<suffix>``, in city then name order."""
    from uda_cli.data.pairs import list_files

    out: dict[str, str] = {}
    for city in _cities(root):
        files = list_files(root / city, suffix)
        for stem in sorted(files):
            out[stem] = files[stem]
    return out


def _order(stem: str) -> tuple[str, str]:
    return stem.split("_", 1)[0], stem  # city, then name


def read_cityscapes(folder: Path, split: str):
    """``leftImg8bit/<split>`` with ``gtFine/<split>`` labelIds -> a :class:`~uda_cli.data.dense.FilePairSource`
    (``test``: images only, ``labelled=False``)."""
    from uda_cli.data.dense import FilePairSource, LookupLabels
    from uda_cli.data.pairs import CACHE_DIR, download_hint, require_dir, require_pairs, scan_pairs, warn_pairs
    from uda_cli.data.labels import CITYSCAPES_ID_TO_TRAIN

    if split not in SPLITS:
        raise DataError(f"cityscapes has the splits {', '.join(SPLITS)}, not {split!r}")
    name = f"cityscapes:{split}"
    images = folder / "leftImg8bit" / split
    require_dir(images, f"its {split} images (leftImg8bit/{split})", "cityscapes", folder)
    image_files = _listing(images, IMAGE_SUFFIX)
    if split == "test":
        if not image_files:
            raise DataError(f"{name}: no *{IMAGE_SUFFIX} images under {images}/<city>/; "
                            f"run: {download_hint('cityscapes', folder)}")
        stems = sorted(image_files, key=_order)
        return FilePairSource(name, stems, [image_files[s] for s in stems], None, None)
    labels = folder / "gtFine" / split
    require_dir(labels, f"its {split} labels (gtFine/{split})", "cityscapes", folder)
    scan = scan_pairs(image_files, _listing(labels, LABEL_SUFFIX), folder,
                      folder / CACHE_DIR / f"sizes-{split}.json", key=_order)
    require_pairs(scan, name, "cityscapes", folder, images, labels)
    warn_pairs(name, scan, folder)
    return FilePairSource(name, scan.stems, scan.images, scan.labels,
                          LookupLabels(CITYSCAPES_ID_TO_TRAIN, what="Cityscapes label id"))


def _register() -> None:
    # Imported here, at the end: registry -> domains -> this module -> registry must not
    # find this module half-built (see domains.py's last line).
    from uda_cli.data.labels import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE
    from uda_cli.data.registry import DomainSpec, register_domain

    register_domain(DomainSpec(
        name="cityscapes", task="segmentation", classes=CITYSCAPES_CLASSES, channels=3, image_size=CITYSCAPES_SIZE,
        splits=SPLITS, train_split="train", eval_split="val", dataset="cityscapes", reader=read_cityscapes,
        description=("Cityscapes: street scenes of 50 cities, 2048x1024, the 19 evaluated classes; "
                     "2,975 train / 500 val / 1,525 test (test unlabelled)"),
        palette=CITYSCAPES_PALETTE,
    ))


_register()
