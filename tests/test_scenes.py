"""Digit scenes (uda_cli/data/scenes.py): labels, painting, determinism, the embedded mini
domains, fake files for the data-root domains, and the real MNIST / MNIST-M when shared/data is there."""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from uda_cli.data import digits, scenes
from uda_cli.data.registry import get_domain, load_dense
from uda_cli.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # as conftest's shared_data fixture

DOMAINS = ("mnist-scenes", "mnistm-scenes", "mnist-scenes-mini", "mnistm-scenes-mini")


def quadrant(a: torch.Tensor | np.ndarray, t: int) -> np.ndarray:
    """Tile ``t`` (reading order) of a [..., 64, 64] scene."""
    r, c = divmod(t, 2)
    return np.asarray(a)[..., r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]


def scene_digest(source, indices) -> str:
    h = hashlib.sha256()
    for i in indices:
        x, y = source.read(i)
        h.update(x.numpy().tobytes())
        h.update(y.numpy().tobytes())
    return h.hexdigest()


# --- labels and painting -------------------------------------------------------------------


def test_labels_are_the_digit_on_strokes_background_on_zero_and_ignore_on_the_rim():
    strokes = np.array([[[0, 1, 64, 127, 128, 200, 255]], [[255, 127, 0, 128, 1, 0, 0]]], np.uint8)
    label = scenes.label_tiles(strokes, np.array([7, 0], np.uint8))
    assert label.dtype == np.uint8
    assert label.tolist() == [[[10, 255, 255, 255, 7, 7, 7]], [[0, 255, 10, 0, 255, 10, 10]]]


def test_every_intensity_maps_as_specified():
    m = np.arange(256, dtype=np.uint8)[None, None]
    label = scenes.label_tiles(m, np.array([3], np.uint8))[0, 0]
    assert label[0] == scenes.BACKGROUND
    assert (label[1:128] == 255).all()
    assert (label[128:] == 3).all()


def test_a_mini_source_scene_is_its_painted_tiles():
    """Each quadrant: the tile's MNIST digit padded by 2 px, labelled by intensity; pixels of
    intensity 0 are the background colour, 255 the stroke colour, between them a blend."""
    source = load_dense("mnist-scenes-mini", "train")
    mnist_x, mnist_y = digits.read_embedded("mnist2000", "train")
    for i in (0, 1, 3999):
        x, y = source.read(i)
        assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
        assert y.shape == (64, 64) and y.dtype == torch.uint8
        tiles, colours = source.draw(i)
        assert tiles.shape == (4,) and colours.shape == (2, 4, 3)
        for t, k in enumerate(tiles):
            m = np.pad(mnist_x[k, :, :, 0], 2)
            np.testing.assert_array_equal(quadrant(y, t), scenes.label_tiles(m[None], mnist_y[k:k + 1])[0])
            image = quadrant(x, t)  # [3, 32, 32]
            stroke, background = colours[0, t], colours[1, t]
            assert (image[:, m == 0].T == background).all()
            assert (image[:, m == 255].T == stroke).all()
            mid = (m > 0) & (m < 255)
            expected = np.rint((stroke[:, None] * m[mid] + background[:, None] * (255 - m[mid].astype(int))) / 255)
            assert np.abs(image[:, mid] - expected).max() <= 0.5  # exact up to the rounding of halves


def test_source_colours_are_random_rgb_drawn_per_tile():
    source = load_dense("mnist-scenes-mini", "train")
    colours = np.stack([source.draw(i)[1] for i in range(300)])  # [300, 2, 4, 3]
    assert colours.min() == 0 and colours.max() == 255
    flat = colours.reshape(-1, 3).astype(float)
    assert np.abs(np.corrcoef(flat.T) - np.eye(3)).max() < 0.1  # channels independent
    assert abs(np.corrcoef(colours[:, 0].ravel(), colours[:, 1].ravel())[0, 1]) < 0.1  # stroke vs background
    assert len({tuple(c) for c in colours[:, 1].reshape(-1, 3)}) > 1000  # every tile its own colour


def test_a_mini_target_scene_is_its_mnistm_tiles_labelled_by_mnist():
    source = load_dense("mnistm-scenes-mini", "test")
    with np.load(Path(scenes.__file__).parent / "embedded" / scenes.MINI_TILES_FILE) as z:
        x_tiles, masks, ys = z["test_x"], z["test_mask"], z["test_y"]
    for i in (0, 499):
        x, y = source.read(i)
        tiles, colours = source.draw(i)
        assert colours is None
        for t, k in enumerate(tiles):
            np.testing.assert_array_equal(quadrant(x, t), x_tiles[k].transpose(2, 0, 1))
            np.testing.assert_array_equal(quadrant(y, t), scenes.label_tiles(np.pad(masks[k], 2)[None], ys[k:k + 1])[0])


