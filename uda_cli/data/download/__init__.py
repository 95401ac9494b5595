"""Fetch dataset files: declared as data, resumed, verified, safely extracted, audited.

A :class:`Dataset` lists :class:`Resource` s; a resource is one file with the URLs it may be
fetched from (tried in order) and its checksum. :func:`download` brings a dataset's folder
under the data root up to date:

- it refuses to start when the disk lacks the space the missing files need, saying how much;
- a file that is already there and verifies is skipped; an archive that was already
  extracted is skipped by its marker file (``.<archive>.extracted``, which records the
  archive's checksums and the files it held, with their sizes);
- otherwise the file is fetched to ``<file>.part``, resuming a partial ``.part`` with an HTTP
  ``Range`` request, and is renamed to its final name only after its checksum matches, so a
  file under its final name has always been verified;
- ``--mirror`` base URLs (or local folders) are tried before the official URLs, as
  ``{mirror}/{dataset.mirror_dir}/{filename}``; a URL that fails (404, refused, a web page
  instead of the file) falls through to the next;
- archives are extracted only if every member stays inside the dataset folder (no absolute
  paths, no ``..``, no links or device files); otherwise nothing is extracted at all;
- a dataset with an audit (GTA5, SYNTHIA, Cityscapes, Office-31) is counted afterwards:
  image/label pairs or images per domain, missing and unreadable files reported.

Checksums. Where the publisher gives one, it is declared here (sha256, or md5 where only that
exists) or, for Cityscapes, read from the site after login. Where none is published (GTA5,
SYNTHIA, Office-31) the sha256 of the first download is recorded in ``.uda-sha256.json`` in
the dataset folder (trust on first use): a later download or ``--verify`` that finds other
bytes says so. ``uda download --list`` shows which kind each dataset has.

Logins. A dataset behind a login (Cityscapes) declares a :class:`LoginForm`; credentials
come from environment variables (or a prompt, in the command) and are used only in a POST
body: never in a URL, a message, a log line or an exception.

Only the standard library's urllib is used (``http``, ``https`` and ``file`` URLs). RAR
archives (SYNTHIA) need an external unpacker: bsdtar, unrar or 7z.
"""

from __future__ import annotations

import hashlib
import http.client
import http.cookiejar
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from uda_cli.errors import ConfigError, DataError, DownloadError, os_errors

if TYPE_CHECKING:
    from rich.console import Console

TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
CHUNK = 1 << 20
ATTEMPTS_PER_URL = 5  # resumes of a cut-off transfer before moving on to the next URL
USER_AGENT = "uda-download/0.1 (python-urllib)"
SIDECAR = ".uda-sha256.json"  # first-use sha256s of files that have no published checksum

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (*TAR_SUFFIXES, ".zip", ".rar")

# External unpackers for RAR, in order of preference: (program, list args, extract args).
# Each lists member names one per line ("Path = NAME" for 7z) and extracts into {dest}.
RAR_TOOLS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("bsdtar", ("-tf", "{archive}"), ("-xf", "{archive}", "-C", "{dest}")),
    ("unrar", ("lb", "{archive}"), ("x", "-o+", "-idq", "{archive}", "{dest}/")),
    ("7z", ("l", "-ba", "-slt", "{archive}"), ("x", "-y", "-o{dest}", "{archive}")),
)


@dataclass(frozen=True)
class Resource:
    """One file of a dataset.

    ``sha256`` is preferred; ``md5`` is accepted where only an md5 has been published;
    ``md5_url`` names a page (behind the dataset's login) whose first word is the md5. Where no
    checksum is published at all, ``unpublished`` says so and the first download's sha256 is
    recorded instead. ``size`` (bytes) is exact, when known: it sizes the progress bar and lets
    a complete ``.part`` be checked without asking the server again. ``approx_size`` and
    ``extracted_size`` are estimates, used for ``--list`` and the free-space check.
    """

    filename: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    extract: bool = False  # a tar/zip/rar archive, extracted into the dataset folder once verified
    required: bool = True  # False: skipped by --no-optional
    unpublished: str = ""  # why no checksum is declared (shown by --list); the sha256 is recorded on first use
    md5_url: str | None = None
    approx_size: int | None = None
    extracted_size: int | None = None
    # The folder (relative to the dataset folder) the archive's files belong in: members that
    # are not already under it are extracted into it, so a part archive that holds bare files
    # and one that holds ``images/...`` end up in the same place.
    into: str = ""
    # Folders this archive fills: the skip check and --verify look only at its files under them
    # (loose files such as the README that several Cityscapes zips share are extracted but not
    # owned by any one archive). Empty: every file it held.
    owns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5 or self.md5_url or self.unpublished):
            raise ValueError(
                f"{self.filename}: declare a sha256 (or an md5 where only that is published), an md5_url, "
                "or why no checksum is published (unpublished=...)"
            )
        if not self.filename or self.filename in (".", "..") or re.search(r"[/\\]", self.filename):
            raise ValueError(f"{self.filename!r}: a resource's filename is a plain file name")

    @property
    def checksum(self) -> tuple[str, str] | None:
        """``(algorithm, lowercase hex digest)`` as published and declared here, or None."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        if self.md5:
            return "md5", self.md5.lower()
        return None

    @property
    def download_size(self) -> int:
        """Bytes to fetch: exact where known, else the estimate, else 0 (unknown)."""
        return self.size or self.approx_size or 0

    @property
    def unpacked_size(self) -> int:
        """Bytes on disk once in place: the extracted files of an archive, else the file itself."""
        if self.extract:
            return self.extracted_size or self.download_size
        return self.download_size


@dataclass(frozen=True)
class LoginForm:
    """A site that hands out files only after a form login (Cityscapes).

    The form at ``url`` is fetched once (for its session cookie), then POSTed the credentials
    and ``fields``; a redirect, or a page without a password field, means success, and the
    same page again means failure. URLs starting with ``protects`` are fetched with the
    session's cookies.
    """

    site: str  # the name said in messages: "Cityscapes"
    url: str
    protects: str
    user_env: str
    password_env: str
    user_field: str = "username"
    password_field: str = "password"
    fields: tuple[tuple[str, str], ...] = (("submit", "Login"),)
    register_url: str = ""


@dataclass(frozen=True)
class Credentials:
    """A user name and password; the password never shows in a repr, a message or a log."""

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class AuditResult:
    """What an audit found: ``found`` complete items of ``expected``, and the problems."""

    what: str  # "image/label pairs", "images"
    found: int
    expected: int
    problems: tuple[str, ...] = ()  # one line each, a few examples at most

    @property
    def ok(self) -> bool:
        return not self.problems and self.found == self.expected

    def summary(self) -> str:
        text = f"{self.found:,} of {self.expected:,} {self.what}"
        return text if not self.problems else f"{text}; " + "; ".join(self.problems)


_EXAMPLES = 3  # example file names quoted per kind of problem


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:_EXAMPLES])
    return shown + (", ..." if len(names) > _EXAMPLES else "")


@dataclass(frozen=True)
class PairAudit:
    """Counts image/label pairs: ``<images>/**/<key><image_suffix>`` with
    ``<labels>/**/<key><label_suffix>``, the key being the path below the folder. A file
    is unreadable when its PNG/JPEG framing is broken (a truncated or unfinished file)."""

    images: str
    image_suffix: str
    labels: str
    label_suffix: str
    expected: int

    def __call__(self, folder: Path) -> AuditResult:
        imgs = _keyed(folder / self.images, self.image_suffix)
        lbls = _keyed(folder / self.labels, self.label_suffix)
        both = sorted(imgs.keys() & lbls.keys())
        no_label = sorted(imgs.keys() - lbls.keys())
        no_image = sorted(lbls.keys() - imgs.keys())
        bad, bad_keys = [], set()
        for k in both:
            for p in (imgs[k], lbls[k]):
                if not image_file_ok(p):
                    bad.append(p)
                    bad_keys.add(k)
        problems = []
        if no_label:
            problems.append(f"{len(no_label):,} images without a label (e.g. {_examples([imgs[k].name for k in no_label])})")
        if no_image:
            problems.append(f"{len(no_image):,} labels without an image (e.g. {_examples([lbls[k].name for k in no_image])})")
        if bad:
            rel = [p.relative_to(folder).as_posix() for p in bad]
            problems.append(f"{len(bad):,} unreadable files (e.g. {_examples(rel)})")
        if not problems and len(both) != self.expected:
            problems.append(f"expected {self.expected:,} pairs")
        return AuditResult("image/label pairs", len(both) - len(bad_keys), self.expected, tuple(problems))


def _keyed(root: Path, suffix: str) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    out = {}
    for p in root.rglob(f"*{suffix}"):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            out[rel[: -len(suffix)]] = p
    return out


@dataclass(frozen=True)
class ClassFolderAudit:
    """Counts images in ``<domain>/<under>/<class>/`` for each domain (Office-31)."""

    domains: tuple[tuple[str, int], ...]  # (folder, expected images)
    classes: int
    under: str = "images"

    def __call__(self, folder: Path) -> AuditResult:
        found, problems = 0, []
        expected = sum(n for _, n in self.domains)
        for domain, n in self.domains:
            root = folder / domain / self.under
            if not root.is_dir():
                problems.append(f"{domain}: folder {root} missing")
                continue
            classes = sorted(p for p in root.iterdir() if p.is_dir())
            files = [f for c in classes for f in sorted(c.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
            bad = [f for f in files if not image_file_ok(f)]
            found += len(files) - len(bad)
            if len(classes) != self.classes:
                problems.append(f"{domain}: {len(classes)} class folders, expected {self.classes}")
            if len(files) != n:
                problems.append(f"{domain}: {len(files):,} images, expected {n:,}")
            if bad:
                problems.append(f"{domain}: {len(bad)} unreadable images (e.g. "
                                f"{_examples([f.relative_to(folder).as_posix() for f in bad])})")
        return AuditResult("images", found, expected, tuple(problems))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_file_ok(path: Path) -> bool:
    """A cheap readability check that needs no decoding: a PNG starts with its signature and an
    IHDR chunk and ends with IEND; a JPEG starts with SOI and has an EOI in its last KiB. This
    catches truncated and unfinished files (the usual damage) in microseconds per file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            if head.startswith(_PNG_SIGNATURE):
                if head[12:16] != b"IHDR":
                    return False
                f.seek(0, os.SEEK_END)
                if f.tell() < 57:  # signature + IHDR + IEND
                    return False
                f.seek(-12, os.SEEK_END)
                return f.read(12)[4:8] == b"IEND"
            if head.startswith(b"\xff\xd8\xff"):
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 1024))
                return b"\xff\xd9" in f.read()
    except OSError:
        return False
    return False


