"""Regenerate the embedded digit subsets ``uda_cli/data/embedded/{mnist2000,usps1800}.npz``.

The ADDA protocol (Tzeng et al., CVPR 2017): 2,000 MNIST and 1,800 USPS training digits.

    python tools/make_embedded.py [SHARED_DATA_DIR]          # default: ../shared/data
    python tools/make_embedded.py [SHARED_DATA_DIR] --check  # compare with the shipped files

Draws, each with its own ``numpy.random.default_rng(SEED)``, indices sorted into file order:
  mnist2000: train = 2,000 of MNIST train without replacement, then test = 2,000 of MNIST
             test without replacement (same generator, in that order);
  usps1800:  train = 1,800 of USPS train (usps.h5) without replacement; test = all 2,007.
Images are read with the package's own readers, so they match what ``uda`` reads from the
original files. The zip members carry a write time, so the .npz bytes differ between runs
while the arrays are identical: ``--check`` compares arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
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
}
SIZE_BUDGET = 2 * 1024 * 1024  # both files together


def draw(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, n: int | None):
    """``n`` samples without replacement, kept in file order; ``None``: all of them."""
    if n is None:
        return x, y
    idx = np.sort(rng.choice(len(x), size=n, replace=False))
    return x[idx], y[idx]


def build(data: Path) -> dict[str, dict[str, np.ndarray]]:
    subsets = {}
    rng = np.random.default_rng(SEED)
    train_x, train_y = draw(rng, *read_mnist(data / "mnist", "train"), 2000)
    test_x, test_y = draw(rng, *read_mnist(data / "mnist", "test"), 2000)
    subsets["mnist2000"] = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)

    rng = np.random.default_rng(SEED)
    train_x, train_y = draw(rng, *read_usps(data / "usps", "train"), 1800)
    test_x, test_y = draw(rng, *read_usps(data / "usps", "test"), None)
    subsets["usps1800"] = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)
    return subsets


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(name: str, arrays: dict[str, np.ndarray], data: Path) -> None:
    for source in SOURCES[name]:
        print(f"  source {source}  sha256 {sha256(data / source)}")
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        print(f"  {split}: {x.shape} {x.dtype}, class counts 0-9 {np.bincount(y, minlength=10).tolist()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=REPO.parent / "shared" / "data",
                        help="the shared data folder holding mnist/ and usps/ (default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help="only compare the shipped files with a fresh draw; exit 1 if they differ")
    args = parser.parse_args()

    subsets = build(args.data)
    status = 0
    for name, arrays in subsets.items():
        path = OUT_DIR / f"{name}.npz"
        print(f"{name}:")
        describe(name, arrays, args.data)
        if args.check:
            with np.load(path, allow_pickle=False) as shipped:
                same = set(shipped.files) == set(arrays) and all(
                    np.array_equal(shipped[k], v) and shipped[k].dtype == v.dtype for k, v in arrays.items()
                )
            print(f"  {path.name}: {'matches' if same else 'DIFFERS from'} a fresh draw")
            status |= not same
        else:
            np.savez_compressed(path, **arrays)
    total = sum((OUT_DIR / f"{name}.npz").stat().st_size for name in subsets)
    for name in subsets:
        print(f"{name}.npz: {(OUT_DIR / f'{name}.npz').stat().st_size:,} bytes")
    print(f"total: {total:,} bytes (budget {SIZE_BUDGET:,})")
    if total >= SIZE_BUDGET:
        print("error: the embedded files exceed the size budget", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
