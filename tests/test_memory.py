"""A run holds each dataset split once: no copy per role (source, target, evaluation) and no
leftover copies from reading and converting it. Measured as the process's resident memory
during a training step, with a split large enough (~100 MB) to stand out from the rest."""

from __future__ import annotations

import ctypes
import gc
import os

import numpy as np
import pytest

from uda_cli.config import TrainOptions
from uda_cli.data.registry import _DOMAINS, DIGIT_CLASSES, DomainSpec, register_domain
from uda_cli.engine.trainer import train
from uda_cli.methods.registry import _METHODS, get_method

N = 100_000  # 32x32 grey uint8: 102 MB per split
SPLIT_BYTES = N * 32 * 32


def _trim() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim). Without it, freed blocks kept
    in malloc's arenas count as resident, and the reading swung by ~70 MB either way between
    runs (a 102 MB split read as 71-180 MB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: read RSS as it is
        pass


def _rss() -> int:
    """Resident bytes, after collecting cyclic garbage and trimming malloc's free memory."""
    gc.collect()
    _trim()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _big_reader(_folder, split):
    n = N if split == "train" else 256
    x = np.random.default_rng(0).integers(0, 255, size=(n, 28, 28, 1), dtype=np.uint8)  # resized to 32 on load
    return x, np.arange(n, dtype=np.int64) % 10


@pytest.fixture
def big_domain():
    register_domain(DomainSpec(name="big-grey", task="classification", classes=DIGIT_CLASSES, channels=1,
                               image_size=(32, 32), splits=("train", "test"), train_split="train",
                               eval_split="test", dataset=None, reader=_big_reader, description="memory test"))
    seen: list[int] = []

    class Probe(get_method("source-only")):
        def train_step(self, batch, step):
            seen.append(_rss())
            return super().train_step(batch, step)

    Probe.name = "test-rss-probe"
    _METHODS[Probe.name] = Probe
    yield seen
    del _METHODS[Probe.name], _DOMAINS["big-grey"]


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc (Linux)")
@pytest.mark.parametrize("tgt", ["tiny-tgt", "big-grey"])
def test_each_split_is_held_once(tmp_path, big_domain, tgt):
    """big-grey -> tiny-tgt holds one big split; big-grey -> big-grey (the same split as source
    and target) must hold it once too, not twice."""
    def run(out):
        train(TrainOptions(method="test-rss-probe", src="big-grey", tgt=tgt, steps=2, batch_size=8, out=out,
                           device="cpu", eval_every=0, save_every=100, params={"backbone": "lenet"}), interactive=False)

    # A first run pays one-time costs that stay resident (kernels, allocator arenas, ~250 MB
    # measured): keep them out of the baseline.
    run(tmp_path / "warm-up")
    base = _rss()
    big_domain.clear()
    run(tmp_path / "run")
    grown = max(big_domain) - base
    # One copy is SPLIT_BYTES; a second would be 2x. The rest (LeNet, Adam, test split) is a few MB.
    assert 0.8 * SPLIT_BYTES < grown < 1.5 * SPLIT_BYTES, f"grew {grown / 1e6:.0f} MB for a {SPLIT_BYTES / 1e6:.0f} MB split"
