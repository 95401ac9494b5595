"""Digit readers on fake files in each original format, the embedded subsets, and real data."""

from __future__ import annotations

import bz2
import gzip
import os
import re
import struct
import tarfile
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from PIL import Image

from uda_cli.data import digits
from uda_cli.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --- MNIST (IDX) ---------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x0000 08 <ndim>, big-endian uint32 dims, then uint8 data."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
        else:
            (folder / name).write_bytes(idx_bytes(array))


@pytest.fixture
def mnist_arrays():
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (5, 4, 3), dtype=np.uint8), np.array([3, 0, 9, 1, 7], dtype=np.uint8)


@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_reads_gzip_idx(tmp_path, mnist_arrays, split, prefix):
    images, labels = mnist_arrays
    write_mnist(tmp_path / "mnist", prefix, images, labels)
    x, y = digits.read_mnist(tmp_path / "mnist", split)
    assert x.shape == (5, 4, 3, 1) and x.dtype == np.uint8 and x.flags.writeable
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_mnist_reads_uncompressed_idx(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    write_mnist(tmp_path / "mnist", "train", images, labels, gz=False)
    x, y = digits.read_mnist(tmp_path / "mnist", "train")
    np.testing.assert_array_equal(x[..., 0], images)
    np.testing.assert_array_equal(y, labels)


def test_mnist_missing_file_says_how_to_download(tmp_path):
    with pytest.raises(DataError) as err:
        digits.read_mnist(tmp_path / "mnist", "train")
    message = str(err.value)
    assert "train-images-idx3-ubyte.gz not found in" in message
    assert f"run: uda download mnist --data-root {tmp_path}" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "content, why",
    [
        (bytes([0, 0, 0x08, 0x02]) + struct.pack(">2I", 2, 2) + bytes(4), "bad IDX magic"),  # 2-d, not 3-d
        # one data byte short of 5 x 4 x 3
        (bytes([0, 0, 0x08, 0x03]) + struct.pack(">3I", 5, 4, 3) + bytes(59), "the header says"),
        (bytes([0, 0, 0x08, 0x03]) + struct.pack(">I", 5), "truncated IDX header"),
    ],
)
def test_mnist_corrupt_idx_asks_for_redownload(tmp_path, mnist_arrays, content, why):
    write_mnist(tmp_path / "mnist", "train", *mnist_arrays)
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match=why) as err:
        digits.read_mnist(tmp_path / "mnist", "train")
    assert str(bad) in str(err.value) and "uda download mnist --force" in str(err.value)


def test_mnist_broken_gzip_and_label_count(tmp_path, mnist_arrays):
    images, labels = mnist_arrays
    write_mnist(tmp_path / "mnist", "train", images, labels[:4])
    with pytest.raises(DataError, match="4 labels for 5 images"):
        digits.read_mnist(tmp_path / "mnist", "train")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])  # cut the deflate stream and trailer
    with pytest.raises(DataError, match="uda download mnist --force"):
        digits.read_mnist(tmp_path / "mnist", "train")


# --- USPS (usps.h5 and LIBSVM) ------------------------------------------------------------


def test_usps_reads_h5(tmp_path):
    rng = np.random.default_rng(2)
    targets = {"train": np.array([0, 9, 4], dtype=np.int32), "test": np.array([7, 2], dtype=np.int32)}
    pixels = {split: rng.integers(0, 256, (len(t), 16, 16), dtype=np.uint8) for split, t in targets.items()}
    (tmp_path / "usps").mkdir()
    with h5py.File(tmp_path / "usps" / "usps.h5", "w") as f:
        for split in ("train", "test"):
            f[f"{split}/data"] = (pixels[split].reshape(-1, 256) / 255).astype(np.float32)
            f[f"{split}/target"] = targets[split]
    for split in ("train", "test"):
        x, y = digits.read_usps(tmp_path / "usps", split)
        assert x.shape == (len(targets[split]), 16, 16, 1) and x.dtype == np.uint8
        assert y.dtype == np.int64
        np.testing.assert_array_equal(x[..., 0], pixels[split])
        np.testing.assert_array_equal(y, targets[split])


