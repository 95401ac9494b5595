"""The pseudo-label pass (engine/rounds.predict_pass) holds one batch of probabilities at a
time, never the split's: the number of probability maps alive at once is the same for 50 and
500 images, and its thresholds equal those of the stored files."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch

from uda_cli.data.dense import DenseSource
from uda_cli.engine import rounds as R
from uda_cli.methods import self_training as st


class Noise(DenseSource):
    """``n`` random 12x16 images, no labels."""

    labelled = False

    def __init__(self, n: int):
        self.n, self.name = n, f"noise{n}:train"

    def __len__(self) -> int:
        return self.n

    def stem(self, i: int) -> str:
        return f"im{i:04d}"

    def read(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8, generator=g), None


class Tiny:
    """A 1x1 convolution to 5 classes, with the method interface the pass uses."""

    def __init__(self):
        torch.manual_seed(0)
        self.nets = torch.nn.ModuleDict({"F": torch.nn.Conv2d(3, 5, 1)})

    def eval(self):
        self.nets.eval()

    def train(self, mode: bool = True):
        self.nets.train(mode)

    def predict(self, x):
        return self.nets["F"](x) * 4


def run_pass(n: int, folder, monkeypatch) -> tuple[int, torch.Tensor]:
    """(most probability maps alive at once, histograms) of a pass over ``n`` images."""
    alive, most = [0], [0]
    original = R.predict_logits

    def counted(*args, **kwargs):
        out = original(*args, **kwargs)
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(out, lambda: alive.__setitem__(0, alive[0] - 1))
        return out

    monkeypatch.setattr(R, "predict_logits", counted)
    files = R.RoundFiles(folder, 0)
    files.folder.mkdir(parents=True)
    (files.folder / "pred").mkdir()
    (files.folder / "labels").mkdir()
    hist = R.predict_pass(Tiny(), Noise(n), (12, 16), files, contextlib.nullcontext, None, topk=2,
                          accumulate=lambda pm, pred: st.class_histograms(pm, pred, 5), flip=True, batch_size=4,
                          device=torch.device("cpu"))
    return most[0], hist


@pytest.mark.parametrize("n", [50, 500])
def test_the_pass_never_holds_the_splits_probabilities(n, tmp_path, monkeypatch):
    most, hist = run_pass(n, tmp_path / "run", monkeypatch)
    # one batch's map, and the next while the previous is being replaced; holding the split's
    # maps would keep ceil(n / 4) of them alive
    assert most <= 2, f"{most} probability maps of {n} images alive at once"
    assert int(hist.sum()) == n * 12 * 16  # every pixel of every image counted once
    # the thresholds from the pass's histograms are those of its stored top-1 files
    files = R.RoundFiles(tmp_path / "run", 0)
    stored = [R.read_pred(files.pred(f"im{i:04d}")) for i in range(n)]
    pm = torch.cat([torch.from_numpy(p[0].astype("float32")).flatten() for _, p in stored])
    pred = torch.cat([torch.from_numpy(c[0].astype("int64")).flatten() for c, _ in stored])
    assert torch.equal(st.thresholds(hist, 0.3), st.thresholds(st.class_histograms(pm, pred, 5), 0.3))
