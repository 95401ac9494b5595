"""Fetch dataset files: declared as data, resumed, verified, safely extracted.

A :class:`Dataset` lists :class:`Resource` s; a resource is one file with the URLs it may be
fetched from (tried in order) and its checksum. :func:`download` brings a dataset's folder
under the data root up to date:

- a file that is already there and verifies is skipped; an archive that was already
  extracted is skipped by its marker file (``.<archive>.extracted``, which records the
  archive's checksum and the files it held);
- otherwise the file is fetched to ``<file>.part``, resuming a partial ``.part`` with an HTTP
  ``Range`` request, and is renamed to its final name only after its checksum matches, so a
  file under its final name has always been verified;
- ``--mirror`` base URLs (or local folders) are tried before the official URLs, as
  ``{mirror}/{dataset.mirror_dir}/{filename}``;
- archives are extracted only if every member stays inside the dataset folder (no absolute
  paths, no ``..``, no links or device files); otherwise nothing is extracted at all.

Only the standard library's urllib is used (``http``, ``https`` and ``file`` URLs).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from uda_cli.errors import ConfigError, DownloadError

if TYPE_CHECKING:
    from rich.console import Console

TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
CHUNK = 1 << 20
ATTEMPTS_PER_URL = 5  # resumes of a cut-off transfer before moving on to the next URL
USER_AGENT = "uda-download/0.1 (python-urllib)"

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


@dataclass(frozen=True)
class Resource:
    """One file of a dataset.

    ``sha256`` is preferred; ``md5`` is accepted where only an md5 has been published.
    ``size`` (bytes) is optional: it sizes the progress bar when the server sends no length
    and lets a complete ``.part`` be checked without asking the server again.
    """

    filename: str
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    extract: bool = False  # a tar/zip archive, extracted into the dataset folder once verified
    required: bool = True  # False: skipped by --no-optional

    def __post_init__(self) -> None:
        if not (self.sha256 or self.md5):
            raise ValueError(f"{self.filename}: declare a sha256 (or an md5 where only that is published)")
        if not self.filename or self.filename in (".", "..") or re.search(r"[/\\]", self.filename):
            raise ValueError(f"{self.filename!r}: a resource's filename is a plain file name")

    @property
    def checksum(self) -> tuple[str, str]:
        """``(algorithm, lowercase hex digest)``."""
        if self.sha256:
            return "sha256", self.sha256.lower()
        return "md5", str(self.md5).lower()


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


# --------------------------------------------------------------------------------------
# The catalogue
# --------------------------------------------------------------------------------------

def _at(bases: Iterable[str], filename: str) -> tuple[str, ...]:
    return tuple(base + filename for base in bases)


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


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def get_dataset(name: str) -> Dataset:
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


# --------------------------------------------------------------------------------------
# Checksums and URLs
# --------------------------------------------------------------------------------------

def file_checksum(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, resource: Resource) -> bool:
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
) -> Path:
    """Fetch, verify and extract ``dataset`` into ``<data_root>/<folder>``; return that folder.

    ``force`` fetches every file again even if it verifies. ``include_optional=False`` skips
    resources declared ``required=False``. Raises :class:`DownloadError` (one line) on failure.
    """
    from rich.console import Console

    ds = get_dataset(dataset) if isinstance(dataset, str) else dataset
    console = console or Console(stderr=True)
    mirrors = tuple(mirrors)
    folder = Path(data_root) / ds.folder
    with _local(folder, "create"):
        folder.mkdir(parents=True, exist_ok=True)
    for resource in ds.resources:
        if not resource.required and not include_optional:
            _say(console, f"{ds.name}: skipping optional {resource.filename}")
            continue
        _ensure_resource(ds, resource, folder, mirrors, force, console)
    _say(console, f"{ds.name}: ready in {folder}", "green")
    return folder


def _ensure_resource(
    ds: Dataset, resource: Resource, folder: Path, mirrors: tuple[str, ...], force: bool, console: Console
) -> None:
    target = folder / resource.filename
    part = _part_path(target)
    marker = _marker_path(target)
    algorithm, _ = resource.checksum
    if force:
        part.unlink(missing_ok=True)  # a forced download starts from nothing
    else:
        if resource.extract and _marker_ok(marker, resource, folder):
            _say(console, f"{ds.name}: {resource.filename} already extracted and verified, skipping")
            return
        if target.exists():
            if verify(target, resource):
                _say(console, f"{ds.name}: {resource.filename} already verified ({algorithm}), skipping")
                if resource.extract:
                    _extract_and_mark(target, folder, resource, console, ds.name)
                return
            # Deleted at once, so that no reader can use it if the fetch below fails.
            target.unlink()
            _say(console, f"{ds.name}: {resource.filename} did not match its {algorithm} and was deleted; "
                          "fetching it again", "yellow")

    urls = candidate_urls(ds, resource, mirrors)
    if not urls:
        hint = ds.mirror_hint or "pass --mirror DIR_OR_URL holding " + f"{ds.mirror_dir}/{resource.filename}"
        raise DownloadError(f"{ds.name}: no download URL is known for {resource.filename}; {hint}")
    _fetch_to(target, resource, urls, console, ds.name)
    if resource.extract:
        _extract_and_mark(target, folder, resource, console, ds.name)


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One plain line: file names and URLs are not rich markup, and logs get no hard wraps."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _marker_path(archive: Path) -> Path:
    return archive.with_name(f".{archive.name}.extracted")


# --------------------------------------------------------------------------------------
# Fetching one file
# --------------------------------------------------------------------------------------


class _UrlFailed(Exception):
    """This URL cannot give us the file now; the next one is tried."""


def _open(request: urllib.request.Request):
    """The one place that touches the network (tests wrap it to keep to 127.0.0.1)."""
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def _fetch_to(target: Path, resource: Resource, urls: list[str], console: Console, label: str) -> None:
    """Fetch ``target`` from the first URL that works; rename it into place once verified."""
    from rich.progress import (
        BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn,
    )

    part = _part_path(target)
    algorithm, expected = resource.checksum
    failures: list[str] = []
    # The bar is drawn only on a terminal and vanishes when done; the plain lines printed
    # alongside it are what a log or a pipe sees.
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, transient=True, disable=not console.is_terminal,
    )
    with progress:
        for i, url in enumerate(urls):
            try:
                _fetch_url(url, part, resource, progress, console, f"{label}: {target.name}")
            except _UrlFailed as e:
                failures.append(f"{url} ({e})")
                if i + 1 < len(urls):
                    _say(console, f"  {url}: {e}; trying the next URL", "dim")
                continue
            actual = file_checksum(part, algorithm)
            if actual != expected:
                part.unlink()
                raise DownloadError(
                    f"{target.name} from {url}: {algorithm} checksum did not match (got {actual[:16]}…, "
                    f"expected {expected[:16]}…); the bad file was deleted; run the command again "
                    "or pass another --mirror"
                )
            os.replace(part, target)  # atomic: the final name only ever holds a verified file
            _say(console, f"{label}: {target.name} verified ({algorithm})")
            return
    kept = ""
    if part.exists() and part.stat().st_size:
        kept = f"; the partial file {part} was kept: run the command again to resume"
    raise DownloadError(f"could not download {target.name}: tried {', '.join(failures)}{kept}")


def _fetch_url(url: str, part: Path, resource: Resource, progress, console: Console, label: str) -> None:
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
            if _fetch_once(url, part, have, resource.size, progress, console, label):
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
    url: str, part: Path, have: int, size: int | None, progress, console: Console, label: str
) -> bool:
    """One request; append to or rewrite ``part``. True when all the bytes announced arrived."""
    from rich.markup import escape

    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    with _open(request) as response:
        status = getattr(response, "status", None)  # None for file:// URLs
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
        total = total or size
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


@contextmanager
def _local(path: Path, action: str):
    """Turn an OSError on our own files into a DownloadError, which no URL fallback catches."""
    try:
        yield
    except OSError as e:
        raise DownloadError(
            f"could not {action} {path}: {e.strerror or e}; check that the data root is writable "
            "and has space, or pass another --data-root"
        ) from None


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


def _extract_and_mark(archive: Path, folder: Path, resource: Resource, console: Console, label: str) -> None:
    """Extract a verified archive, record it in its marker, then delete the archive.

    The archive goes once extracted (MNIST-M's would add 134 MB next to the images); the
    marker keeps its checksum and file list, so a re-run skips it while those files exist.
    If extraction stops half-way, there is no marker and the archive is still there, so a
    re-run extracts again.
    """
    _say(console, f"{label}: extracting {archive.name}")
    try:
        files = safe_extract(archive, folder)
    except DownloadError as e:
        archive.unlink(missing_ok=True)  # an unsafe or unreadable archive is of no use here
        raise DownloadError(f"{e}; the archive was deleted") from None
    algorithm, expected = resource.checksum
    marker = _marker_path(archive)
    tmp = marker.with_name(marker.name + ".tmp")
    with _local(marker, "write"):
        tmp.write_text(json.dumps({algorithm: expected, "files": files}))
        os.replace(tmp, marker)
    archive.unlink()
    _say(console, f"{label}: {archive.name} extracted ({len(files):,} files)")


def _marker_ok(marker: Path, resource: Resource, folder: Path) -> bool:
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    algorithm, expected = resource.checksum
    if not isinstance(record, dict) or record.get(algorithm) != expected:
        return False
    return all((folder / name).is_file() for name in record.get("files", []))


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a tar or zip archive into ``dest``; return the regular files it wrote.

    Every member is checked before anything is written: an absolute path, a ``..``
    component, a path that resolves outside ``dest`` (through a link already on disk, say),
    a symlink, a hard link or a device/fifo refuses the whole archive with a
    :class:`DownloadError` naming the member.
    """
    name = archive.name.lower()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        if name.endswith(".zip"):
            return _extract_zip(archive, root)
        if name.endswith(TAR_SUFFIXES):
            return _extract_tar(archive, root)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise DownloadError(f"{archive.name} is not a readable archive ({_describe(e)}); fetch it again") from None
    except OSError as e:
        raise DownloadError(f"could not extract {archive.name} into {dest}: {_describe(e)}") from None
    kinds = ", ".join((*TAR_SUFFIXES, ".zip"))
    raise DownloadError(f"{archive.name}: unknown archive type; expected one of {kinds}")


def _refuse(archive: Path, member: str, why: str) -> DownloadError:
    return DownloadError(
        f"refusing to extract {archive.name}: member {member!r} {why}; nothing was extracted"
    )


def _member_path(archive: Path, root: Path, member: str) -> Path:
    """Where ``member`` would land under ``root``, or a DownloadError if that is unsafe."""
    parts = member.replace("\\", "/").split("/")
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member):
        raise _refuse(archive, member, "has an absolute path")
    if ".." in parts:
        raise _refuse(archive, member, "has a '..' component")
    path = (root / member).resolve()  # follows links already on disk
    if path != root and root not in path.parents:
        raise _refuse(archive, member, "would land outside the target folder")
    return path


def _write_member(src, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _extract_tar(archive: Path, root: Path) -> list[str]:
    with tarfile.open(archive, "r:*") as tar:
        plan: list[tuple[tarfile.TarInfo, Path]] = []
        for m in tar.getmembers():
            if m.issym() or m.islnk():
                raise _refuse(archive, m.name, "is a link")
            if not (m.isfile() or m.isdir()):
                raise _refuse(archive, m.name, "is a device, fifo or other special file")
            plan.append((m, _member_path(archive, root, m.name)))
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


def _extract_zip(archive: Path, root: Path) -> list[str]:
    with zipfile.ZipFile(archive) as zf:
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in zf.infolist():
            mode = info.external_attr >> 16  # Unix mode, when the archiver recorded one
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, "is a link")
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(archive, info.filename, "is a device, fifo or other special file")
            plan.append((info, _member_path(archive, root, info.filename)))
        files = []
        for info, path in plan:
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as src:
                _write_member(src, path)
            files.append(path.relative_to(root).as_posix())
        return files
