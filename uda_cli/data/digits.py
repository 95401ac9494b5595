"""Readers for the digit domains in their original file formats, and the embedded subsets.

Every reader takes ``(folder, split)``, where ``folder`` is ``<data root>/<dataset>``, and
returns ``images`` uint8 ``[N, H, W, C]`` at the native size (C is 1 or 3) and ``labels``
int64 ``[N]`` in 0..9. A missing file or a file that does not parse raises
:class:`~uda_cli.errors.DataError` with one line saying which file and the ``uda download``
command that fixes it. Nothing here unpickles anything.

The files ``uda download`` fetches for each (URLs, checksums, sizes, licence) are declared
here too, as ``MNIST_DOWNLOAD`` ... ``MNISTM_DOWNLOAD``; ``uda_cli.data.download.catalogue``
collects them.
"""

from __future__ import annotations

import bz2
import gzip
import io
import math
import os
import shlex
import tempfile
import warnings
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from uda_cli.data.download.types import Dataset, Resource
from uda_cli.errors import DataError

SPLITS = ("train", "test")
_TITLES = {"mnist": "MNIST", "usps": "USPS", "svhn": "SVHN", "mnistm": "MNIST-M"}


# --- downloads: the files `uda download` fetches (download/catalogue.py collects them) ------

# torchvision's MNIST mirrors (S3 first: yann.lecun.com has been unreliable), then the
# TensorFlow datasets mirror. All serve the same original files; the sha256 decides anyway.
_MNIST_BASES = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_USPS_BASE = "https://www.csie.ntu.edu.tw/~cjlin/libsvmtools/datasets/multiclass/"
_SVHN_BASE = "http://ufldl.stanford.edu/housenumbers/"


def _at(bases: tuple[str, ...], filename: str) -> tuple[str, ...]:
    return tuple(base + filename for base in bases)


MNIST_DOWNLOAD = Dataset(
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
)

USPS_DOWNLOAD = Dataset(
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
)

SVHN_DOWNLOAD = Dataset(
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
)

# MNIST-M (Ganin & Lempitsky) has no official checksummed release: the authors' original
# was a pickle behind a share link. These three archives are the repackaging of the
# original PNGs described in shared/data/README.md (deterministic tarballs, checksums
# below); they extract to mnist_m/mnist_m_{train,test}/ and mnist_m_{train,test}_labels.txt.
# No public URL is known for them, so they are fetched only from a --mirror.
MNISTM_DOWNLOAD = Dataset(
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
)


# --- errors --------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; the digit datasets have: {', '.join(SPLITS)}")


def _download(dataset: str, folder: Path, force: bool = False) -> str:
    """The command that (re)fetches ``dataset`` into the data root holding ``folder``."""
    force_flag = " --force" if force else ""
    return f"uda download {dataset}{force_flag} --data-root {shlex.quote(str(folder.parent))}"


def _missing(dataset: str, name: str, folder: Path) -> DataError:
    return DataError(
        f"{_TITLES[dataset]} file {name} not found in {folder}; run: {_download(dataset, folder)}"
    )


def _corrupt(dataset: str, path: Path, folder: Path, why: object) -> DataError:
    reason = " ".join(str(why).split())  # exception texts can span lines; ours is one line
    return DataError(
        f"{_TITLES[dataset]} file {path} is not valid ({reason}); "
        f"re-download it: {_download(dataset, folder, force=True)}"
    )


def _check_labels(labels: np.ndarray, dataset: str, path: Path, folder: Path) -> np.ndarray:
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise _corrupt(dataset, path, folder, f"labels outside 0..9: {labels.min()}..{labels.max()}")
    return labels.astype(np.int64, copy=False)


# --- MNIST: IDX files ----------------------------------------------------------------------

_IDX_UINT8 = 0x08  # IDX type code of unsigned bytes, the only type MNIST uses


def _read_idx(path: Path, ndim: int, folder: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when its name ends in .gz) of uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) != 4 or magic[:2] != b"\0\0" or magic[2] != _IDX_UINT8 or magic[3] != ndim:
                raise _corrupt("mnist", path, folder, f"bad IDX magic number {magic.hex() or 'none'}")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) != 4 * ndim:
                raise _corrupt("mnist", path, folder, "truncated IDX header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            payload = f.read()
    except (OSError, EOFError, zlib.error) as e:  # bad gzip stream, truncated file, I/O error
        raise _corrupt("mnist", path, folder, e) from e
    if len(payload) != math.prod(dims):
        raise _corrupt("mnist", path, folder, f"{len(payload)} data bytes, the header says {dims}")
    # copy: a writable array (torch.from_numpy warns on the read-only view of `payload`)
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims).copy()


def _mnist_file(folder: Path, name: str) -> Path:
    """``name`` (a .gz) in ``folder``, or the uncompressed file when only that one is there."""
    path = folder / name
    if path.is_file():
        return path
    plain = path.with_suffix("")
    if plain.is_file():
        return plain
    raise _missing("mnist", name, folder)