@dataclass(frozen=True)
class Dataset:
    """A downloadable dataset: its files live in ``<data root>/<folder>/``."""

    name: str  # what `uda download` takes
    folder: str  # folder under the data root (the readers look there)
    mirror_dir: str  # folder under a --mirror base that holds the files
    resources: tuple[Resource, ...]
    description: str = ""
    licence: str = ""
    homepage: str = ""
    # Said when a file has no known URL and no --mirror was given.
    mirror_hint: str = ""
    login: LoginForm | None = None
    audit: Callable[[Path], AuditResult] | None = None


# --------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------

def _at(bases: Iterable[str], filename: str) -> tuple[str, ...]:
    return tuple(base + filename for base in bases)


GB = 1_000_000_000
MB = 1_000_000

# torchvision's MNIST mirrors (S3 first: yann.lecun.com has been unreliable), then the
# TensorFlow datasets mirror. All serve the same original files; the sha256 decides anyway.
_MNIST_BASES = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_USPS_BASE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
_SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"

DATASETS: dict[str, Dataset] = {}


def _register(ds: Dataset) -> Dataset:
    if ds.name in DATASETS:
        raise ValueError(f"dataset {ds.name!r} registered twice")
    DATASETS[ds.name] = ds
    return ds


_register(Dataset(
    name="mnist", folder="mnist", mirror_dir="mnist",
    description="MNIST handwritten digits: the four original IDX .gz files (60,000 train / 10,000 test)",
    licence="CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
    homepage="http://yann.lecun.com/exdb/mnist/",
    resources=(
        # sha256 of the originals (their md5s equal torchvision's MNIST.resources).
        Resource("train-images-idx3-ubyte.gz", _at(_MNIST_BASES, "train-images-idx3-ubyte.gz"),
                 sha256="440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", size=9_912_422),
        Resource("train-labels-idx1-ubyte.gz", _at(_MNIST_BASES, "train-labels-idx1-ubyte.gz"),
                 sha256="3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", size=28_881),
        Resource("t10k-images-idx3-ubyte.gz", _at(_MNIST_BASES, "t10k-images-idx3-ubyte.gz"),
                 sha256="8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", size=1_648_877),
        Resource("t10k-labels-idx1-ubyte.gz", _at(_MNIST_BASES, "t10k-labels-idx1-ubyte.gz"),
                 sha256="f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", size=4_542),
    ),
))

_register(Dataset(
    name="usps", folder="usps", mirror_dir="usps",
    description="USPS postal digits, LIBSVM release (7,291 train / 2,007 test, 16x16, values in [-1, 1])",
    licence="no explicit licence; J. J. Hull, IEEE TPAMI 16(5), 1994; redistributed for research by LIBSVM",
    homepage="https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass.html#usps",
    resources=(
        # URLs and md5s are torchvision's (datasets/usps.py); the sha256s are of the same files.
        Resource("usps.bz2", (_USPS_BASE + "usps.bz2",),
                 sha256="3771e9dd6ba685185f89867b6e249233dd74652389f263963b3b741e994b034f", size=6_579_383),
        Resource("usps.t.bz2", (_USPS_BASE + "usps.t.bz2",),
                 sha256="a9c0164e797d60142a50604917f0baa604f326e9a689698763793fa5d12ffc4e", size=1_831_726),
    ),
))

