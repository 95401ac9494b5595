"""Pieces the probes (``dtn_probe.py``, ``translation_probe.py``, ``i2i_decoder_probe.py``)
share: loading a run of one method, a per-call cache of loaded domains, chunked class
predictions, re-initialising a network, and the loop that fits a probe's own network.

The probes train networks outside the shared core on purpose: a few thousand plain steps of
one loss on tensors already in memory, with no checkpoint, log or resume.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from uda_cli.data.augment import random_affine
from uda_cli.data.registry import load_domain, parse_domain
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import trainer
from uda_cli.errors import CheckpointError


def load_run(run, method_name: str):
    """(method on the CPU, metadata) of a run folder or checkpoint file written by
    ``method_name``. Another method's run is refused from its metadata, before its weights
    load, with a one-line :class:`CheckpointError`."""
    weights = ckpt.resolve_checkpoint(run)
    meta = ckpt.read_metadata(weights)
    if meta["method"] != method_name:
        raise CheckpointError(f"it is a {meta['method']} run; this probe reads {method_name} runs")
    return trainer.load_method(weights, torch.device("cpu"))  # looked up at call time: tests patch it


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


def reinitialised(net: torch.nn.Module) -> torch.nn.Module:
    """``net`` with every layer's parameters drawn afresh (``reset_parameters``), in place:
    the same architecture, untrained. Seed the global RNG first."""
    for m in net.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return net


def fit(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch: int,
        opt: torch.optim.Optimizer, prepare: Callable = lambda b: b, augment: bool = True,
        loss_fn: Callable = F.cross_entropy) -> None:
    """``steps`` optimizer steps of ``loss_fn(net(x_b), y_b)`` (cross-entropy: a classifier) on
    random batches of (x, y), each input batch through ``prepare`` (e.g. ``normalize`` for raw
    images) and then, with ``augment``, the house random shift/rotation. Leaves ``net`` in
    eval mode. Seed the global RNG first."""
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        xb = prepare(x[idx])
        loss = loss_fn(net(random_affine(xb) if augment else xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