def read_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST from ``train-*-ubyte.gz`` / ``t10k-*-ubyte.gz``: [N, 28, 28, 1] uint8."""
    _check_split(split)
    prefix = "train" if split == "train" else "t10k"
    images_path = _mnist_file(folder, f"{prefix}-images-idx3-ubyte.gz")
    labels_path = _mnist_file(folder, f"{prefix}-labels-idx1-ubyte.gz")
    images = _read_idx(images_path, 3, folder)
    labels = _read_idx(labels_path, 1, folder)
    if len(labels) != len(images):
        raise _corrupt("mnist", labels_path, folder, f"{len(labels)} labels for {len(images)} images")
    return images[..., None], _check_labels(labels, "mnist", labels_path, folder)


# --- USPS: usps.h5, or the LIBSVM files ----------------------------------------------------

_USPS_SIDE = 16
_USPS_LIBSVM = {"train": "usps.bz2", "test": "usps.t.bz2"}


def _read_usps_h5(path: Path, split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            data = np.asarray(f[split]["data"], dtype=np.float64)
            target = np.asarray(f[split]["target"])
    except (OSError, KeyError) as e:
        raise _corrupt("usps", path, folder, e) from e
    if data.ndim != 2 or data.shape[1] != _USPS_SIDE**2 or target.shape != (len(data),):
        raise _corrupt("usps", path, folder, f"{split}/data has shape {data.shape}, target {target.shape}")
    # values are in [0, 1]; clip guards the uint8 cast against float noise outside the range
    images = np.rint(np.clip(data, 0.0, 1.0) * 255).astype(np.uint8)
    images = images.reshape(-1, _USPS_SIDE, _USPS_SIDE, 1)
    return images, _check_labels(target, "usps", path, folder)


def _read_usps_libsvm(path: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """LIBSVM text: ``label idx:value ...`` with labels 1..10 and values in [-1, 1]."""
    rows, labels = [], []
    try:
        with bz2.open(path, "rt", encoding="ascii") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    labels.append(int(fields[0]) - 1)
                    pairs = np.array(" ".join(fields[1:]).replace(":", " ").split(), dtype=np.float64)
                    index, value = pairs.reshape(-1, 2).T
                except ValueError as e:
                    raise _corrupt("usps", path, folder, f"line {line_no}: {e}") from e
                if index.size and (index.min() < 1 or index.max() > _USPS_SIDE**2):
                    raise _corrupt("usps", path, folder, f"line {line_no}: feature index outside 1..256")
                row = np.full(_USPS_SIDE**2, -1.0)  # an index left out is a zero feature, i.e. -1
                row[index.astype(np.int64) - 1] = value
                rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise _corrupt("usps", path, folder, e) from e
    if not rows:
        raise _corrupt("usps", path, folder, "no samples")
    data = np.clip(np.stack(rows), -1.0, 1.0)
    images = np.rint((data + 1) / 2 * 255).astype(np.uint8).reshape(-1, _USPS_SIDE, _USPS_SIDE, 1)
    return images, _check_labels(np.array(labels), "usps", path, folder)


def read_usps(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """USPS from ``usps.h5`` when present, else LIBSVM ``usps.bz2`` / ``usps.t.bz2``: [N, 16, 16, 1].

    The two releases scale pixels differently (see shared/data/README.md), so a folder
    holding both always uses ``usps.h5`` for both splits.
    """
    _check_split(split)
    h5 = folder / "usps.h5"
    if h5.is_file():
        return _read_usps_h5(h5, split, folder)
    libsvm = folder / _USPS_LIBSVM[split]
    if libsvm.is_file():
        return _read_usps_libsvm(libsvm, folder)
    raise _missing("usps", f"usps.h5 (or {libsvm.name})", folder)


# --- SVHN: train_32x32.mat / test_32x32.mat -----------------------------------------------


def read_svhn(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits from ``{split}_32x32.mat``: [N, 32, 32, 3], label 10 is digit 0."""
    import scipy.io

    _check_split(split)
    path = folder / f"{split}_32x32.mat"
    if not path.is_file():
        raise _missing("svhn", path.name, folder)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    # loadmat has no single error for a bad file: MatReadError, ValueError, IndexError (short
    # header), zlib.error, NotImplementedError (v7.3)... all of them mean "not a valid file"
    except Exception as e:
        raise _corrupt("svhn", path, folder, e) from e
    if "X" not in mat or "y" not in mat:
        raise _corrupt("svhn", path, folder, "no variables X and y")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8 or y.size != x.shape[3]:
        raise _corrupt("svhn", path, folder, f"X has shape {x.shape} ({x.dtype}), y {y.shape}")
    y = y.reshape(-1)
    if y.size and (y.min() < 1 or y.max() > 10):
        raise _corrupt("svhn", path, folder, f"labels outside 1..10: {y.min()}..{y.max()}")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # (H, W, C, N) -> (N, H, W, C)
    return images, y.astype(np.int64) % 10


# --- MNIST-M: folders of PNGs with a labels file, cached as .npz --------------------------

_CACHE_DIR = ".uda-cache"
_CACHE_VERSION = 1  # bump when the cached arrays change meaning