_register(Dataset(
    name="svhn", folder="svhn", mirror_dir="svhn",
    description="SVHN cropped house-number digits (73,257 train / 26,032 test, 32x32 colour)",
    licence="non-commercial use only; cite Netzer et al., NIPS Workshop 2011",
    homepage="http://ufldl.stanford.edu/housenumbers/",
    resources=(
        # Only md5s are published (torchvision's datasets/svhn.py); no sha256 is known.
        Resource("train_32x32.mat", (_SVHN_BASE + "train_32x32.mat",),
                 md5="e26dedcc434d2e4c54c9b2d4a06d8373", size=182_040_794),
        Resource("test_32x32.mat", (_SVHN_BASE + "test_32x32.mat",),
                 md5="eb5a983be6a315427106f1b164d9cef3", size=64_275_384),
    ),
))

# MNIST-M (Ganin & Lempitsky) has no official checksummed release: the authors' original
# was a pickle behind a share link. These three archives are the repackaging of the
# original PNGs described in shared/data/README.md (deterministic tarballs, checksums
# below); they extract to mnist_m/mnist_m_{train,test}/ and mnist_m_{train,test}_labels.txt.
# No public URL is known for them, so they are fetched only from a --mirror.
_register(Dataset(
    name="mnistm", folder="mnistm", mirror_dir="mnist_m",
    description="MNIST-M: MNIST digits blended with BSDS500 patches (59,001 train / 9,001 test, 32x32 colour)",
    licence=(
        "no explicit licence; MNIST (CC BY-SA 3.0) blended with BSDS500 patches (research use); "
        "cite Ganin et al."
    ),
    homepage="https://arxiv.org/abs/1409.7495",
    mirror_hint=(
        "MNIST-M has no official checksummed download; pass --mirror DIR_OR_URL where DIR_OR_URL "
        "holds mnist_m/<archive> (e.g. --mirror /path/to/shared/data or --mirror https://host/data)"
    ),
    resources=(
        Resource("mnist_m_test.tar.gz",
                 sha256="2e482b10e2014cde4e435dc6c618e6d5a517b00239f6caadefc500d830586c30",
                 size=17_692_927, extract=True),
        # Train images 0-9,999 plus the complete train labels file (all 59,001 names).
        Resource("mnist_m_train_part1_00000000-00009999.tar.gz",
                 sha256="acd985d124c497bfe4a9aa73e42a01e0fd146d55796c0ad9c214d29ab53adb27",
                 size=19_775_357, extract=True),
        # Train images 10,000-59,000 (96 MB); readers skip the images that are missing.
        Resource("mnist_m_train_part2_00010000-00059000.tar.gz",
                 sha256="a9152604440e71d9f97685ba48ad84a9eab3317dfe65ff2125b25b8b24c0c473",
                 size=96_237_990, extract=True, required=False),
    ),
))

# Office-31 (Saenko et al. ECCV 2010): one tarball, domain_adaptation_images.tar.gz, that
# unpacks to {amazon,dslr,webcam}/images/<class>/*.jpg. Its home page links a Google Drive
# file; no checksum is published. (A third-party script records sha1
# 7aa25a86f3880b6e79283227816f9d4d8506d636 for it; that is not the publisher's, so it is
# only noted here.) The usercontent URL skips Drive's "cannot scan for viruses" page; a
# page instead of the file falls through to the next URL.
_OFFICE31_DRIVE_ID = "0B4IapRTv9pJ1WGZVd1VDMmhwdlE"
_OFFICE31_RESOURCE_KEY = "0-gNMHVtZfRAyO_t2_WrOunA"  # old "0B" Drive files need it since 2021
_OFFICE31_DOMAINS = (("amazon", 2817), ("webcam", 795), ("dslr", 498))
_register(Dataset(
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
    audit=ClassFolderAudit(_OFFICE31_DOMAINS, classes=31),
))

# GTA5 ("Playing for Data", Richter et al. ECCV 2016): ten image and ten label zips on the
# project site, which publishes no checksums. The sizes are estimates (about 2,500 PNGs of
# 1914x1052 per image part).
_GTA5_BASE = "https://download.visinf.tu-darmstadt.de/data/from_games/data/"
_register(Dataset(
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
))

# SYNTHIA-RAND-CITYSCAPES (Ros et al. CVPR 2016): one RAR archive (an unpacker is needed)
# that unpacks to RAND_CITYSCAPES/{RGB,Depth/Depth,GT/COLOR,GT/LABELS}/*.png, 9,400 frames
# (0000000.png-0009399.png; the download page says 9,000). No checksum is published.
_register(Dataset(
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
))

# Cityscapes (Cordts et al. CVPR 2016): behind a login. The site's own downloader
# (cityscapesScripts, csDownload) POSTs username/password/submit=Login to /login, takes a
# 302 as success, reads each package's md5 from /md5-sum/?packageID=N and the package from
# /file-handling/?packageID=N. Package 1 is gtFine_trainvaltest.zip (241 MB), package 3
# leftImg8bit_trainvaltest.zip (11 GB). Both zips also hold a README and license.txt.
_CITYSCAPES = "https://www.cityscapes-dataset.com/"
_register(Dataset(
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
))


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def _resolve(dataset: str | Dataset) -> Dataset:
    return get_dataset(dataset) if isinstance(dataset, str) else dataset


# --------------------------------------------------------------------------------------
# Checksums and URLs
# --------------------------------------------------------------------------------------

def file_checksum(path: Path, algorithm: str) -> str:
    return file_checksums(path, (algorithm,))[algorithm]


def file_checksums(path: Path, algorithms: Iterable[str]) -> dict[str, str]:
    """Several digests in one pass over the file."""
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in dict.fromkeys(algorithms)}
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            for h in hashes.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashes.items()}


def verify(path: Path, resource: Resource) -> bool:
    """True when ``path`` matches the resource's published checksum (False when none is published)."""
    if resource.checksum is None:
        return False
    algorithm, expected = resource.checksum
    return path.is_file() and file_checksum(path, algorithm) == expected


def mirror_url(mirror: str, mirror_dir: str, filename: str) -> str:
    """``{mirror}/{mirror_dir}/{filename}``; a mirror without a scheme is a local folder."""
    if "://" not in mirror:
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{mirror_dir}/{urllib.parse.quote(filename)}"


def candidate_urls(dataset: Dataset, resource: Resource, mirrors: Iterable[str] = ()) -> list[str]:
    """Mirrors first, then the resource's own URLs, without repeats."""
    urls = [mirror_url(m, dataset.mirror_dir, resource.filename) for m in mirrors]
    return list(dict.fromkeys([*urls, *resource.urls]))


def _recorded(folder: Path) -> dict[str, str]:
    """First-use sha256s recorded in the dataset folder: file name -> sha256."""
    try:
        record = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if isinstance(v, str)} if isinstance(record, dict) else {}


def _record(folder: Path, filename: str, sha256: str) -> None:
    record = _recorded(folder)
    record[filename] = sha256
    path = folder / SIDECAR
    tmp = path.with_name(path.name + ".tmp")
    with _local(path, "write"):
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)


