"""Test-only methods for the distributed and preemption tests (registered on demand, never shipped).

``test-mlp``: a one-optimizer classifier without batch norm (dropout optional, off by
default), so a run on 2 processes with batch B can be compared with one process with batch
2B: with no batch-coupled layer and no randomness the two compute the same mean gradient.

``test-gan``: a GAN-shaped method with three optimizer groups updated in turn, as PixelDA
does: D and T on a detached fake, then G through D and T (the G backward leaves gradients on
D and T that their next update discards). No batch norm, no noise, so 2 x B must equal
1 x 2B here too. Group G also owns ``U``, a network no loss uses: its gradient stays None
everywhere, so with weight decay on, a wrong zero gradient would move it.

``UDA_TEST_SIGNAL_AT=STEP:SIGNUM[:RANK]`` makes ``test-mlp`` raise a real signal in its own
process during step STEP (on every rank, or on RANK only): deterministic "kill it mid-run"
for the preemption tests. ``UDA_TEST_STEP_SLEEP`` (seconds) slows every step down.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from uda_cli.methods.base import Method, MethodConfig, OptimSpec
from uda_cli.methods.registry import _METHODS


def _nap() -> None:
    delay = float(os.environ.get("UDA_TEST_STEP_SLEEP", "0") or 0)
    if delay:
        time.sleep(delay)


def _maybe_signal(step: int) -> None:
    spec = os.environ.get("UDA_TEST_SIGNAL_AT")
    if not spec:
        return
    parts = [int(v) for v in spec.split(":")]
    at, signum = parts[0], parts[1]
    rank = parts[2] if len(parts) > 2 else None
    if step == at and (rank is None or rank == int(os.environ.get("RANK", "0"))):
        signal.raise_signal(signum)


class MLPForTests(Method):
    """Networks: F (flatten - fc 32 - tanh - dropout), C (fc 10)."""

    class Config(MethodConfig):
        steps: int = 20
        batch_size: int = 8
        optimizer: Literal["adam", "sgd"] = "sgd"
        lr: float = 0.05
        momentum: float = 0.9
        dropout: float = Field(0.0, ge=0, lt=1)

    def build(self):
        d = self.spec.channels * self.spec.image_size[0] * self.spec.image_size[1]
        return {"F": nn.Sequential(nn.Flatten(), nn.Linear(d, 32), nn.Tanh(), nn.Dropout(self.cfg.dropout)),
                "C": nn.Linear(32, self.spec.num_classes)}

    def train_step(self, batch, step):
        _nap()
        _maybe_signal(step)
        loss = F.cross_entropy(self.predict(batch["x_s"]), batch["y_s"])
        self.update("main", loss)
        return {"c/cls": loss.detach()}

    def predict(self, x):
        return self.nets["C"](self.nets["F"](x))

    def features(self, x):
        return self.nets["F"](x)


class GANForTests(Method):
    """Networks: G (image -> image), D (real/fake), T (task), U (unused, in G's group)."""

    class Config(MethodConfig):
        steps: int = 10
        batch_size: int = 8
        optimizer: Literal["adam", "sgd"] = "sgd"
        lr: float = 0.05
        momentum: float = 0.5
        weight_decay: float = 1e-2

    def build(self):
        c, (h, w) = self.spec.channels, self.spec.image_size
        return {
            "G": nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.Tanh()),
            "D": nn.Sequential(nn.Conv2d(c, 4, 4, stride=4), nn.LeakyReLU(0.2), nn.Flatten(),
                               nn.Linear(4 * (h // 4) * (w // 4), 1)),
            "T": nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, self.spec.num_classes)),
            "U": nn.Linear(3, 3),
        }

    def optimizers(self):
        return {"D": OptimSpec.from_config(self.cfg, ("D",)), "T": OptimSpec.from_config(self.cfg, ("T",)),
                "G": OptimSpec.from_config(self.cfg, ("G", "U"))}

    def train_step(self, batch, step):
        G, D, T = self.nets["G"], self.nets["D"], self.nets["T"]
        x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
        fake = G(x_s)
        d_real, d_fake = D(x_t), D(fake.detach())
        loss_d = (F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real))
                  + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        self.update("D", loss_d)
        loss_t = F.cross_entropy(T(x_s), y_s) + F.cross_entropy(T(fake.detach()), y_s)
        self.update("T", loss_t)
        g_logit = D(fake)
        loss_g = F.binary_cross_entropy_with_logits(g_logit, torch.ones_like(g_logit)) + F.cross_entropy(T(fake), y_s)
        self.update("G", loss_g)
        return {"d/adv": loss_d.detach(), "t/cls": loss_t.detach(), "g/adv": loss_g.detach()}

    def predict(self, x):
        return self.nets["T"](x)

    def features(self, x):
        return self.nets["T"][0](x)


TEST_METHODS = {"test-mlp": MLPForTests, "test-gan": GANForTests}


def register() -> None:
    for name, cls in TEST_METHODS.items():
        cls.name = name
        _METHODS.setdefault(name, cls)


def unregister() -> None:
    for name, cls in TEST_METHODS.items():
        if _METHODS.get(name) is cls:
            del _METHODS[name]