def read_mnistm(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M from ``mnist_m/mnist_m_{split}/*.png`` and ``mnist_m/mnist_m_{split}_labels.txt``.

    Images listed in the labels file but absent are skipped with one warning. Decoded arrays
    are cached in ``folder/.uda-cache/``, keyed by the labels file's size and mtime and the
    number of PNGs present, so a second load skips decoding ~60k PNGs.
    """
    _check_split(split)
    labels_path = folder / "mnist_m" / f"mnist_m_{split}_labels.txt"
    image_dir = folder / "mnist_m" / f"mnist_m_{split}"
    if not labels_path.is_file():
        raise _missing("mnistm", f"mnist_m/{labels_path.name}", folder)
    if not image_dir.is_dir():
        raise _missing("mnistm", f"mnist_m/{image_dir.name}/", folder)

    present = {entry.name for entry in os.scandir(image_dir) if entry.name.endswith(".png")}
    stat = labels_path.stat()
    key = f"mnistm-{split}-v{_CACHE_VERSION}-{stat.st_size}-{stat.st_mtime_ns}-{len(present)}"
    cache_path = folder / _CACHE_DIR / f"{key}.npz"

    cached = _load_cache(cache_path)
    if cached is not None:
        images, labels, skipped = cached
    else:
        names, all_labels = _read_mnistm_labels(labels_path, folder)
        keep = [i for i, name in enumerate(names) if name in present]
        if not keep:
            raise DataError(
                f"none of the MNIST-M images listed in {labels_path} is in {image_dir}; "
                f"run: {_download('mnistm', folder)}"
            )
        images = _decode_pngs([image_dir / names[i] for i in keep], folder)
        labels = all_labels[keep]
        skipped = len(names) - len(keep)
        _save_cache(cache_path, f"mnistm-{split}-", images=images, labels=labels, skipped=np.int64(skipped))
    if skipped:
        warnings.warn(
            f"MNIST-M {split}: skipped {skipped} of {skipped + len(labels)} images listed in "
            f"{labels_path} that are not in {image_dir}",
            stacklevel=2,
        )
    return images, labels


def _read_mnistm_labels(path: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    names, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                try:
                    name, label = fields
                    labels.append(int(label))
                except ValueError as e:
                    why = f"line {line_no} is not '<file name> <digit>'"
                    raise _corrupt("mnistm", path, folder, why) from e
                names.append(name)
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt("mnistm", path, folder, e) from e
    return names, _check_labels(np.array(labels, dtype=np.int64), "mnistm", path, folder)


def _decode_pngs(paths: list[Path], folder: Path) -> np.ndarray:
    """Decode RGB images of one size into one preallocated array.

    Serial on purpose: for a 32x32 PNG most of the time is Python overhead in Pillow, which
    holds the GIL; a thread pool gained ~10% on 2 cores (10k MNIST-M images: ~1.3 s serial)
    and the cache makes decoding a one-time cost anyway. Handing Pillow the bytes is ~25%
    faster than letting it read the file itself.
    """
    from PIL import Image

    out = None
    for i, path in enumerate(paths):
        try:
            with Image.open(io.BytesIO(path.read_bytes())) as im:
                image = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as e:  # Pillow reports some broken PNGs as SyntaxError
            raise _corrupt("mnistm", path, folder, e) from e
        if out is None:
            out = np.empty((len(paths), *image.shape), dtype=np.uint8)
        elif image.shape != out.shape[1:]:
            raise _corrupt("mnistm", path, folder, f"size {image.shape[:2]}, expected {out.shape[1:3]}")
        out[i] = image
    return out


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray, int] | None:
    try:
        # our own handle: np.load(path) leaks its file when the zip does not parse
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            images, labels, skipped = z["images"], z["labels"], int(z["skipped"])
    except Exception:  # absent, stale format or damaged: the cache is derived data, decode again
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64:
        return None
    return (images, labels, skipped) if labels.shape == images.shape[:1] else None


def _save_cache(path: Path, stale_prefix: str, **arrays: np.ndarray) -> None:
    """Write atomically (temp file + rename) and drop older caches of the same split.

    A cache that cannot be written (read-only data root, full disk) only costs speed.
    """
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".tmp-", suffix=".npz", delete=False) as f:
            tmp = Path(f.name)
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
        tmp = None
        for old in path.parent.glob(f"{stale_prefix}*.npz"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(
            f"could not write the decoded-image cache {path} ({e}); the next load decodes again",
            stacklevel=3,
        )
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


# --- embedded subsets (shipped in the package) ---------------------------------------------


def read_embedded(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``uda_cli/data/embedded/<name>.npz``: arrays ``{split}_x`` [N, H, W, C] and ``{split}_y``."""
    _check_split(split)
    resource = resources.files("uda_cli.data.embedded") / f"{name}.npz"
    try:
        with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return z[f"{split}_x"], z[f"{split}_y"].astype(np.int64, copy=False)
    except FileNotFoundError as e:
        raise DataError(f"embedded dataset {name}.npz is missing from the uda package; reinstall uda") from e
    except (OSError, KeyError, ValueError) as e:
        raise DataError(
            f"embedded dataset {name}.npz in the uda package is damaged ({e}); reinstall uda"
        ) from e