def _remember(folder: Path, resource: Resource, digests: dict[str, str]) -> None:
    """Record the sha256 of a file checked against a checksum read from its site (Cityscapes'
    md5), so that a later --verify, which stays offline, has something to compare with."""
    if not resource.checksum and resource.filename not in _recorded(folder):
        _record(folder, resource.filename, digests["sha256"])


def _static_checksum(resource: Resource, folder: Path) -> tuple[str, str, str] | None:
    """The checksum known without the network: ``(algorithm, digest, where it comes from)``."""
    if resource.checksum:
        algorithm, digest = resource.checksum
        return algorithm, digest, algorithm
    recorded = _recorded(folder).get(resource.filename)
    if recorded:
        return "sha256", recorded, "sha256 recorded at first download"
    return None


def checksum_kind(ds: Dataset) -> str:
    """What guards the dataset's files, in words (for --list)."""
    kinds = []
    for r in ds.resources:
        if r.checksum:
            kinds.append(r.checksum[0])
        elif r.md5_url:
            kinds.append("md5 read from the site after login")
        else:
            kinds.append(f"unverified: {r.unpublished} (sha256 recorded on first download)")
    return "; ".join(dict.fromkeys(kinds))


# --------------------------------------------------------------------------------------
# Logins (Cityscapes)
# --------------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Leaves a redirect unfollowed, so that the login POST's 302 (success) can be seen."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: D102
        return None


def credentials_from_env(form: LoginForm, environ: dict[str, str] | None = None) -> Credentials | None:
    env = os.environ if environ is None else environ
    user, password = env.get(form.user_env, ""), env.get(form.password_env, "")
    return Credentials(user, password) if user and password else None


def login(form: LoginForm, credentials: Credentials, console: Console | None = None):
    """Log in with a form POST; return a urllib opener that carries the session's cookies.

    Raises a one-line :class:`DownloadError` on failure. The password goes only into the POST
    body: no message here or below can contain it.
    """
    jar = http.cookiejar.CookieJar()
    probe = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
    headers = {"User-Agent": USER_AGENT}
    try:  # the form page first: it sets the session cookie the POST must carry
        with _open(urllib.request.Request(form.url, headers=headers), opener=probe) as r:
            r.read()
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise DownloadError(f"could not open the {form.site} login page {form.url} (HTTP {e.code})") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"could not reach the {form.site} login page {form.url}: {_describe(reason)}") from None

    body = urllib.parse.urlencode(
        {form.user_field: credentials.username, form.password_field: credentials.password, **dict(form.fields)}
    ).encode()
    post = urllib.request.Request(
        form.url, data=body, headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}
    )
    failed = DownloadError(
        f"{form.site} login failed for user {credentials.username}; "
        f"check {form.user_env}/{form.password_env}"
    )
    try:
        with _open(post, opener=probe) as r:
            page = r.read(1 << 20)
        # A 200 is the login page again (failure) unless it has no password field any more.
        if re.search(rb"""type\s*=\s*["']?password""", page, re.IGNORECASE):
            raise failed
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):  # a redirect is the site's "welcome in"
            raise (failed if e.code in (401, 403) else DownloadError(
                f"{form.site} login at {form.url} answered HTTP {e.code}; try again later")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise DownloadError(f"could not reach the {form.site} login page {form.url}: {_describe(reason)}") from None
    if console is not None:
        _say(console, f"{form.site}: logged in as {credentials.username}")
    return urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))


class _NoCredentials(Exception):
    """A URL needs the dataset's login and no credentials were given."""


class _Session:
    """What one download of one dataset shares: its console and mirrors, and its login, made
    once and only when a URL behind it (or its published md5) is needed."""

    def __init__(self, ds: Dataset, folder: Path, console: Console, mirrors: tuple[str, ...],
                 credentials: Credentials | None):
        self.ds, self.folder, self.console, self.mirrors = ds, folder, console, mirrors
        self.credentials = credentials
        self._opener = None

    def opener_for(self, url: str):
        form = self.ds.login
        if form is None or not url.startswith(form.protects):
            return None
        if self._opener is None:
            if self.credentials is None:
                raise _NoCredentials()
            self._opener = login(form, self.credentials, self.console)
        return self._opener

    def published_md5(self, resource: Resource) -> str | None:
        """The md5 the site shows for ``resource`` (after login), or None without credentials."""
        if not resource.md5_url:
            return None
        try:
            opener = self.opener_for(resource.md5_url)
        except _NoCredentials:
            return None
        try:
            with _open(urllib.request.Request(resource.md5_url, headers={"User-Agent": USER_AGENT}), opener) as r:
                text = r.read(4096).decode("utf-8", "replace")
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise DownloadError(f"could not read the md5 of {resource.filename} from {resource.md5_url}: "
                                f"{_describe(reason)}") from None
        words = text.split()
        if not words or not re.fullmatch(r"[0-9a-fA-F]{32}", words[0]):
            raise DownloadError(f"{resource.md5_url} did not answer with the md5 of {resource.filename}; "
                                "try again later")
        return words[0].lower()

    def expected(self, resource: Resource) -> tuple[str, str, str] | None:
        if resource.checksum:
            algorithm, digest = resource.checksum
            return algorithm, digest, algorithm
        md5 = self.published_md5(resource)
        if md5:
            return "md5", md5, f"md5 published by {self.ds.login.site if self.ds.login else 'the site'}"
        return _static_checksum(resource, self.folder)

    def no_credentials(self) -> DownloadError:
        form = self.ds.login
        assert form is not None
        missing = [r.filename for r in self.ds.resources
                   if r.required and not _done(r, self.folder) and not (self.folder / r.filename).exists()]
        files = " and ".join(missing)
        account = f" (an account: {form.register_url})" if form.register_url else ""
        return DownloadError(
            f"{form.site} downloads need a login: set {form.user_env} and {form.password_env}{account}, "
            f"or download {files} from {self.ds.homepage} yourself, put {'them' if len(missing) > 1 else 'it'} "
            f"in {self.folder}/ and run `uda download {self.ds.name}` again to verify and extract "
            f"{'them' if len(missing) > 1 else 'it'}"
        )


# --------------------------------------------------------------------------------------
# download()
# --------------------------------------------------------------------------------------

