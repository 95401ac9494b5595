"""Regenerate the embedded data ``uda_cli/data/embedded/{mnist2000,usps1800,mnistm_scene_tiles}.npz``.

The ADDA protocol (Tzeng et al., CVPR 2017): 2,000 MNIST and 1,800 USPS training digits; and the
MNIST-M tiles of the ``mnistm-scenes-mini`` digit scenes (``uda_cli/data/scenes.py``).

    python tools/make_embedded.py [SHARED_DATA_DIR]          # default: ../shared/data
    python tools/make_embedded.py [SHARED_DATA_DIR] --check  # compare with the shipped files

Draws, each with its own ``numpy.random.default_rng(SEED)``, indices sorted into file order:
  mnist2000: train = 2,000 of MNIST train without replacement, then test = 2,000 of MNIST
             test without replacement (same generator, in that order);
  usps1800:  train = 1,800 of USPS train (usps.h5) without replacement; test = all 2,007.
  mnistm_scene_tiles: train = 1,000 of the MNIST-M train images 30,000-59,000 whose MNIST
             counterparts are not in mnist2000's train draw; test = 500 of the 9,001 MNIST-M
             test images whose counterparts are not in mnist2000's test draw (a fresh
             generator, train then test); each with the 28x28 MNIST image of the same index
             (its label mask), the digit and the index. MNIST-M PNGs are read straight from
             the shared archives and decoded with Pillow as ``read_mnistm`` does.
Images are read with the package's own readers, so they match what ``uda`` reads from the
original files. The zip members carry a write time, so the .npz bytes differ between runs
while the arrays are identical: ``--check`` compares arrays, and a plain run rewrites only the
files whose arrays changed. Fails when all embedded .npz files together reach 6,000,000 bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout, installed or not

from uda_cli.data.digits import read_mnist, read_usps  # noqa: E402

SEED = 0
OUT_DIR = REPO / "uda_cli" / "data" / "embedded"
SOURCES = {
    "mnist2000": ["mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz",
                  "mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"],
    "usps1800": ["usps/usps.h5"],
    "mnistm_scene_tiles": ["mnist_m/mnist_m_train_part1_00000000-00009999.tar.gz",  # the train labels file
                           "mnist_m/mnist_m_train_part2_00010000-00059000.tar.gz",  # images 10,000-59,000
                           "mnist_m/mnist_m_test.tar.gz",
                           "mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz",
                           "mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"],
}
SIZE_BUDGET = 6_000_000  # bytes, every embedded .npz together
MNISTM_TILES = {"train": 1000, "test": 500}
MNISTM_TRAIN_RANGE = (30_000, 59_001)  # the half of MNIST(-M) train the digit-scene target draws from
MNISTM_ARCHIVES = {"train": ["mnist_m_train_part1_00000000-00009999.tar.gz",
                             "mnist_m_train_part2_00010000-00059000.tar.gz"],
                   "test": ["mnist_m_test.tar.gz"]}


def draw_indices(rng: np.random.Generator, pool, n: int | None) -> np.ndarray:
    """``n`` of ``pool`` (a count or an array of indices) without replacement, in file order;
    ``None``: all of them."""
    if n is None:
        return np.arange(pool) if np.isscalar(pool) else np.asarray(pool)
    return np.sort(rng.choice(pool, size=n, replace=False))


def draw(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n: int | None):
    """``n`` samples without replacement, kept in file order; ``None``: all of them."""
    idx = draw_indices(rng, len(x), n)
    return x[idx], y[idx]


def mnistm_pngs(data: Path, split: str, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-M ``split`` images ``indices`` [N, 32, 32, 3] and the labels file's digits for them,
    read from the shared archives without extracting them."""
    from PIL import Image

    wanted = {f"mnist_m/mnist_m_{split}/{i:08d}.png": k for k, i in enumerate(indices)}
    images = np.zeros((len(indices), 32, 32, 3), np.uint8)
    found, labels_text = 0, None
    for archive in MNISTM_ARCHIVES[split]:
        with tarfile.open(data / "mnist_m" / archive) as tar:
            for member in tar:
                if member.name == f"mnist_m/mnist_m_{split}_labels.txt":
                    labels_text = tar.extractfile(member).read().decode()
                elif member.name in wanted:
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        images[wanted[member.name]] = np.asarray(im.convert("RGB"))
                    found += 1
    if found != len(indices) or labels_text is None:
        raise SystemExit(f"error: MNIST-M {split}: found {found} of {len(indices)} images in the archives")
    names = dict(line.split() for line in labels_text.splitlines() if line.strip())
    labels = np.array([int(names[f"{i:08d}.png"]) for i in indices], np.int64)
    return images, labels


