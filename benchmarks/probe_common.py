"""Pieces the probes (``dtn_probe.py``, ``translation_probe.py``) share: a per-call cache of
loaded domains, chunked class predictions, and the loop that fits a probe's own classifier.

The probes train classifiers outside the shared core on purpose: a few thousand plain
cross-entropy steps on tensors already in memory, with no checkpoint, log or resume.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from uda_cli.data.augment import random_affine
from uda_cli.data.registry import load_domain, parse_domain


class Domains:
    """``load_domain`` once per (domain, split, root, channels, size) in one probe call: several
    runs or checkpoints of one pair read their data once. A domain text without a split
    (``mnist``) takes ``default_split``; one with it (``mnist:test``) keeps its own."""

    def __init__(self):
        self._loaded: dict[tuple, tuple] = {}

    def __call__(self, text: str, default_split: str, root, channels: int, size=None):
        name, split = parse_domain(text)
        key = (name, split or default_split, str(root), channels, tuple(size) if size else None)
        if key not in self._loaded:
            kw = {"size": tuple(size)} if size else {}
            self._loaded[key] = load_domain(name, split or default_split, root, channels=channels, **kw)
        return self._loaded[key]


def predict(fn: Callable, x: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Class predictions of ``fn`` (logits) over ``x``, ``chunk`` images at a time, no grad."""
    with torch.no_grad():
        return torch.cat([fn(x[i : i + chunk]).argmax(1) for i in range(0, len(x), chunk)])


def fit_classifier(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int,
                   opt: torch.optim.Optimizer, prepare: Callable = lambda b: b, augment: bool = True) -> None:
    """``steps`` Adam-or-other steps of cross-entropy on random batches of (x, y), each batch
    through ``prepare`` (e.g. ``normalize`` for raw images) and then, with ``augment``, the
    house random shift/rotation. Leaves ``net`` in eval mode. Seed the global RNG first."""
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        xb = prepare(x[idx])
        loss = F.cross_entropy(net(random_affine(xb) if augment else xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