def download(
    dataset: str | Dataset,
    data_root: Path | str,
    mirrors: Iterable[str] = (),
    force: bool = False,
    include_optional: bool = True,
    console: Console | None = None,
    credentials: Credentials | None = None,
) -> Path:
    """Fetch, verify and extract ``dataset`` into ``<data_root>/<folder>``; return that folder.

    ``force`` fetches every file again even if it verifies. ``include_optional=False`` skips
    resources declared ``required=False``. ``credentials`` log in where the dataset needs it
    (default: from the dataset's environment variables). Raises :class:`DownloadError` (one
    line) on failure, including an audit that finds missing or unreadable files.
    """
    from rich.console import Console

    ds = _resolve(dataset)
    console = console or Console(stderr=True)
    folder = Path(data_root) / ds.folder
    if credentials is None and ds.login is not None:
        credentials = credentials_from_env(ds.login)
    check_disk_space(ds, folder, include_optional=include_optional, force=force)
    with _local(folder, "create"):
        folder.mkdir(parents=True, exist_ok=True)
    session = _Session(ds, folder, console, tuple(mirrors), credentials)
    for resource in ds.resources:
        if not resource.required and not include_optional:
            _say(console, f"{ds.name}: skipping optional {resource.filename}")
            continue
        _ensure_resource(session, resource, force)
    if ds.audit is not None:
        result = ds.audit(folder)
        if not result.ok:
            raise DownloadError(
                f"{ds.name}: the audit found {result.summary()} in {folder}; "
                f"run `uda download {ds.name}` again, or `uda download {ds.name} --verify` for details"
            )
        _say(console, f"{ds.name}: audit: {result.summary()}")
    _say(console, f"{ds.name}: ready in {folder}", "green")
    return folder


def _ensure_resource(session: _Session, resource: Resource, force: bool) -> None:
    ds, folder, console = session.ds, session.folder, session.console
    target = folder / resource.filename
    part = _part_path(target)
    marker = _marker_path(target)
    if force:
        part.unlink(missing_ok=True)  # a forced download starts from nothing
    else:
        if resource.extract and _marker_ok(marker, resource, folder):
            _say(console, f"{ds.name}: {resource.filename} already extracted and verified, skipping")
            return
        if target.exists():
            expected = session.expected(resource)
            digests = file_checksums(target, ("sha256", *(expected[:1] if expected else ())))
            if expected is None:
                # Nothing to compare with: a file the user put there (a Cityscapes zip fetched by
                # hand, say). It is trusted now and its sha256 recorded; zips also carry a CRC-32
                # per member, which extraction checks.
                _record(folder, resource.filename, digests["sha256"])
                _say(console, f"{ds.name}: {resource.filename} found; no published checksum to compare with, "
                              f"its sha256 {digests['sha256'][:16]}… was recorded (trust on first use)", "yellow")
            elif digests[expected[0]] == expected[1]:
                _remember(folder, resource, digests)
                _say(console, f"{ds.name}: {resource.filename} already verified ({expected[2]}), skipping")
            else:
                # Deleted at once, so that no reader can use it if the fetch below fails.
                target.unlink()
                _say(console, f"{ds.name}: {resource.filename} did not match its {expected[2]} and was deleted; "
                              "fetching it again", "yellow")
                digests = None
            if digests is not None:
                if resource.extract:
                    _extract_and_mark(target, folder, resource, console, ds.name, digests)
                return

    urls = candidate_urls(ds, resource, session.mirrors)
    if not urls:
        hint = ds.mirror_hint or "pass --mirror DIR_OR_URL holding " + f"{ds.mirror_dir}/{resource.filename}"
        raise DownloadError(f"{ds.name}: no download URL is known for {resource.filename}; {hint}")
    digests = _fetch_to(target, resource, urls, session)
    if resource.extract:
        _extract_and_mark(target, folder, resource, console, ds.name, digests)


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One plain line: file names and URLs are not rich markup, and logs get no hard wraps."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _marker_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.extracted")


# --------------------------------------------------------------------------------------
# Free space
# --------------------------------------------------------------------------------------


def _done(resource: Resource, folder: Path) -> bool:
    """Already in place, judged without reading file contents (markers, names and sizes)."""
    target = folder / resource.filename
    if resource.extract:
        return _marker_ok(_marker_path(target), resource, folder)
    if not target.is_file():
        return False
    return resource.size is None or target.stat().st_size == resource.size


def space_needed(ds: Dataset, folder: Path, include_optional: bool = True, force: bool = False) -> int:
    """Bytes of free space the missing part of ``ds`` needs at its peak (an estimate where sizes are).

    Files are fetched one after the other, and an archive is deleted once extracted, so the
    peak is while the last archive still sits beside everything extracted so far: the sum of
    what each file adds on disk (extracted size for an archive, the file for the rest) plus the
    largest archive still to fetch. An archive already on disk (put there by hand) needs only
    the room for its contents; a ``.part`` needs only its remaining bytes.
    """
    peak = kept = 0
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        done = _done(r, folder)
        if done and not force:
            continue
        target = folder / r.filename
        fetch = 0
        if force or not target.exists():
            part = _part_path(target)
            have = part.stat().st_size if (part.exists() and not force) else 0
            fetch = max(0, r.download_size - have)
        grows = 0 if done else r.unpacked_size  # a forced redo overwrites files in place
        if r.extract:
            peak = max(peak, kept + fetch + grows)
            kept += grows
        else:
            peak = max(peak, kept + fetch)  # a forced redo fetches beside the old file
            kept += 0 if done else fetch
    return peak


def check_disk_space(ds: Dataset, folder: Path, include_optional: bool = True, force: bool = False) -> None:
    """Refuse (a one-line DownloadError) when the free space under ``folder`` is too small."""
    need = space_needed(ds, folder, include_optional, force)
    if not need:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise DownloadError(
            f"{ds.name} needs about {human_size(need)} of free disk space under {probe} "
            f"(its archives and their extracted files), but only {human_size(free)} is free; "
            "free some space or pass another --data-root"
        )