def test_one_scene_is_pinned():
    """The draws follow numpy's Generator streams: a numpy that changed them changes every scene."""
    tiles, colours = load_dense("mnist-scenes-mini", "train").draw(0)
    assert tiles.tolist() == [310, 850, 523, 1733]
    assert colours[:, 0].tolist() == [[193, 136, 255], [128, 10, 171]]  # tile 0's stroke and background


# --- determinism, stems, sizes, pickling ---------------------------------------------------


def test_same_index_same_scene_in_two_sources_and_two_processes():
    a = load_dense("mnist-scenes-mini", "train")
    b = load_dense("mnist-scenes-mini", "train")
    indices = [0, 5, 1234, 3999]
    digest = scene_digest(a, indices)
    assert scene_digest(b, indices) == digest
    assert scene_digest(a, indices[::-1]) != digest  # order matters to the digest, not to a scene
    code = ("import sys, hashlib; sys.path.insert(0, sys.argv[1]); from test_scenes import scene_digest; "
            "from uda_cli.data.registry import load_dense; "
            "print(scene_digest(load_dense('mnist-scenes-mini', 'train'), [0, 5, 1234, 3999]))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == digest


def test_scenes_differ_across_index_split_and_domain():
    train = load_dense("mnist-scenes-mini", "train")
    test = load_dense("mnist-scenes-mini", "test")
    target = load_dense("mnistm-scenes-mini", "train")
    assert train.draw(0)[0].tolist() != train.draw(1)[0].tolist()
    assert train.draw(0)[1].tolist() != test.draw(0)[1].tolist()
    assert train.seed != target.seed


def test_stems_sizes_and_parts():
    for name, counts in (("mnist-scenes-mini", (4000, 500)), ("mnistm-scenes-mini", (4000, 500))):
        train, test = load_dense(name, "train"), load_dense(name, "test")
        assert (len(train), len(test)) == counts
        assert train.stem(0) == "scene-000000" and train.stem(123) == "scene-000123"
        assert test.stems[-1] == "scene-000499"
        assert train.native_size(0) == (64, 64) and tuple(train.read(0)[0].shape[-2:]) == (64, 64)
        with pytest.raises(IndexError):
            test.read(500)
    part = load_dense("mnist-scenes-mini", "test[10:12]")
    assert part.stems == ["scene-000010", "scene-000011"]
    np.testing.assert_array_equal(part.read(1)[0], load_dense("mnist-scenes-mini", "test").read(11)[0])


def test_domain_specs():
    for name in DOMAINS:
        spec = get_domain(name)
        assert spec.task == "segmentation"
        assert spec.classes == (*(str(d) for d in range(10)), "background") and spec.num_classes == 11
        assert spec.image_size == (64, 64) and spec.channels == 3
        assert spec.splits == ("train", "test") and spec.train_split == "train" and spec.eval_split == "test"
    assert get_domain("mnist-scenes").dataset == "mnist"
    assert get_domain("mnistm-scenes").dataset == "mnistm"  # and its sibling mnist (the reader reaches it)
    assert get_domain("mnistm-scenes").notes["datasets"] == "mnistm, mnist"
    assert get_domain("mnist-scenes-mini").dataset is None and get_domain("mnistm-scenes-mini").dataset is None


def test_the_mini_domains_need_no_data_root(tmp_path):
    for name in ("mnist-scenes-mini", "mnistm-scenes-mini"):
        for split in ("train", "test"):
            x, y = load_dense(name, split, data_root=tmp_path / "nothing-here").read(0)
            labels = set(np.unique(y.numpy()).tolist())
            assert 10 in labels and 255 in labels and labels - {10, 255} <= set(range(10)) and len(labels) > 2


def test_sources_pickle_small_and_read_the_same_after():
    source = load_dense("mnistm-scenes-mini", "train")
    blob = pickle.dumps(source)
    assert len(blob) < 1_000_000 and len(blob) < 2_000  # a few hundred bytes: no arrays
    x, y = source.read(17)
    assert len(pickle.dumps(source)) == len(blob)  # the loaded tiles never travel
    x2, y2 = pickle.loads(blob).read(17)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_dataloader_workers_read_the_same_scenes():
    source = load_dense("mnist-scenes-mini", "test")

    class Wrap(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return source.read(i)

    loader = torch.utils.data.DataLoader(Wrap(), batch_size=4, num_workers=2)
    xs = torch.cat([x for x, _ in loader])
    np.testing.assert_array_equal(xs, torch.stack([source.read(i)[0] for i in range(8)]))


# --- disjointness --------------------------------------------------------------------------


def _image_hashes(images: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(a.tobytes()).digest() for a in images}


def test_mini_source_and_target_tiles_are_disjoint():
    """No MNIST digit under a target (MNIST-M) tile is one of the source's mnist2000 digits."""
    with np.load(Path(scenes.__file__).parent / "embedded" / scenes.MINI_TILES_FILE) as z:
        target = {split: (z[f"{split}_mask"], z[f"{split}_index"], z[f"{split}_y"]) for split in ("train", "test")}
    for split, n in (("train", 1000), ("test", 500)):
        masks, index, ys = target[split]
        assert masks.shape == (n, 28, 28) and len(np.unique(index)) == n
        source_x, _ = digits.read_embedded("mnist2000", split)
        assert not _image_hashes(source_x[..., 0]) & _image_hashes(masks)
    assert target["train"][1].min() >= scenes.TARGET_TRAIN[0] and target["train"][1].max() < scenes.TARGET_TRAIN[1]
    assert target["test"][1].max() < scenes.MNISTM_SIZES["test"]


def test_embedded_files_stay_under_six_megabytes():
    folder = Path(scenes.__file__).parent / "embedded"
    assert sum(p.stat().st_size for p in folder.glob("*.npz")) < 6_000_000


def test_full_source_and_target_draw_disjoint_halves_of_mnist_train():
    assert scenes.SOURCE_TRAIN == (0, 30_000) and scenes.TARGET_TRAIN == (30_000, 59_001)
    assert scenes._mnist_pool(Path("r/mnist"), "train") == scenes.MnistTiles(Path("r/mnist"), "train", 0, 30_000)
    target = scenes._mnistm_pool(Path("r/mnistm"), "train")
    assert (target.start, target.stop) == (30_000, 59_001)
    assert target.mnist == scenes.MnistTiles(Path("r/mnist"), "train", 30_000, 59_001)  # its labels: the sibling


# --- the data-root domains on fake files ---------------------------------------------------


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_mnist(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(images)))
    (folder / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))