def test_usps_reads_libsvm_when_no_h5(tmp_path):
    # labels 1..10 mean digits 0..9; v in [-1, 1] -> round((v + 1) / 2 * 255); missing index = -1
    lines = [
        "10 1:-1 2:1 3:0.2 256:0\n",  # digit 9; pixels 0, 255, 153, ..., 128 (127.5 rounds to even)
        "1 5:1\n",  # digit 0; only pixel 4 set
        "\n",
    ]
    (tmp_path / "usps").mkdir()
    (tmp_path / "usps" / "usps.t.bz2").write_bytes(bz2.compress("".join(lines).encode()))
    x, y = digits.read_usps(tmp_path / "usps", "test")
    assert x.shape == (2, 16, 16, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(y, [9, 0])
    expected = np.zeros((2, 256), dtype=np.uint8)
    expected[0, [1, 2, 255]] = [255, 153, 128]
    expected[1, 4] = 255
    np.testing.assert_array_equal(x.reshape(2, 256), expected)

    with pytest.raises(DataError, match=r"usps.h5 \(or usps.bz2\) not found.*uda download usps --data-root"):
        digits.read_usps(tmp_path / "usps", "train")

    (tmp_path / "usps" / "usps.t.bz2").write_bytes(bz2.compress(b"3 1:0.5 257:1\n"))
    with pytest.raises(DataError, match="line 1: feature index outside 1..256"):
        digits.read_usps(tmp_path / "usps", "test")


def test_usps_corrupt_h5(tmp_path):
    (tmp_path / "usps").mkdir()
    (tmp_path / "usps" / "usps.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="usps.h5 is not valid.*uda download usps --force"):
        digits.read_usps(tmp_path / "usps", "train")


# --- SVHN (.mat) ---------------------------------------------------------------------------


def test_svhn_reads_mat(tmp_path):
    rng = np.random.default_rng(3)
    x_mat = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)
    y_mat = np.array([[10], [1], [5], [10]], dtype=np.float64)  # 10 is the digit 0
    (tmp_path / "svhn").mkdir()
    scipy.io.savemat(tmp_path / "svhn" / "test_32x32.mat", {"X": x_mat, "y": y_mat})
    x, y = digits.read_svhn(tmp_path / "svhn", "test")
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8 and x.flags.c_contiguous
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 1, 5, 0])
    for i in range(4):
        np.testing.assert_array_equal(x[i], x_mat[:, :, :, i])


def test_svhn_missing_and_corrupt(tmp_path):
    missing = re.escape(f"train_32x32.mat not found in {tmp_path / 'svhn'}; run: uda download svhn")
    with pytest.raises(DataError, match=missing):
        digits.read_svhn(tmp_path / "svhn", "train")
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + bytes(50))
    with pytest.raises(DataError, match="train_32x32.mat is not valid.*uda download svhn --force") as err:
        digits.read_svhn(tmp_path / "svhn", "train")
    assert "\n" not in str(err.value)


# --- MNIST-M (PNG folders + labels file, cached) -----------------------------------------


def write_mnistm(folder: Path, split: str, images: np.ndarray, labels: list[int], absent: set[int]) -> None:
    image_dir = folder / "mnist_m" / f"mnist_m_{split}"
    image_dir.mkdir(parents=True)
    lines = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = f"{i:08d}.png"
        lines.append(f"{name} {label}\n")
        if i not in absent:
            Image.fromarray(image).save(image_dir / name)
    (folder / "mnist_m" / f"mnist_m_{split}_labels.txt").write_text("".join(lines))