def human_size(n: int) -> str:
    """Decimal units, as the dataset sites give them: 241 MB, 11 GB, 9.9 MB."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------
# Fetching one file
# --------------------------------------------------------------------------------------


class _UrlFailed(Exception):
    """This URL cannot give us the file now; the next one is tried."""


def _open(request: urllib.request.Request, opener=None):
    """The one place that touches the network (tests wrap it to keep to 127.0.0.1)."""
    if opener is None:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    return opener.open(request, timeout=TIMEOUT_S)


def _fetch_to(target: Path, resource: Resource, urls: list[str], session: _Session) -> dict[str, str]:
    """Fetch ``target`` from the first URL that works; rename it into place once verified.

    Returns the file's digests (sha256, and the algorithm it was checked with).
    """
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    console, label, folder = session.console, session.ds.name, session.folder
    part = _part_path(target)
    failures: list[str] = []
    needs_login = False
    # The bar is drawn only on a terminal and vanishes when done; the plain lines printed
    # alongside it are what a log or a pipe sees.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    with progress:
        for i, url in enumerate(urls):
            try:
                opener = session.opener_for(url)
                _fetch_url(url, part, resource, progress, console, f"{label}: {target.name}", opener)
            except _NoCredentials:
                needs_login = True
                failures.append(f"{url} (needs a login)")
                continue
            except _UrlFailed as e:
                failures.append(f"{url} ({e})")
                if i + 1 < len(urls):
                    _say(console, f"  {url}: {e}; trying the next URL", "dim")
                continue
            expected = session.expected(resource)
            digests = file_checksums(part, ("sha256", *(expected[:1] if expected else ())))
            if expected is not None and digests[expected[0]] != expected[1]:
                part.unlink()
                algorithm, digest, how = expected
                got = digests[algorithm]
                if how.startswith("sha256 recorded"):
                    raise DownloadError(
                        f"{target.name} from {url} differs from the copy first downloaded (sha256 {got[:16]}…, "
                        f"recorded {digest[:16]}…); the new file was deleted; if the publisher changed the file, "
                        f"remove its line from {folder / SIDECAR} and run the command again"
                    )
                raise DownloadError(
                    f"{target.name} from {url}: {algorithm} checksum did not match (got {got[:16]}…, "
                    f"expected {digest[:16]}…); the bad file was deleted; run the command again "
                    "or pass another --mirror"
                )
            os.replace(part, target)  # atomic: the final name only ever holds a checked file
            if expected is None:
                _record(folder, target.name, digests["sha256"])
                _say(console, f"{label}: {target.name} has no published checksum; its sha256 "
                              f"{digests['sha256'][:16]}… was recorded in {SIDECAR} (trust on first use)", "yellow")
            else:
                _remember(folder, resource, digests)
                _say(console, f"{label}: {target.name} verified ({expected[2]})")
            return digests
    if needs_login and not (part.exists() and part.stat().st_size):
        raise session.no_credentials()
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = f"; the partial file {part} was kept: run the command again to resume"
    raise DownloadError(f"could not download {target.name}: tried {', '.join(failures)}{kept}")


def _fetch_url(url: str, part: Path, resource: Resource, progress, console: Console, label: str,
               opener=None) -> None:
    """Make ``part`` hold the whole file from ``url``, resuming what is already there.

    Returns when the transfer looks complete (the checksum then decides); raises
    :class:`_UrlFailed` when this URL cannot finish it. A cut-off transfer is resumed at
    once while each attempt makes progress.
    """
    reason = "no attempt made"
    for _ in range(ATTEMPTS_PER_URL):
        have = part.stat().st_size if part.exists() else 0
        if resource.size is not None and have >= resource.size:
            if have == resource.size:
                return  # a complete .part from an earlier run: no need to ask the server
            part.unlink()  # longer than the file can be: not a prefix of it
            have = 0
        try:
            if _fetch_once(url, part, have, resource, progress, console, label, opener):
                return
            reason = "the transfer was cut off"
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:
                return  # "Range Not Satisfiable": nothing lies past `have`, so the part is whole
            raise _UrlFailed(f"HTTP {e.code}") from None
        except urllib.error.URLError as e:  # before any data: DNS, refused, missing file://
            raise _UrlFailed(_describe(e.reason)) from None
        except (OSError, http.client.HTTPException) as e:  # mid-transfer: reset, timeout
            reason = f"the transfer was cut off: {_describe(e)}"
        now = part.stat().st_size if part.exists() else 0
        if now <= have:
            break  # no progress: resuming from here would only repeat this
        _say(console, f"  {url}: {reason} at {now:,} bytes; resuming", "dim")
    raise _UrlFailed(reason)


def _fetch_once(
    url: str, part: Path, have: int, resource: Resource, progress, console: Console, label: str, opener=None
) -> bool:
    """One request; append to or rewrite ``part``. True when all the bytes announced arrived."""
    from rich.markup import escape

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with _open(request, opener) as response:
        status = getattr(response, "status", None)  # None for file:// URLs
        content_type = (response.headers.get("Content-Type") or "").lower()
        if content_type.startswith(("text/html", "application/xhtml")) and not resource.filename.endswith(
            (".html", ".htm")
        ):
            # A login, consent or "too large to scan" page instead of the file: this URL will not
            # give the file, and its bytes must not be appended to a partial download.
            raise _UrlFailed("the server sent a web page, not the file")
        total = _int_or_none(response.headers.get("Content-Length"))
        if have and status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                raise _UrlFailed(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            # A 200 (or a file:// URL) carries the whole file whatever the Range said.
            if have:
                _say(console, f"  {url}: resuming is not supported there; starting again from zero", "dim")
            have, mode = 0, "wb"
        total = total or resource.size
        _say(console, f"{label}: fetching from {url}" + (f" (resuming at {have:,} bytes)" if have else ""))
        task = progress.add_task(escape(label), total=total, completed=have)
        try:
            # read1, not read: read(n) waits for all n bytes, so a timeout would lose what
            # had arrived. Both return b"" when the connection closes, even if bytes are
            # missing, hence the length check below.
            read = getattr(response, "read1", response.read)
            with _local(part, "write"):  # a full disk is not the server's fault
                f = open(part, mode)
            with f:
                while block := read(CHUNK):
                    with _local(part, "write"):
                        f.write(block)
                    progress.advance(task, len(block))
        finally:
            progress.remove_task(task)
    return total is None or part.stat().st_size >= total


def _local(path: Path, action: str):
    """An OSError on our own files as a DownloadError, which no URL fallback catches."""
    return os_errors(action, path, "check that the data root is writable and has space, or pass another --data-root",
                     DownloadError)


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """``"bytes 100-999/1000"`` -> ``(100, 1000)``; the total may be ``*`` (unknown)."""
    m = re.fullmatch(r"\s*bytes\s+(\d+)-\d+/(\d+|\*)\s*", value or "")
    if not m:
        raise _UrlFailed(f"a partial response with an unreadable Content-Range {value!r}")
    return int(m.group(1)), (None if m.group(2) == "*" else int(m.group(2)))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(e: object) -> str:
    """A short reason: "No such file or directory", not the errno and path around it."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]


# --------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------


class _KeepArchive(DownloadError):
    """Extraction could not start (no unpacker): the verified archive stays for the next run."""


def _extract_and_mark(
    archive: Path, folder: Path, resource: Resource, console: Console, label: str, digests: dict[str, str]
) -> None:
    """Extract a verified archive, record it in its marker, then delete the archive.

    The archive goes once extracted (GTA5's would double the 58 GB it takes); the marker
    keeps its checksums and file list with sizes, so a re-run skips it while those files
    exist. If extraction stops half-way, there is no marker and the archive is still there,
    so a re-run extracts again.
    """
    _say(console, f"{label}: extracting {archive.name}")
    try:
        files = safe_extract(archive, folder, into=resource.into)
    except _KeepArchive:
        raise
    except DownloadError as e:
        archive.unlink(missing_ok=True)  # an unsafe or unreadable archive is of no use here
        raise DownloadError(f"{e}; the archive was deleted") from None
    marker = _marker_path(archive)
    tmp = marker.with_name(marker.name + ".tmp")
    sizes = {}
    for name in files:
        with _local(folder / name, "read"):
            sizes[name] = (folder / name).stat().st_size
    with _local(marker, "write"):
        tmp.write_text(json.dumps({**digests, "files": sizes}))
        os.replace(tmp, marker)
    archive.unlink()
    _say(console, f"{label}: {archive.name} extracted ({len(files):,} files)")


