"""Readers for Office-31 (Saenko et al. ECCV 2010): amazon, webcam and dslr, 31 classes.

`uda download office31` unpacks ``domain_adaptation_images.tar.gz`` into
``<data root>/office31/{amazon,webcam,dslr}/images/<class>/*.jpg``; a copy laid out as
``office31/<domain>/<class>/*.jpg`` (without ``images/``) is read too. A class is its
folder, in alphabetical order (back_pack = 0 ... trash_can = 30), as every Office-31 paper
numbers them.

Each domain has one split, ``all``: Office-31 adaptation trains on all labelled source
images and all unlabelled target images and reports accuracy on all target images.

The images vary in size (amazon 300x300 product shots; webcam and dslr up to 1000x1000), so
the reader resizes each one to 224x224 (bilinear, antialiased) as it reads: the registry
keeps a split in memory as uint8, and all 4,110 images at 3x224x224 take about 620 MB
(amazon alone 424 MB). Cropping augmentation (resize 256, random crop 224) would need the
batch stream's help; we resize straight to the network's input size instead.

``OFFICE31_DOWNLOAD`` declares the tarball ``uda download office31`` fetches and the audit
that counts its images; ``uda_cli.data.download.catalogue`` collects it.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from uda_cli.data.download.audit import ClassFolderAudit
from uda_cli.data.download.types import MB, Dataset, Resource
from uda_cli.errors import DataError

OFFICE31_DOMAINS = ("amazon", "webcam", "dslr")
OFFICE31_CLASSES = (
    "back_pack", "bike", "bike_helmet", "bookcase", "bottle", "calculator", "desk_chair", "desk_lamp",
    "desktop_computer", "file_cabinet", "headphones", "keyboard", "laptop_computer", "letter_tray",
    "mobile_phone", "monitor", "mouse", "mug", "paper_notebook", "pen", "phone", "printer", "projector",
    "punchers", "ring_binder", "ruler", "scissors", "speaker", "stapler", "tape_dispenser", "trash_can",
)
OFFICE31_SIZES = {"amazon": 2817, "webcam": 795, "dslr": 498}  # images per domain in the release
OFFICE_SIZE = (224, 224)  # (H, W): ResNet-50's input size
SPLITS = ("all",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")

# The files `uda download office31` fetches (download/catalogue.py collects them).
#
# Office-31 (Saenko et al. ECCV 2010): one tarball, domain_adaptation_images.tar.gz, that
# unpacks to {amazon,dslr,webcam}/images/<class>/*.jpg. Its home page links a Google Drive
# file; no checksum is published. (A third-party script records sha1
# 7aa25a86f3880b6e79283227816f9d4d8506d636 for it; that is not the publisher's, so it is
# only noted here.) The usercontent URL skips Drive's "cannot scan for viruses" page; a
# page instead of the file falls through to the next URL.
_OFFICE31_DRIVE_ID = "0B4IapRTv9pJ1WGZVd1VDMmhwdlE"
_OFFICE31_RESOURCE_KEY = "0-gNMHVtZfRAyO_t2_WrOunA"  # old "0B" Drive files need it since 2021
OFFICE31_DOWNLOAD = Dataset(
    name="office31", folder="office31", mirror_dir="office31",
    description=(
        "Office-31: 4,110 object photos in 31 classes from three domains, amazon (2,817 product shots), "
        "webcam (795) and dslr (498); layout <root>/office31/{amazon,webcam,dslr}/images/<class>/*.jpg"
    ),
    licence="no explicit licence; research use; cite Saenko et al., ECCV 2010",
    homepage="https://faculty.cc.gatech.edu/~judy/domainadapt/",
    resources=(
        Resource(
            "domain_adaptation_images.tar.gz",
            (
                f"https://drive.usercontent.google.com/download?id={_OFFICE31_DRIVE_ID}&export=download&confirm=t"
                f"&resourcekey={_OFFICE31_RESOURCE_KEY}",
                f"https://drive.google.com/uc?export=download&id={_OFFICE31_DRIVE_ID}&confirm=t",
            ),
            unpublished="no published checksum", approx_size=80 * MB, extracted_size=85 * MB, extract=True,
        ),
    ),
    audit=ClassFolderAudit(tuple(OFFICE31_SIZES.items()), classes=31),
)


def _fix(folder: Path, force: bool = False) -> str:
    force_flag = " --force" if force else ""
    return f"uda download office31{force_flag} --data-root {shlex.quote(str(folder.parent))}"


def domain_root(folder: Path, domain: str) -> Path:
    """``<folder>/<domain>/images`` as the archive unpacks, else ``<folder>/<domain>``."""
    nested = folder / domain / "images"
    return nested if nested.is_dir() else folder / domain


def list_office31(folder: Path, domain: str) -> list[tuple[Path, int]]:
    """``(image path, class index)`` for every image of ``domain``, sorted by class then name."""
    if domain not in OFFICE31_DOMAINS:
        raise DataError(f"unknown Office-31 domain {domain!r}; the domains are: {', '.join(OFFICE31_DOMAINS)}")
    root = domain_root(folder, domain)
    if not root.is_dir():
        raise DataError(f"Office-31 folder {folder / domain / 'images'} not found; run: {_fix(folder)}")
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    if tuple(found) != OFFICE31_CLASSES:
        missing = sorted(set(OFFICE31_CLASSES) - set(found))
        extra = sorted(set(found) - set(OFFICE31_CLASSES))
        what = "; ".join(filter(None, [
            f"missing class folders: {', '.join(missing)}" if missing else "",
            f"unexpected folders: {', '.join(extra)}" if extra else "",
        ]))
        raise DataError(f"Office-31 {domain} in {root} does not have the 31 class folders ({what}); "
                        f"re-download it: {_fix(folder, force=True)}")
    items = []
    for label, name in enumerate(OFFICE31_CLASSES):
        files = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((p, label) for p in files)
    if not items:
        raise DataError(f"Office-31 {domain} in {root} has no images; re-download it: {_fix(folder, force=True)}")
    return items


def read_office31(folder: Path, domain: str, split: str, size: tuple[int, int] = OFFICE_SIZE):
    """``images`` uint8 ``[N, H, W, 3]`` resized to ``size``, ``labels`` int64 ``[N]``."""
    from PIL import Image, UnidentifiedImageError

    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; Office-31 domains have one split: all")
    items = list_office31(folder, domain)
    h, w = size
    images = np.empty((len(items), h, w, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                if im.size != (w, h):
                    # Pillow's bilinear resize widens its filter when shrinking: antialiased.
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                images[i] = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            reason = " ".join(str(e).split())
            raise DataError(f"Office-31 image {path} is not readable ({reason}); "
                            f"re-download it: {_fix(folder, force=True)}") from None
    labels = np.fromiter((label for _, label in items), dtype=np.int64, count=len(items))
    return images, labels


def reader(domain: str):
    """The registry's ``(folder, split) -> (images, labels)`` for one domain."""

    def read(folder: Path, split: str):
        return read_office31(Path(folder), domain, split)

    read.__name__ = f"read_office31_{domain}"
    return read
