"""Shared fixtures: tiny synthetic digit-like domains that need no files, and the real data dir."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from uda_cli.data.registry import DIGIT_CLASSES, DomainSpec, _DOMAINS, register_domain

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# One intra-op thread in this process and every subprocess a test starts: tests compare
# weights bit for bit across processes (interrupt in one, resume in another), and float
# reductions split differently with a different thread count. It also keeps test processes
# from oversubscribing a 2-core machine.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def _tiny(n: int, channels: int, seed: int, shift: int):
    """Class k is a bright 8x8 square at a class-specific place on a noisy background."""

    def reader(_folder, split):
        rng = np.random.default_rng(seed + (split == "test"))
        y = np.arange(n) % 10
        x = rng.integers(0, 60, size=(n, 16, 16, channels), dtype=np.uint8)
        for i, k in enumerate(y):
            r, c = divmod(int(k), 5)
            x[i, r * 8 : r * 8 + 6, (c * 3 + shift) % 11 : (c * 3 + shift) % 11 + 6, :] = 230
        return x, y.astype(np.int64)

    return reader


def _register(name, channels, seed, shift, n=64):
    if name not in _DOMAINS:
        register_domain(DomainSpec(
            name=name, task="classification", classes=DIGIT_CLASSES, channels=channels, image_size=(32, 32),
            splits=("train", "test"), train_split="train", eval_split="test", dataset=None,
            reader=_tiny(n, channels, seed, shift), description="test domain",
        ))


_register("tiny-src", 1, 0, 0)
_register("tiny-tgt", 1, 10, 1)
_register("tiny-rgb", 3, 20, 2)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("shared/data is not beside the repository")
    return SHARED_DATA