def _marker_files(record: dict, resource: Resource) -> dict[str, int | None]:
    """The files a marker lists that ``resource`` owns, with their sizes (None: not recorded)."""
    files = record.get("files", [])
    listed = files.items() if isinstance(files, dict) else ((name, None) for name in files)
    owned = tuple(p.rstrip("/") + "/" for p in resource.owns)
    return {name: size for name, size in listed if not owned or name.startswith(owned)}


def _read_marker(marker: Path) -> dict | None:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _marker_ok(marker: Path, resource: Resource, folder: Path) -> bool:
    record = _read_marker(marker)
    if record is None:
        return False
    expected = _static_checksum(resource, folder)
    if expected is not None and record.get(expected[0]) != expected[1]:
        return False
    for name, size in _marker_files(record, resource).items():
        path = folder / name
        try:
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                return False
        except OSError:
            return False
    return True


def safe_extract(archive: Path, dest: Path, into: str = "") -> list[str]:
    """Extract a tar, zip or rar archive into ``dest``; return the regular files it wrote.

    Every member is checked before anything is written: an absolute path, a ``..``
    component, a path that resolves outside ``dest`` (through a link already on disk, say),
    a symlink, a hard link or a device/fifo refuses the whole archive with a
    :class:`DownloadError` naming the member. Backslashes in member names (archives made on
    Windows) are folder separators. ``into``: members not already under that folder go into it.
    """
    name = archive.name.lower()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if name.endswith(".zip"):
            return _extract_zip(archive, root, into)
        if name.endswith(TAR_SUFFIXES):
            return _extract_tar(archive, root, into)
        if name.endswith(".rar"):
            return _extract_rar(archive, root, into)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DownloadError(f"{archive.name} is not a readable archive ({_describe(e)}); fetch it again") from None
    except OSError as e:
        raise DownloadError(f"could not extract {archive.name} into {dest}: {_describe(e)}") from None
    kinds = ", ".join(ARCHIVE_SUFFIXES)
    raise DownloadError(f"{archive.name}: unknown archive type; expected one of {kinds}")


def _refuse(archive: Path, member: str, why: str) -> DownloadError:
    return DownloadError(
        f"refusing to extract {archive.name}: member {member!r} {why}; nothing was extracted"
    )


def _clean_name(member: str) -> str:
    return member.replace("\\", "/")


def _prefixer(names: list[str], into: str) -> Callable[[str], str]:
    """``into`` given: a function putting names under it, unless all already are."""
    into = into.strip("/")
    if not into:
        return lambda n: n
    clean = [_clean_name(n).removeprefix("./") for n in names]
    if all(n == into or n.startswith(into + "/") for n in clean if n and n != "."):
        return lambda n: n
    return lambda n: f"{into}/{n}"


def _member_path(archive: Path, root: Path, member: str, display: str | None = None) -> Path:
    """Where ``member`` would land under ``root``, or a DownloadError if that is unsafe."""
    shown = member if display is None else display
    clean = _clean_name(member)
    parts = clean.split("/")
    if clean.startswith("/") or re.match(r"^[A-Za-z]:", clean):
        raise _refuse(archive, shown, "has an absolute path")
    if ".." in parts:
        raise _refuse(archive, shown, "has a '..' component")
    path = (root / clean).resolve()  # follows links already on disk
    if path != root and root not in path.parents:
        raise _refuse(archive, shown, "would land outside the target folder")
    return path


def _write_member(src, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(archive: Path, root: Path, into: str = "") -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        # The absolute-path and '..' checks look at the name as stored; `into` only prefixes.
        put = _prefixer([m.name for m in members], into)
        plan: list[tuple[tarfile.TarInfo, Path]] = []
        for m in members:
            if m.issym() or m.islnk():
                raise _refuse(archive, m.name, "is a link")
            if not (m.isfile() or m.isdir()):
                raise _refuse(archive, m.name, "is a device, fifo or other special file")
            _member_path(archive, root, m.name)
            plan.append((m, _member_path(archive, root, put(_clean_name(m.name)), m.name)))
        # We write the bytes ourselves rather than call extractall: no owners, modes or
        # times are taken from the archive, only regular files and folders.
        files = []
        for m, path in plan:
            if m.isdir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            src = tar.extractfile(m)
            assert src is not None  # regular files always have a payload
            with src:
                _write_member(src, path)
            files.append(path.relative_to(root).as_posix())
        return files


def _extract_zip(archive: Path, root: Path, into: str = "") -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        put = _prefixer([i.filename for i in infos], into)
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in infos:
            mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, "is a link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(archive, info.filename, "is a device, fifo or other special file")
            _member_path(archive, root, info.filename)
            plan.append((info, _member_path(archive, root, put(_clean_name(info.filename)), info.filename)))
        files = []
        for info, path in plan:
            if info.is_dir() or info.filename.endswith("\\"):
                path.mkdir(parents=True, exist_ok=True)
                continue
            # zipfile checks each member's CRC-32 as it reads: a damaged member raises
            # BadZipFile, so an archive with no published checksum is still checked here.
            with zf.open(info) as src:
                _write_member(src, path)
            files.append(path.relative_to(root).as_posix())
        return files


def _rar_tool() -> tuple[str, tuple[str, ...], tuple[str, ...]] | None:
    for program, list_args, extract_args in RAR_TOOLS:
        path = program if os.path.isabs(program) and os.access(program, os.X_OK) else shutil.which(program)
        if path:
            return path, list_args, extract_args
    return None


def _run_tool(cmd: list[str], archive: Path) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace", check=False)
    except OSError as e:
        raise _KeepArchive(f"could not run {cmd[0]} to unpack {archive.name}: {_describe(e)}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no message"])[-1]
        raise DownloadError(f"{Path(cmd[0]).name} could not unpack {archive.name}: {last}")
    return done.stdout


def _extract_rar(archive: Path, root: Path, into: str = "") -> list[str]:
    """RAR needs an external unpacker. Its listing is checked first, like a tar's; it then
    unpacks into a staging folder inside ``root``, which is walked (links refused, Windows
    backslash names turned into folders) before anything moves into place."""
    tool = _rar_tool()
    if tool is None:
        names = ", ".join(p for p, _, _ in RAR_TOOLS)
        raise _KeepArchive(
            f"{archive.name} is a RAR archive, which Python cannot unpack: install one of {names} "
            "(e.g. apt install libarchive-tools, which provides bsdtar) and run the command again; "
            "the verified archive was kept"
        )
    program, list_args, extract_args = tool
    fill = lambda args, dest="": [a.format(archive=str(archive), dest=dest) for a in args]  # noqa: E731
    listing = _run_tool([program, *fill(list_args)], archive)
    names = []
    for line in listing.splitlines():
        if Path(program).name.startswith("7z"):
            if not line.startswith("Path = "):
                continue
            line = line[len("Path = "):]
            if line == str(archive):
                continue
        if line.strip():
            names.append(line.rstrip("\r\n"))
    for n in names:
        _member_path(archive, root, n)
    stage = root / f".unpacking-{archive.name}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        _run_tool([program, *fill(extract_args, str(stage))], archive)
        found: list[tuple[Path, str]] = []
        for dirpath, dirnames, filenames in os.walk(stage):
            for n in [*dirnames, *filenames]:
                p = Path(dirpath) / n
                st = p.lstat()
                rel = p.relative_to(stage).as_posix()
                if stat.S_ISLNK(st.st_mode):
                    raise _refuse(archive, rel, "is a link")
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    raise _refuse(archive, rel, "is a device, fifo or other special file")
                if stat.S_ISREG(st.st_mode):
                    found.append((p, rel))
        put = _prefixer([rel for _, rel in found], into)
        plan = [(p, _member_path(archive, root, put(_clean_name(rel)), rel)) for p, rel in found]
        files = []
        for p, path in plan:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(p, path)
            files.append(path.relative_to(root).as_posix())
        return files
    finally:
        shutil.rmtree(stage, ignore_errors=True)