def write_mnistm(folder: Path, split: str, images: np.ndarray, labels) -> None:
    image_dir = folder / "mnist_m" / f"mnist_m_{split}"
    image_dir.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(image_dir / f"{i:08d}.png")
    (folder / "mnist_m" / f"mnist_m_{split}_labels.txt").write_text(
        "".join(f"{i:08d}.png {d}\n" for i, d in enumerate(labels)))


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """A data root with 4 MNIST test digits and MNIST-M test images of the first 3."""
    monkeypatch.setitem(scenes.MNISTM_SIZES, "test", 3)
    rng = np.random.default_rng(0)
    strokes = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    strokes[:, :4] = 0
    labels = np.array([4, 1, 9, 7], np.uint8)
    write_mnist(tmp_path / "mnist", "t10k", strokes, labels)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    write_mnistm(tmp_path / "mnistm", "test", images, labels[:3])
    return tmp_path, strokes, labels, images


def test_mnistm_scenes_on_fake_files(fake_root):
    root, strokes, labels, images = fake_root
    source = load_dense("mnistm-scenes", "test", root)
    assert len(source) == 2000 and source.name == "mnistm-scenes:test"
    x, y = source.read(42)
    tiles, _ = source.draw(42)
    assert set(tiles.tolist()) <= {0, 1, 2}  # MNIST-M has 3: the 4th MNIST digit is never used
    for t, k in enumerate(tiles):
        np.testing.assert_array_equal(quadrant(x, t), images[k].transpose(2, 0, 1))
        expected = scenes.label_tiles(np.pad(strokes[k], 2)[None], labels[k:k + 1])[0]
        np.testing.assert_array_equal(quadrant(y, t), expected)

    source = load_dense("mnist-scenes", "test", root)  # the source reads all 4 MNIST test digits
    assert len(source) == 2000 and {int(k) for i in range(200) for k in source.draw(i)[0]} == {0, 1, 2, 3}