def test_mnistm_skips_absent_files_and_caches(tmp_path):
    folder = tmp_path / "mnistm"
    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    write_mnistm(folder, "train", images, [5, 0, 4, 1], absent={2})

    with pytest.warns(UserWarning, match="skipped 1 of 4 images"):
        x, y = digits.read_mnistm(folder, "train")
    assert x.shape == (3, 32, 32, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(x, images[[0, 1, 3]])
    np.testing.assert_array_equal(y, [5, 0, 1])
    caches = list((folder / ".uda-cache").glob("*.npz"))
    assert len(caches) == 1 and "train" in caches[0].name

    # Break a PNG without changing the fingerprint: a second read must come from the cache.
    (folder / "mnist_m" / "mnist_m_train" / "00000000.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="skipped 1 of 4"):  # still said on a cached read
        x2, y2 = digits.read_mnistm(folder, "train")
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)

    # A new labels file mtime makes the cache stale: it decodes again and finds the broken PNG.
    labels_path = folder / "mnist_m" / "mnist_m_train_labels.txt"
    os.utime(labels_path, ns=(labels_path.stat().st_atime_ns, labels_path.stat().st_mtime_ns + 10**9))
    with pytest.raises(DataError, match="00000000.png is not valid.*uda download mnistm --force"):
        digits.read_mnistm(folder, "train")


def test_mnistm_rebuilds_an_unreadable_cache(tmp_path):
    folder = tmp_path / "mnistm"
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    write_mnistm(folder, "test", images, [3, 8], absent=set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is absent: no warning
        digits.read_mnistm(folder, "test")
    (cache,) = (folder / ".uda-cache").glob("*.npz")
    cache.write_bytes(b"PK\x03\x04 not a zip")
    x, y = digits.read_mnistm(folder, "test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, [3, 8])
    with np.load(cache, allow_pickle=False) as z:  # rewritten
        np.testing.assert_array_equal(z["images"], images)


def test_mnistm_missing_says_how_to_download(tmp_path):
    with pytest.raises(DataError) as err:
        digits.read_mnistm(tmp_path / "mnistm", "train")
    assert "mnist_m/mnist_m_train_labels.txt not found" in str(err.value)
    assert f"uda download mnistm --data-root {tmp_path}" in str(err.value)


# --- splits and embedded subsets ----------------------------------------------------------


READERS = [digits.read_mnist, digits.read_usps, digits.read_svhn, digits.read_mnistm]


@pytest.mark.parametrize("reader", READERS)
def test_unknown_split(tmp_path, reader):
    with pytest.raises(DataError, match="unknown split 'val'"):
        reader(tmp_path, "val")


@pytest.mark.parametrize(
    "name, size, counts",
    [("mnist2000", 28, {"train": 2000, "test": 2000}), ("usps1800", 16, {"train": 1800, "test": 2007})],
)
def test_embedded_subsets(name, size, counts):
    for split, n in counts.items():
        x, y = digits.read_embedded(name, split)
        assert x.shape == (n, size, size, 1) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert set(np.unique(y)) == set(range(10))
        assert x.max() == 255 and x.min() == 0


def test_embedded_files_fit_the_budget():
    folder = Path(digits.__file__).parent / "embedded"
    assert sum((folder / f"{n}.npz").stat().st_size for n in ("mnist2000", "usps1800")) < 2 * 1024 * 1024


# --- real data (shared/data beside the repository) ----------------------------------------


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"no real data at {SHARED_DATA}")
def test_real_data(tmp_path):
    """Counts from shared/data/README.md. MNIST-M: only the 20 MB part-1 archive (~5 s)."""
    x, y = digits.read_mnist(SHARED_DATA / "mnist", "test")
    assert x.shape == (10000, 28, 28, 1)
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

    x, y = digits.read_usps(SHARED_DATA / "usps", "test")
    assert x.shape == (2007, 16, 16, 1)
    assert np.bincount(y).tolist() == [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]

    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "train_32x32.mat").symlink_to(SHARED_DATA / "svhn" / "train_32x32_first1083.mat")
    x, y = digits.read_svhn(tmp_path / "svhn", "train")
    assert x.shape == (1083, 32, 32, 3)
    # README lists counts for labels 1..10; digit 0 is label 10
    assert np.bincount(y).tolist() == [66, 227, 141, 134, 110, 112, 78, 70, 78, 67]
    assert y[:10].tolist() == [1, 9, 2, 3, 2, 5, 9, 3, 3, 1]

    with tarfile.open(SHARED_DATA / "mnist_m" / "mnist_m_train_part1_00000000-00009999.tar.gz") as tar:
        tar.extractall(tmp_path / "mnistm", filter="data")
    with pytest.warns(UserWarning, match="skipped 49001 of 59001"):  # the labels file lists all
        x, y = digits.read_mnistm(tmp_path / "mnistm", "train")
    assert x.shape == (10000, 32, 32, 3)
    _, mnist_train_labels = digits.read_mnist(SHARED_DATA / "mnist", "train")
    np.testing.assert_array_equal(y, mnist_train_labels[:10000])  # MNIST-M keeps MNIST's order
