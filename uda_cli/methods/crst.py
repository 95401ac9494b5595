"""CRST: confidence-regularised self-training (Zou, Yu, Liu, Kumar, Wang, ICCV 2019).

CBST's rounds (``methods/cbst.py``) with a confidence regulariser on the target term. The
model regulariser MRKLD (CRST's best GTA5 row, and TPLD's base) adds

    reg_weight * ( -(1/K) sum_k log p_k )   on the labelled target pixels   (weight 0.1)

to the pseudo-label cross-entropy: KL(uniform || p) + log K, a pull towards less
overconfident predictions (``self_training.mrkld``; CRST ``mrkld.sh``: ``--mr-weight-kld 0.1``,
source weight 0).

The label regulariser LRENT (``regularizer=lrent``, CRST ``lrent.sh``: ``--lr-weight-ent
0.25``) replaces the one-hot pseudo-labels by soft ones, q = normalise_k((p_k/lambda_k)^(1/alpha)),
alpha = ``reg_weight`` (0.25), kept where CRST's rule keeps them (sum_k -q log p + alpha q log q
< sum_k -q log lambda, ``self_training.lrent_targets``), and trains with -sum_k q_k log p_k on
the kept pixels (the negative-entropy term is a constant of the model once q is fixed).
``rounds/NN/labels`` holds argmax q where kept (for inspection and the statistics); the soft
labels are recomputed in each batch from the pass's top-k file and lambda.

Departures, one line each:
- LRENT's q spreads over the pass's ``lrent_topk`` = 3 most probable classes (the rest of the
  mass is unknown and taken as 0; with the power 1/alpha = 4 a fourth class weighs < 1e-4 of
  q wherever p_4 <= p_3 / 10 at equal lambda), and the probabilities are stored as uint8/255.
- the stored labels are CRST's hard labels on the kept pixels; CRST writes q as a .npy of K
  float32 maps per image (159 MB at 2048x1024).
- everything CBST departs in (see its docstring).

Classification domains (``uda train --method crst --src mnist --tgt mnistm --set
regularizer=mrkld``): CBST's per-image rounds (``methods/cbst.py``), each image a 1x1 map, so
the target term above applies unchanged over the labelled images of the batch: mrkld adds
reg_weight x their mean -(1/K) sum_k log p_k; lrent keeps the images CRST's rule keeps and trains
the soft CE against normalise((p/lambda)^(1/alpha)) over all K classes, recomputed from the
round's ``probs.npy``. Departures, one line each:
- lrent's soft labels use all K probabilities (no top-k cut), stored as float16.
- everything CBST's classification version departs in (see its docstring).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from uda_cli.methods import self_training as st
from uda_cli.methods.cbst import CBST, SelfTrainingConfig
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import segmentation_loss, upsample_to


class CRSTConfig(SelfTrainingConfig):
    regularizer: Literal["mrkld", "lrent", "none"] = Field(
        "mrkld", description="mrkld: -(1/K) sum log p on labelled target pixels (CRST's best); lrent: soft "
                             "pseudo-labels normalise((p/lambda)^(1/reg_weight)) and CRST's selection rule")
    reg_weight: float | None = Field(None, ge=0, description="the regulariser's weight: mrkld 0.1 (mrkld.sh), "
                                                             "lrent's alpha 0.25 (lrent.sh)")
    lrent_topk: int = Field(3, ge=2, description="lrent: classes per pixel the pass keeps for the soft labels")

    @model_validator(mode="after")
    def _weight(self):
        if self.reg_weight is None:  # recorded as resolved (no re-validation: validate_assignment would loop)
            self.__dict__["reg_weight"] = {"mrkld": 0.1, "lrent": 0.25, "none": 0.0}[self.regularizer]
        if self.regularizer == "lrent" and self.reg_weight <= 0:
            raise ValueError("lrent's reg_weight is its alpha, the power 1/alpha of its soft labels: it must be > 0")
        return self


@register_method("crst")
class CRST(CBST):
    """Networks: F (the segmentation network); on digits F (encoder) and C (classifier)."""

    Config = CRSTConfig
    tasks = {"segmentation", "classification"}

    @property
    def topk(self) -> int:  # classes per pixel the pass keeps
        return min(self.cfg.lrent_topk, self.spec.num_classes) if self.lrent else 2

    @property
    def lrent(self) -> bool:
        return self.cfg.regularizer == "lrent"

    @property
    def soft_targets(self) -> bool:  # classification: lrent's loss reads the pass's probabilities
        return self.lrent

    def select_images(self, prob, lam):
        if not self.lrent:
            return super().select_images(prob, lam)
        k = prob.shape[1]
        idx = torch.arange(k, device=prob.device).view(1, k, 1, 1).expand(len(prob), k, 1, 1)
        soft, keep = self.soft_labels(idx, prob[:, :, None, None], lam.to(prob.device))
        return torch.where(keep, soft.argmax(1), torch.full_like(keep, 255, dtype=torch.int64))[:, 0, 0]

    def select(self, classes, probs, lam, round_index=0):
        if not self.lrent:
            return super().select(classes, probs, lam, round_index)
        idx = torch.from_numpy(classes.astype(np.int64))[None]
        p = torch.from_numpy(probs.astype(np.float32))[None]
        soft, keep = self.soft_labels(idx, p, lam.cpu())
        labels = torch.where(keep, idx.gather(1, soft.argmax(1, keepdim=True)).squeeze(1),
                             torch.full_like(idx[:, 0], 255))
        return labels[0].to(torch.uint8).numpy()

    def soft_labels(self, idx, prob, lam):
        """LRENT's soft labels over the pass's top-k classes ``idx``/``prob`` [B, k, H, W] and which
        pixels keep them (``self_training.lrent_targets`` on those k classes; the rest has p = 0)."""
        return st.lrent_targets(prob.clamp(min=1e-12), lam[idx.clamp(max=len(lam) - 1)].float(),
                                alpha=self.cfg.reg_weight)

    def set_streams(self, ctx, files) -> None:
        if not self.lrent:
            return super().set_streams(ctx, files)
        from uda_cli.engine import rounds as R

        ctx.set_target(R.PseudoLabelSource(ctx.target, files, size=ctx.size, topk=self.topk))

    def target_loss(self, logits, batch):
        labels = batch["y_t"]
        if self.lrent:
            k = self.spec.num_classes
            up = upsample_to(logits, labels).float()
            idx = batch["topk_t"]
            valid = idx < k  # padding carries 255
            soft, _ = self.soft_labels(idx.clamp(max=k - 1), batch["topkp_t"] * valid, self.lam.to(up.device))
            targets = st.scatter_top2(idx.clamp(max=k - 1), soft * valid, k)
            targets = targets * (labels != 255).unsqueeze(1)  # the pass's selection (CRST: all-zero labels)
            return st.soft_ce(up, targets)
        loss = segmentation_loss(logits, labels)
        if self.cfg.regularizer == "mrkld" and self.cfg.reg_weight > 0:
            loss = loss + self.cfg.reg_weight * st.mrkld(upsample_to(logits, labels).float(), labels != 255)
        return loss
