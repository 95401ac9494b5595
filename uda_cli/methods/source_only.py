"""Source only: train on labelled source images, test on the target. The lower bound every
adaptation table starts from.

Objective: min_{F,C} E_(x_s,y_s) CE(C(F(x_s)), y_s). The target batch is drawn (so every
method sees the same data stream) but unused.

Defaults: Adam, lr 2e-4, betas (0.5, 0.999) (pytorch-adda's values), weight decay 2.5e-5
(the L2 weight of ADDA's LeNet), batch 128. ADDA's released scripts (Tzeng et al. CVPR 2017,
whose LeNet numbers M->U 75.2, U->M 57.1, S->M 60.1 are the published source-only baselines)
pre-train for 10,000 iterations at batch 128 with Adam lr 1e-3. We default to 2,000 steps:
on the 2,000-image ADDA subset that is 128 epochs, the training loss is ~0.01, and it already
reaches the published M->U number (measured 74.6-76.8% over seeds, benchmarks/digits.py
--budget cpu), while the first run on a laptop takes minutes instead of most of an hour.
``--steps 10000`` (the benchmark's ``paper`` budget) gives ADDA's length.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from pydantic import Field

from uda_cli.methods.base import Method, MethodConfig
from uda_cli.methods.registry import register_method
from uda_cli.models.digits import digit_backbone


@register_method("source-only")
class SourceOnly(Method):
    """Networks: F (encoder), C (classifier)."""

    class Config(MethodConfig):
        steps: int = Field(2_000, gt=0, description="see the docstring: ADDA's scripts use 10,000")
        backbone: Literal["auto", "lenet", "svhn"] = Field(
            "auto", description="auto: the DANN SVHN network when SVHN is involved, else LeNet"
        )
        weight_decay: float = 2.5e-5

    def build(self):
        f, c = digit_backbone(self.cfg.backbone, self.spec.channels, self.spec.num_classes, self.spec.domains)
        return {"F": f, "C": c}

    def train_step(self, batch, step):
        loss = F.cross_entropy(self.nets["C"](self.nets["F"](batch["x_s"])), batch["y_s"])
        self.update("main", loss)
        return {"c/cls": loss.detach()}

    def predict(self, x):
        return self.nets["C"](self.nets["F"](x))

    def features(self, x):
        return self.nets["F"](x)
