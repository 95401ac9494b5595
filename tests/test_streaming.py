"""Dense streams: per-draw seeded augmentation, independence from workers and ranks, exact resume."""

from __future__ import annotations

import pickle

import pytest
import torch

from uda_cli.data.dense import DenseSource
from uda_cli.data.streaming import Augment, DenseBatches, DenseDataset, DenseStream, sample_seed


class Stripes(DenseSource):
    """Sample i: an image whose pixels encode (i, row, column) and a label of its column stripes."""

    def __init__(self, n=23, size=(20, 30), labelled=True):
        self.n, self.size, self.labelled, self.name = n, size, labelled, "stripes:train"

    def __len__(self):
        return self.n

    def stem(self, i):
        return f"s{i:03d}"

    def read(self, i):
        h, w = self.size
        rows = torch.arange(h).view(h, 1).expand(h, w)
        cols = torch.arange(w).view(1, w).expand(h, w)
        image = torch.stack([torch.full((h, w), i * 7 % 256), rows * 9 % 256, cols * 5 % 256]).to(torch.uint8)
        label = (cols // 5).to(torch.uint8) if self.labelled else None
        return image, label


AUG = Augment(crop=(12, 16), scale=(0.5, 1.5), flip=True)


def _draws(stream, k):
    out = []
    for _ in range(k):
        x, y, idx = stream.next()
        out.append((x.clone(), None if y is None else y.clone(), idx.clone()))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (xa, ya, ia), (xb, yb, ib) in zip(a, b):
        assert torch.equal(ia, ib) and torch.equal(xa, xb)
        assert (ya is None and yb is None) or torch.equal(ya, yb)


def test_augmentation_is_seeded_by_draw_not_worker():
    ds = DenseDataset(Stripes(), (16, 24), AUG, seed=3, stream="src")
    a = _draws(DenseStream(ds, 4, seed=1, device="cpu", num_workers=0), 9)
    b = _draws(DenseStream(ds, 4, seed=1, device="cpu", num_workers=2), 9)
    _same(a, b)
    x, y, _ = a[0]
    assert x.shape == (4, 3, 12, 16) and x.dtype == torch.uint8
    assert y.shape == (4, 12, 16) and y.dtype == torch.uint8
    # Different draws of the same image get different crops (augmentation is on).
    assert sample_seed(3, "src", 0) != sample_seed(3, "src", 1) != sample_seed(3, "tgt", 1)


def test_two_ranks_see_the_global_batch_of_one():
    ds = DenseDataset(Stripes(), (16, 24), AUG, seed=0, stream="src")
    one = _draws(DenseStream(ds, 6, seed=5, device="cpu"), 5)
    r0 = _draws(DenseStream(ds, 3, seed=5, device="cpu", world_size=2, rank=0), 5)
    r1 = _draws(DenseStream(ds, 3, seed=5, device="cpu", world_size=2, rank=1), 5)
    for (x, y, i), (x0, y0, i0), (x1, y1, i1) in zip(one, r0, r1):
        assert torch.equal(i, torch.cat([i0, i1])) and torch.equal(x, torch.cat([x0, x1]))
        assert torch.equal(y, torch.cat([y0, y1]))


def test_resume_is_exact_with_workers_ahead():
    ds = DenseDataset(Stripes(), (16, 24), AUG, seed=1, stream="tgt")
    straight = _draws(DenseStream(ds, 4, seed=2, device="cpu", num_workers=2), 12)
    first = DenseStream(ds, 4, seed=2, device="cpu", num_workers=2)
    head = _draws(first, 7)  # its workers have prefetched beyond batch 7
    state = pickle.loads(pickle.dumps(first.state_dict()))
    second = DenseStream(ds, 4, seed=2, device="cpu", num_workers=1)
    second.load_state_dict(state)
    _same(straight, head + _draws(second, 5))


def test_pad_when_the_scaled_image_is_smaller_than_the_crop():
    ds = DenseDataset(Stripes(size=(10, 10)), (10, 10), Augment(crop=(14, 14)), seed=0, stream="src")
    x, y, _ = ds[(0, 0)]
    assert x.shape == (3, 14, 14) and y.shape == (14, 14)
    assert (y == 255).sum() == 14 * 14 - 10 * 10  # padding is ignored


def test_resize_keeps_label_values_and_unlabelled_target_reads_no_label():
    ds = DenseDataset(Stripes(), (40, 60), seed=0, stream="src")
    x, y, i = ds[(0, 4)]
    assert x.shape == (3, 40, 60) and set(y.unique().tolist()) <= set(range(6))
    batches = DenseBatches(ds, DenseDataset(Stripes(labelled=False), (40, 60), seed=0, stream="tgt"), 2, seed=0,
                           device="cpu")
    b = batches.next()
    assert b["x_s"].dtype == torch.float32 and -1 <= float(b["x_s"].min()) and float(b["x_s"].max()) <= 1
    assert b["y_s"].dtype == torch.int64 and b["y_s"].shape == (2, 40, 60)
    assert b["idx_t"].shape == (2,)
    state = batches.state_dict()
    nxt = batches.next()
    batches.load_state_dict(state)
    again = batches.next()
    assert torch.equal(nxt["x_s"], again["x_s"]) and torch.equal(nxt["idx_t"], again["idx_t"])


@pytest.mark.parametrize("n", [1, 5])
def test_small_domains_cycle(n):
    ds = DenseDataset(Stripes(n=n), (8, 8), seed=0, stream="src")
    s = DenseStream(ds, 3, seed=0, device="cpu")
    seen = torch.cat([s.next()[2] for _ in range(4)])
    assert set(seen.tolist()) == set(range(n))


def test_starting_a_stream_leaves_the_global_rng_alone():
    """A DataLoader iterator draws its workers' seed; from the global generator that would make
    dropout after a resume (which restarts the stream) differ from an uninterrupted run."""
    ds = DenseDataset(Stripes(), (16, 24), AUG, seed=0, stream="src")
    for workers in (0, 1):
        torch.manual_seed(7)
        before = torch.get_rng_state()
        DenseStream(ds, 2, seed=0, device="cpu", num_workers=workers).next()
        assert torch.equal(torch.get_rng_state(), before)