def mnistm_scene_tiles(data: Path, mnist_drawn: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The target tiles of ``mnistm-scenes-mini``: MNIST-M images disjoint from ``mnist2000``."""
    rng = np.random.default_rng(SEED)
    pools = {"train": np.setdiff1d(np.arange(*MNISTM_TRAIN_RANGE), mnist_drawn["train"]),
             "test": np.setdiff1d(np.arange(9001), mnist_drawn["test"])}
    arrays = {}
    for split in ("train", "test"):
        idx = draw_indices(rng, pools[split], MNISTM_TILES[split])
        x, mnistm_y = mnistm_pngs(data, split, idx)
        mnist_x, mnist_y = read_mnist(data / "mnist", split)
        if not np.array_equal(mnistm_y, mnist_y[idx]):  # MNIST-M image i is MNIST image i
            raise SystemExit(f"error: MNIST-M {split} labels differ from MNIST's at the drawn indices")
        arrays.update({f"{split}_x": x, f"{split}_mask": mnist_x[idx, :, :, 0],
                       f"{split}_y": mnist_y[idx].astype(np.uint8), f"{split}_index": idx.astype(np.int32)})
    return arrays


def build(data: Path) -> dict[str, dict[str, np.ndarray]]:
    subsets = {}
    rng = np.random.default_rng(SEED)
    mnist_x, mnist_y = read_mnist(data / "mnist", "train")
    drawn = {"train": draw_indices(rng, len(mnist_x), 2000)}
    train_x, train_y = mnist_x[drawn["train"]], mnist_y[drawn["train"]]
    mnist_x, mnist_y = read_mnist(data / "mnist", "test")
    drawn["test"] = draw_indices(rng, len(mnist_x), 2000)
    test_x, test_y = mnist_x[drawn["test"]], mnist_y[drawn["test"]]
    subsets["mnist2000"] = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    rng = np.random.default_rng(SEED)
    train_x, train_y = draw(rng, *read_usps(data / "usps", "train"), 1800)
    test_x, test_y = draw(rng, *read_usps(data / "usps", "test"), None)
    subsets["usps1800"] = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    subsets["mnistm_scene_tiles"] = mnistm_scene_tiles(data, drawn)
    return subsets


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(name: str, arrays: dict[str, np.ndarray], data: Path) -> None:
    for source in SOURCES[name]:
        print(f"  source {source}  sha256 {sha256(data / source)}")
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        print(f"  {split}: {x.shape} {x.dtype}, class counts 0-9 {np.bincount(y, minlength=10).tolist()}")
        if f"{split}_index" in arrays:
            idx = arrays[f"{split}_index"]
            print(f"  {split}: indices {idx.min()}..{idx.max()}, sha256 of the int32 index array "
                  f"{hashlib.sha256(idx.tobytes()).hexdigest()}")


def matches(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Whether ``path`` holds exactly ``arrays`` (names, dtypes, values)."""
    if not path.is_file():
        return False
    with np.load(path, allow_pickle=False) as shipped:
        return set(shipped.files) == set(arrays) and all(
            np.array_equal(shipped[k], v) and shipped[k].dtype == v.dtype for k, v in arrays.items()
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder holding mnist/, usps/ and mnist_m/ (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="only compare the shipped files with a fresh draw; exit 1 if they differ")
    args = parser.parse_args()

    subsets = build(args.data)
    status = 0
    for name, arrays in subsets.items():
        path = OUT_DIR / f"{name}.npz"
        print(f"{name}:")
        describe(name, arrays, args.data)
        same = matches(path, arrays)
        if args.check:
            print(f"  {path.name}: {'matches' if same else 'DIFFERS from'} a fresh draw")
            status |= not same
        elif same:  # rewriting would only change the zip members' times: leave the file alone
            print(f"  {path.name}: unchanged")
        else:
            np.savez_compressed(path, **arrays)
            print(f"  {path.name}: written")
    total = sum(path.stat().st_size for path in OUT_DIR.glob("*.npz"))  # all of them, others' too
    for name in subsets:
        print(f"{name}.npz: {(OUT_DIR / f'{name}.npz').stat().st_size:,} bytes")
    print(f"total of every embedded .npz: {total:,} bytes (budget {SIZE_BUDGET:,})")
    if total >= SIZE_BUDGET:
        print("error: the embedded files exceed the size budget", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