def test_mnistm_scenes_say_which_download_is_missing(fake_root):
    root = fake_root[0]
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz not found .*run: uda download mnist --data-") as e:
        load_dense("mnistm-scenes", "test", root)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"mnist_m_train_labels.txt not found .*run: uda download mnistm --data-root"):
        write_mnist(root / "mnist", "train", np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
        load_dense("mnistm-scenes", "train", root)


def test_mnistm_scenes_refuse_an_incomplete_or_misaligned_mnistm(fake_root, monkeypatch):
    root = fake_root[0]
    monkeypatch.setitem(scenes.MNISTM_SIZES, "test", 4)  # as if one MNIST-M image were missing
    source = load_dense("mnistm-scenes", "test", root)  # the files are there: the count is checked on reading
    with pytest.raises(DataError, match=r"holds 3 of its 4 images .*run: uda download mnistm"):
        source.read(0)
    monkeypatch.setitem(scenes.MNISTM_SIZES, "test", 3)
    labels_file = root / "mnistm" / "mnist_m" / "mnist_m_test_labels.txt"
    labels_file.write_text(labels_file.read_text().replace(" 4\n", " 5\n"))
    with pytest.raises(DataError, match="do not follow MNIST's order; re-download it: uda download mnistm --force"):
        load_dense("mnistm-scenes", "test", root).read(0)


# --- real data -----------------------------------------------------------------------------


def _tar_labels(archive: Path, split: str) -> np.ndarray:
    with tarfile.open(archive) as tar:
        text = tar.extractfile(f"mnist_m/mnist_m_{split}_labels.txt").read().decode()
    rows = [line.split() for line in text.splitlines() if line.strip()]
    assert [name for name, _ in rows] == [f"{i:08d}.png" for i in range(len(rows))]  # file order is index order
    return np.array([int(d) for _, d in rows])


def test_mnistm_labels_are_mnists_first_59001_and_9001(shared_data):
    """The shared MNIST-M lists its images 00000000.png... in order, and its labels are exactly
    MNIST's first 59,001 train and first 9,001 test labels."""
    part1 = shared_data / "mnist_m" / "mnist_m_train_part1_00000000-00009999.tar.gz"  # holds the whole labels file
    test = shared_data / "mnist_m" / "mnist_m_test.tar.gz"
    for split, archive, n in (("train", part1, 59_001), ("test", test, 9_001)):
        mnistm = _tar_labels(archive, split)
        _, mnist = digits.read_mnist(shared_data / "mnist", split)
        assert len(mnistm) == n == scenes.MNISTM_SIZES[split]
        np.testing.assert_array_equal(mnistm, mnist[:n])


def _corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    a -= a.mean(1, keepdims=True)
    b -= b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1) + 1e-9)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """A data root with the shared MNIST (linked) and the MNIST-M test archive extracted; the
    package's reader decodes it once here (and caches it), the tests then read the cache."""
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the repository")
    root = tmp_path_factory.mktemp("scenes-root")
    with tarfile.open(SHARED_DATA / "mnist_m" / "mnist_m_test.tar.gz") as tar:
        tar.extractall(root / "mnistm", filter="data")
    (root / "mnist").symlink_to(SHARED_DATA / "mnist")
    digits.read_mnistm(root / "mnistm", "test")
    return root


def test_mnistm_images_are_padded_mnist_images(real_root):
    """MNIST-M test image i against MNIST test image i padded by 2 px: the luminance follows the
    stroke mask (|r|, as MNIST-M's |photo - digit| blend makes strokes darker or lighter than
    their photo) far more than image i+1's, and best at a shift of 0 px, so the 2 px pad is exact."""
    images, _ = digits.read_mnistm(real_root / "mnistm", "test")
    assert images.shape == (9001, 32, 32, 3)
    mnist, _ = digits.read_mnist(real_root / "mnist", "test")
    padded = np.pad(mnist[:9001, :, :, 0], ((0, 0), (2, 2), (2, 2)))
    lum = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    matched = np.abs(_corr(lum, padded))
    mismatched = np.abs(_corr(lum, np.roll(padded, 1, axis=0)))
    assert matched.mean() > 0.5 and mismatched.mean() < 0.3
    assert (matched > mismatched).mean() > 0.9
    shifts = {(dy, dx): np.abs(_corr(lum[:2000], np.roll(padded[:2000], (dy, dx), axis=(1, 2)))).mean()
              for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert max(shifts, key=shifts.get) == (0, 0)


def test_mnistm_scenes_test_on_the_real_files(real_root):
    """mnistm-scenes:test from the extracted MNIST-M test archive and the real MNIST: each tile
    is the MNIST-M image, labelled by the MNIST digit of the same index."""
    source = load_dense("mnistm-scenes", "test", real_root)
    mnistm_x, _ = digits.read_mnistm(real_root / "mnistm", "test")
    mnist_x, mnist_y = digits.read_mnist(real_root / "mnist", "test")
    for i in (0, 1999):
        x, y = source.read(i)
        for t, k in enumerate(source.draw(i)[0]):
            np.testing.assert_array_equal(quadrant(x, t), mnistm_x[k].transpose(2, 0, 1))
            expected = scenes.label_tiles(np.pad(mnist_x[k, :, :, 0], 2)[None], mnist_y[k:k + 1])[0]
            np.testing.assert_array_equal(quadrant(y, t), expected)
    source = load_dense("mnist-scenes", "train", real_root)
    assert len(source) == 20_000 and max(int(k) for i in range(500) for k in source.draw(i)[0]) < 30_000
