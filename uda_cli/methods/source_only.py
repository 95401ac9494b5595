"""Source only: train on labelled source images, test on the target. The lower bound every
adaptation table starts from.

Objective: min_{F,C} E_(x_s,y_s) CE(C(F(x_s)), y_s). The target batch is drawn (so every
method sees the same data stream) but unused.

Defaults: Adam, lr 2e-4, betas (0.5, 0.999), weight decay 2.5e-5, batch 128 — the source
pre-training settings of ADDA (Tzeng et al. CVPR 2017), whose LeNet numbers (M->U 75.2,
U->M 57.1, S->M 60.1) are the published source-only baselines we compare with. 10,000 steps
(ADDA's source pre-training length for digits).
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
