"""Digit scenes: a small real-data segmentation benchmark, MNIST painted tiles -> MNIST-M tiles.

A scene is a 64x64 canvas of 2x2 tiles of 32x32, each tile one digit image padded by 2 px
(MNIST is 28x28; MNIST-M image i *is* MNIST image i padded by 2 px to 32x32 and blended
with a BSDS500 photo patch, Ganin & Lempitsky, ICML 2015 / JMLR 2016). Each pixel's label
comes from its tile's MNIST stroke intensity ``m``:

- ``m >= 128``: the tile's digit (train ids 0-9);
- ``m == 0`` (the 2 px pad included): ``background`` (train id 10);
- ``0 < m < 128``: 255, ignored: the anti-aliased rim, where neither answer is right.

11 classes, ``("0", ..., "9", "background")``. The domains:

- ``mnist-scenes`` (source): each tile is what a simple renderer draws, MNIST strokes in a
  random stroke colour over a random flat background colour, ``alpha = m / 255``
  (``pixel = round((bg * (255 - m) + stroke * m) / 255)``); both colours uniform per RGB
  channel in 0..255, drawn independently per tile. train: 20,000 scenes whose tiles are MNIST
  train images ``[0, 30000)``; test: 2,000 scenes from all 10,000 MNIST test images.
  Needs ``uda download mnist``.
- ``mnistm-scenes`` (target): each tile is an MNIST-M image, labelled by the MNIST image of the
  same index. train: 20,000 scenes from MNIST-M train ``[30000, 59001)`` (the half of MNIST
  train that ``mnist-scenes`` does not use); test: a fixed set of 2,000 scenes from the 9,001
  MNIST-M test images. Needs ``uda download mnistm`` (all three archives: the train split needs
  images 30,000-59,000) and ``uda download mnist`` (the labels): the reader is given the
  ``mnistm`` folder and reaches its sibling ``mnist`` folder in the same data root.
  A run trains on its train split without labels (the engine withholds target labels; the
  source returns them, for evaluation and probes).
- ``mnist-scenes-mini`` / ``mnistm-scenes-mini``: the same construction from tiles shipped in the
  package (no data root): source tiles are the embedded ``mnist2000`` digits (2,000 MNIST
  train / 2,000 MNIST test); target tiles are ``mnistm_scene_tiles.npz``, 1,000 MNIST-M train
  images from ``[30000, 59001)`` none of whose MNIST counterparts is in ``mnist2000``, and 500
  MNIST-M test images whose MNIST counterparts are not in ``mnist2000``'s test draw (see
  ``embedded/README.md``). train: 4,000 scenes each; test: 500.

A scene is fixed by its index ``i``: its 4 tiles (uniform with replacement from the split's
tile pool) and, for the source, its 8 colours come from
``numpy.random.default_rng((crc32(domain name), split number, i))``, so each split is a finite
list of named samples ``scene-000000`` ... and two processes read the same pixels. The draws
follow numpy's ``Generator`` streams (PCG64 and ``integers``); ``tests/test_scenes.py`` pins
one scene, so a numpy release that changed them would be noticed.

Reading composites 4 tiles from arrays in memory (tens of microseconds). The tile arrays load
on first read, once per process (a module-level cache shared by a split's sources), and are
never pickled: a source crosses to a ``DataLoader`` worker as a few hundred bytes.

Why painted tiles, and the history of the design: ``docs/datasets/digit-scenes.md``.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from uda_cli.data import digits
from uda_cli.data.dense import DenseSource
from uda_cli.data.registry import DIGIT_CLASSES, DomainSpec, register_domain
from uda_cli.errors import DataError

SCENE_CLASSES = (*DIGIT_CLASSES, "background")
BACKGROUND = 10
IGNORE = 255
STROKE_MIN = 128  # MNIST intensity from which a pixel is the digit
TILE = 32  # a tile: a 28x28 MNIST digit padded by 2 px (the MNIST-M size)
PAD = 2
GRID = 2  # tiles per side
SCENE_SIZE = (GRID * TILE, GRID * TILE)
SPLITS = ("train", "test")

# Tile pools: which images of the original splits each domain draws from.
SOURCE_TRAIN = (0, 30_000)  # MNIST train
TARGET_TRAIN = (30_000, 59_001)  # MNIST-M train (and the MNIST train images of the same index)
MNISTM_SIZES = {"train": 59_001, "test": 9_001}  # MNIST-M is the first 59,001 / 9,001 of MNIST
SCENES = {"train": 20_000, "test": 2_000}
MINI_SCENES = {"train": 4_000, "test": 500}
MINI_TILES_FILE = "mnistm_scene_tiles.npz"


# --- tiles ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tiles:
    """A split's tile pool: ``strokes`` uint8 [N, 32, 32] (MNIST intensity, padded by 2 px),
    ``digits`` uint8 [N], and ``images`` uint8 [N, 3, 32, 32] (MNIST-M) or None (painted)."""

    strokes: np.ndarray
    digits: np.ndarray
    images: np.ndarray | None = None


@dataclass(frozen=True)
class Pool:
    """What reading needs, computed once per process: ``labels`` uint8 [N, 32, 32] train ids,
    and either ``images`` uint8 [N, 3, 32, 32] or (painted) ``strokes`` uint8 [N, 32, 32]."""

    labels: np.ndarray
    images: np.ndarray | None
    strokes: np.ndarray | None

    @classmethod
    def of(cls, tiles: Tiles) -> "Pool":
        labels = label_tiles(tiles.strokes, tiles.digits)
        return cls(labels, tiles.images, None if tiles.images is not None else tiles.strokes)


def _pad(strokes: np.ndarray) -> np.ndarray:
    """[N, 28, 28] -> [N, 32, 32], 2 px of zeros each side (MNIST-M's framing of MNIST)."""
    return np.pad(strokes, ((0, 0), (PAD, PAD), (PAD, PAD)))


def _chw(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


@dataclass(frozen=True)
class MnistTiles:
    """MNIST images ``[start, stop)`` of ``split`` from ``<data root>/mnist``."""

    folder: Path
    split: str
    start: int | None = None
    stop: int | None = None

    def check(self) -> None:
        prefix = "train" if self.split == "train" else "t10k"
        for kind in ("images-idx3", "labels-idx1"):
            digits._mnist_file(self.folder, f"{prefix}-{kind}-ubyte.gz")  # raises "run: uda download mnist"

    def load(self) -> Tiles:
        x, y = digits.read_mnist(self.folder, self.split)
        sl = slice(self.start, self.stop)
        return Tiles(_pad(x[sl, :, :, 0]), y[sl].astype(np.uint8))


@dataclass(frozen=True)
class MnistmTiles:
    """MNIST-M images ``[start, stop)`` of ``split`` from ``<data root>/mnistm``, labelled by the
    MNIST images of the same index from the sibling ``<data root>/mnist``."""

    folder: Path
    split: str
    start: int | None = None
    stop: int | None = None

    @property
    def mnist(self) -> MnistTiles:
        return MnistTiles(self.folder.parent / "mnist", self.split, self.start, self.stop)

    def check(self) -> None:
        self.mnist.check()
        labels = self.folder / "mnist_m" / f"mnist_m_{self.split}_labels.txt"
        if not labels.is_file():
            raise digits._missing("mnistm", f"mnist_m/{labels.name}", self.folder)

    def load(self) -> Tiles:
        import warnings

        with warnings.catch_warnings():  # an incomplete MNIST-M is refused just below
            warnings.simplefilter("ignore")
            x, y = digits.read_mnistm(self.folder, self.split)
        n = MNISTM_SIZES[self.split]
        if len(y) != n:
            raise DataError(f"MNIST-M {self.split} in {self.folder} holds {len(y):,} of its {n:,} images and the digit "
                            f"scenes need them all; run: {digits._download('mnistm', self.folder)}")
        mnist = self.mnist.load()  # MNIST tiles [start, stop): the labels
        sl = slice(self.start, self.stop)
        if len(mnist.digits) != len(y[sl]):
            raise ValueError(f"MNIST and MNIST-M pools differ in size: {self}")  # a bad pool, a bug
        # MNIST-M image i is MNIST image i; its labels file agreeing with MNIST's is the cheap check.
        if not np.array_equal(y[sl], mnist.digits):
            raise DataError(f"the MNIST-M {self.split} labels in {self.folder} do not follow MNIST's order; "
                            f"re-download it: {digits._download('mnistm', self.folder, force=True)}")
        return Tiles(mnist.strokes, mnist.digits, _chw(x[sl]))


@dataclass(frozen=True)
class EmbeddedMnistTiles:
    """The embedded ``mnist2000`` digits of ``split``."""

    split: str

    def check(self) -> None:
        pass

    def load(self) -> Tiles:
        x, y = digits.read_embedded("mnist2000", self.split)
        return Tiles(_pad(x[..., 0]), y.astype(np.uint8))


@dataclass(frozen=True)
class EmbeddedMnistmTiles:
    """The embedded MNIST-M tiles of ``split`` with their MNIST strokes (``mnistm_scene_tiles.npz``)."""

    split: str

    def check(self) -> None:
        pass

    def load(self) -> Tiles:
        resource = resources.files("uda_cli.data.embedded") / MINI_TILES_FILE
        try:
            with resource.open("rb") as f, np.load(f, allow_pickle=False) as z:
                x, m, y = z[f"{self.split}_x"], z[f"{self.split}_mask"], z[f"{self.split}_y"]
        except FileNotFoundError as e:
            raise DataError(f"embedded dataset {MINI_TILES_FILE} is missing from the uda package; reinstall uda") from e
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"embedded dataset {MINI_TILES_FILE} in the uda package is damaged ({e}); "
                            "reinstall uda") from e
        return Tiles(_pad(m), y.astype(np.uint8), _chw(x))


@functools.lru_cache(maxsize=8)
def _load_pool(loader) -> Pool:
    """Once per process and pool: the sources of a split (and its parts) share the arrays."""
    return Pool.of(loader.load())


# --- scenes --------------------------------------------------------------------------------


_RIM = np.full(256, IGNORE, np.uint8)  # MNIST intensity -> train id, for all but the strokes
_RIM[0] = BACKGROUND


def label_tiles(strokes: np.ndarray, digits: np.ndarray) -> np.ndarray:
    """[N, H, W] MNIST intensities and [N] digits -> [N, H, W] uint8 train ids: the digit where
    the intensity is >= 128, 10 (background) where it is 0, 255 (ignore) between."""
    label = _RIM[strokes]
    stroke = strokes >= STROKE_MIN
    label[stroke] = np.broadcast_to(np.asarray(digits, np.uint8)[:, None, None], strokes.shape)[stroke]
    return label


def _paint(strokes: np.ndarray, stroke: np.ndarray, background: np.ndarray) -> np.ndarray:
    """[T, 32, 32] intensities, [T, 3] stroke and background colours -> [T, 3, 32, 32] uint8:
    alpha compositing with alpha = m / 255, rounded, in integers (exact on every platform;
    255 * 255 + 127 fits uint16)."""
    a = strokes[:, None].astype(np.uint16)  # [T, 1, 32, 32]
    mixed = stroke.astype(np.uint16)[:, :, None, None] * a
    mixed += background.astype(np.uint16)[:, :, None, None] * (255 - a)
    mixed += 127
    return (mixed // 255).astype(np.uint8)


def _canvas(tiles: np.ndarray) -> np.ndarray:
    """[4, ..., 32, 32] tiles in reading order -> [..., 64, 64], tile t at row t // 2, column t % 2."""
    lead = tiles.shape[1:-2]
    grid = tiles.reshape(GRID, GRID, *lead, TILE, TILE)
    k = len(lead)
    order = (*range(2, 2 + k), 0, 2 + k, 1, 3 + k)  # (..., row, y, col, x)
    return np.ascontiguousarray(grid.transpose(order)).reshape(*lead, GRID * TILE, GRID * TILE)


class SceneSource(DenseSource):
    """One split of a digit-scene domain: ``count`` scenes, scene ``i`` drawn by
    ``default_rng((seed, split number, i))`` from the tile pool ``loader`` gives."""

    def __init__(self, name: str, domain: str, split: str, count: int, loader, painted: bool):
        self.name, self.domain, self.split, self.count = name, domain, split, count
        self.loader, self.painted = loader, painted
        self.seed = zlib.crc32(domain.encode())  # stable across processes, unlike hash()
        self.split_number = SPLITS.index(split)
        self.labelled = True
        self._pool: Pool | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # a worker loads its own copy: pickles stay a few hundred bytes
        return state

    def __len__(self) -> int:
        return self.count

    def stem(self, i: int) -> str:
        return f"scene-{self._index(i):06d}"

    def native_size(self, i: int) -> tuple[int, int]:
        return SCENE_SIZE

    def _index(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self.count:
            raise IndexError(f"{self.name} has {self.count:,} scenes; no scene {i}")
        return i

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = _load_pool(self.loader)
        return self._pool

    def draw(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Scene ``i``'s tile indices into the pool [4] and, when painted, its colours
        [2, 4, 3] (stroke, background) as int64."""
        rng = np.random.default_rng((self.seed, self.split_number, self._index(i)))
        tiles = rng.integers(0, len(self.pool.labels), size=GRID * GRID)
        colours = rng.integers(0, 256, size=(2, GRID * GRID, 3)) if self.painted else None
        return tiles, colours

    def read(self, i: int):
        import torch

        pool = self.pool
        t, colours = self.draw(i)
        image = _paint(pool.strokes[t], colours[0], colours[1]) if self.painted else pool.images[t]
        return torch.from_numpy(_canvas(image)), torch.from_numpy(_canvas(pool.labels[t]))


# --- the domains ---------------------------------------------------------------------------


def _reader(domain: str, counts: dict[str, int], pools, painted: bool):
    """A ``DomainSpec.reader``: (dataset folder, split) -> :class:`SceneSource`; the files are
    checked to be there now, read on the first scene."""

    def read(folder: Path, split: str) -> SceneSource:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; the digit scenes have: {', '.join(SPLITS)}")
        loader = pools(Path(folder), split)
        loader.check()
        return SceneSource(f"{domain}:{split}", domain, split, counts[split], loader, painted)

    return read


def _mnist_pool(folder: Path, split: str):
    return MnistTiles(folder, "train", *SOURCE_TRAIN) if split == "train" else MnistTiles(folder, "test")


def _mnistm_pool(folder: Path, split: str):
    if split == "train":
        return MnistmTiles(folder, "train", *TARGET_TRAIN)
    return MnistmTiles(folder, "test", 0, MNISTM_SIZES["test"])  # MNIST test has 10,000; MNIST-M the first 9,001


def _register(name: str, dataset: str | None, counts: dict[str, int], pools, painted: bool, description: str,
              needs: str) -> None:
    register_domain(DomainSpec(
        name=name, task="segmentation", classes=SCENE_CLASSES, channels=3, image_size=SCENE_SIZE,
        splits=SPLITS, train_split="train", eval_split="test", dataset=dataset,
        reader=_reader(name, counts, pools, painted), description=description,
        notes={"datasets": needs, "model": "deeplabv2_small"},  # the network a run builds by default
    ))


_register("mnist-scenes", "mnist", SCENES, _mnist_pool, True,
          "digit scenes, source: 2x2 MNIST digits painted in random colours, 64x64, 11 classes "
          "(digits + background); 20,000 train (MNIST train 0-29,999) / 2,000 test scenes", "mnist")
_register("mnistm-scenes", "mnistm", SCENES, _mnistm_pool, False,
          "digit scenes, target: 2x2 MNIST-M digits labelled by their MNIST strokes, 64x64, 11 classes; "
          "20,000 train (MNIST-M train 30,000-59,000) / 2,000 test scenes", "mnistm, mnist")
_register("mnist-scenes-mini", None, MINI_SCENES, lambda _folder, split: EmbeddedMnistTiles(split), True,
          "mnist-scenes from the embedded mnist2000 digits: 4,000 train / 500 test scenes. Ships with uda", "")
_register("mnistm-scenes-mini", None, MINI_SCENES, lambda _folder, split: EmbeddedMnistmTiles(split), False,
          "mnistm-scenes from 1,000 train / 500 test MNIST-M tiles disjoint from mnist2000: "
          "4,000 train / 500 test scenes. Ships with uda", "")