# --------------------------------------------------------------------------------------
# --list and --verify
# --------------------------------------------------------------------------------------


def dataset_status(dataset: str | Dataset, data_root: Path | str) -> str:
    """One phrase for ``--list``, from markers, names and sizes (no file is read):
    ``verified``, ``partial: 3 of 20 files``, ``downloaded, not extracted`` or ``absent``."""
    ds = _resolve(dataset)
    folder = Path(data_root) / ds.folder
    if not folder.is_dir():
        return "absent"
    required = [r for r in ds.resources if r.required]
    done = [r for r in required if _done(r, folder)]
    waiting = [r for r in required if r not in done and (folder / r.filename).exists()]
    cut = [r for r in required if r not in done and _part_path(folder / r.filename).exists()]
    if len(done) == len(required):
        return "present, verified"
    if not done and not waiting and not cut:
        return "absent"
    text = f"partial: {len(done)} of {len(required)} files"
    if waiting:
        text += f", {len(waiting)} downloaded but not verified or extracted"
    if cut:
        text += f", {len(cut)} cut off (resumable)"
    return text


def dataset_sizes(ds: Dataset) -> tuple[str, str]:
    """(download, on disk) in words, marked ``≈`` where the sizes are estimates."""
    exact = all(r.size for r in ds.resources if r.required)
    mark = "" if exact else "≈"
    fetch = sum(r.download_size for r in ds.resources if r.required)
    disk = sum(r.unpacked_size for r in ds.resources if r.required)
    return mark + human_size(fetch), mark + human_size(disk)


def print_catalogue(data_root: Path | str, names: Iterable[str] = (), console: Console | None = None) -> None:
    """What ``uda download --list`` prints: a short block per dataset (plain lines, so that
    a narrow terminal wraps them cleanly and grep finds them)."""
    from rich.console import Console

    console = console or Console()
    _say(console, f"datasets under {data_root} (≈: estimated size; status from the files' markers, "
                  "`uda download NAME --verify` re-reads them)")
    for name in (list(names) or list_datasets()):
        ds = get_dataset(name)
        fetch, disk = dataset_sizes(ds)
        _say(console, "")
        _say(console, f"{ds.name}  {dataset_status(ds, data_root)}", "bold")
        _say(console, f"  size       {fetch} to download, {disk} on disk")
        _say(console, f"  checksums  {checksum_kind(ds)}")
        if ds.login is not None:
            _say(console, f"  access     {ds.login.site} login: set {ds.login.user_env} and {ds.login.password_env}, "
                          f"or put the zips in {Path(data_root) / ds.folder}/")
        elif not any(r.urls for r in ds.resources):
            _say(console, "  access     --mirror only (no public URL)")
        _say(console, f"  licence    {ds.licence}")
        if ds.description:
            _say(console, f"  about      {ds.description}")


def verify_dataset(
    dataset: str | Dataset, data_root: Path | str, console: Console | None = None, include_optional: bool = True
) -> Path:
    """Audit the copy under ``data_root`` without downloading: every file against its checksum
    (published, or recorded at first download), every extracted file against the size its
    marker recorded, then the dataset's own audit. Raises :class:`DataError` (one line) listing
    the first problem and how many there are."""
    from rich.console import Console

    ds = _resolve(dataset)
    console = console or Console(stderr=True)
    folder = Path(data_root) / ds.folder
    repair = f"run: uda download {ds.name} --data-root {data_root}"
    if not folder.is_dir():
        raise DataError(f"{ds.name} is not in {data_root} (no folder {folder}); {repair}")
    problems: list[str] = []
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        target = folder / r.filename
        marker = _marker_path(target)
        expected = _static_checksum(r, folder)
        how = expected[2] if expected else "no checksum known"
        if r.extract and marker.exists():
            record = _read_marker(marker) or {}
            if expected is not None and record.get(expected[0]) != expected[1]:
                problems.append(f"{r.filename}: extracted from an archive whose {expected[0]} is not the {how}")
                continue
            missing, changed = [], []
            for name, size in _marker_files(record, r).items():
                path = folder / name
                if not path.is_file():
                    missing.append(name)
                elif size is not None and path.stat().st_size != size:
                    changed.append(name)
            if missing:
                problems.append(f"{r.filename}: {len(missing):,} extracted files missing (e.g. {_examples(missing)})")
            if changed:
                problems.append(f"{r.filename}: {len(changed):,} extracted files changed size "
                                f"(e.g. {_examples(changed)})")
            if not missing and not changed:
                _say(console, f"{ds.name}: {r.filename} extracted, its files in place ({how})")
        elif target.is_file():
            if expected is None:
                problems.append(f"{r.filename}: present but never checked (no checksum known); {repair}")
                continue
            if file_checksum(target, expected[0]) != expected[1]:
                problems.append(f"{r.filename}: does not match its {how}")
            elif r.extract:
                problems.append(f"{r.filename}: verified but not extracted")
            else:
                _say(console, f"{ds.name}: {r.filename} verified ({how})")
        elif _part_path(target).exists():
            problems.append(f"{r.filename}: download cut off at {_part_path(target).stat().st_size:,} bytes")
        elif not r.required:
            _say(console, f"{ds.name}: optional {r.filename} absent")
        else:
            problems.append(f"{r.filename}: missing")
    if ds.audit is not None:
        result = ds.audit(folder)
        _say(console, f"{ds.name}: audit: {result.summary()}", None if result.ok else "red")
        if not result.ok:
            problems.append(f"audit: {result.summary()}")
    if problems:
        for p in problems:
            _say(console, f"{ds.name}: {p}", "red")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{ds.name} in {folder} failed verification: {problems[0]}{more}; {repair}")
    _say(console, f"{ds.name}: verified in {folder}", "green")
    return folder


def needs_credentials(dataset: str | Dataset, data_root: Path | str, include_optional: bool = True) -> bool:
    """True when a download would have to log in: some file behind the login is neither in
    place nor put in the folder by hand."""
    ds = _resolve(dataset)
    if ds.login is None:
        return False
    folder = Path(data_root) / ds.folder
    for r in ds.resources:
        if not r.required and not include_optional:
            continue
        if not _done(r, folder) and not (folder / r.filename).exists():
            if any(u.startswith(ds.login.protects) for u in r.urls):
                return True
    return False
