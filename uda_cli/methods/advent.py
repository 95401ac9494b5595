"""ADVENT: Vu, Jain, Bucher, Cord, Pérez, "ADVENT: Adversarial Entropy Minimization for Domain
Adaptation in Semantic Segmentation", CVPR 2019 (valeoai/ADVENT). Segmentation only. What was
measured behind the choices below: docs/methods/advent.md.

A segmentation network F is trained on labelled source images and made to give target images
confident (low-entropy) predictions, in one of two ways (``variant``):

- ``"advent"`` (default): a discriminator D reads the weighted self-information map
  I(x) = -p log p / log K (per class, :func:`entropy_map`) of F's softmax and tells source
  (label 0) from target (label 1); F is trained so that D reads its target maps as source.
  With d_s = D(I(x_s)), d_t = D(I(x_t)) and BCE-with-logits against constant maps:

      min_F  L_seg(x_s, y_s) + lambda_adv BCE(D(I(x_t)), 0)
      min_D  [BCE(D(I(x_s)), 0) + BCE(D(I(x_t)), 1)] / 2      (on detached maps)

- ``"minent"``: no D; F minimises the target's mean normalised entropy directly,
  min_F L_seg + lambda_ent mean_pixels sum_k I_k(x_t).

Multi-level (``multi_level``): DeepLab-v2's second ASPP head on layer3 ("aux") gets its own
source CE (weight 0.1), its own entropy term (lambda 0.0002) and, in ``"advent"``, its own
discriminator D_aux; the main head's weights are 1.0 and 0.001. Predictions (``predict``,
evaluation) use the main head only, as ADVENT's test does.

One iteration, in ADVENT's order (``train_advent``): (a) source CE on F; (b) the target's
adversarial (or entropy) term, D not updated; F steps once on (a) + (b); (c) D on the detached
source and target maps, each BCE halved, D steps. D's step sees the maps F made before its own
step, as in ADVENT where all optimisers step at the end of the iteration. Entropy maps are
computed from the softmax of logits upsampled (bilinear, align_corners=True) to the input
size, as ADVENT does, and the source CE reads those same upsampled logits.

Defaults (ADVENT's ``config.py`` and ``advent.yml``): F by SGD lr 2.5e-4 (10x on the heads),
momentum 0.9, weight decay 5e-4, poly 0.9, batch 1 + 1, 120,000 steps (ADVENT's EARLY_STOP);
D (and D_aux) by Adam lr 1e-4, betas (0.9, 0.99), the same schedule as F, no weight decay;
lambda_seg 1.0 / 0.1, lambda_adv 0.001 / 0.0002, lambda_ent 0.001 / 0.0002 (main / aux);
D: :class:`~uda_cli.models.discriminators.EntropyDiscriminator` with ndf 64.

Departures, each on purpose:
- multi_level "auto" is ADVENT's MULTI_LEVEL=True on deeplabv2_r101, and off on networks
  with no aux head (deeplabv2_small, fcn8s_vgg16); asking for it there is a one-line error.
- Poly decays to 0 over the run's steps; ADVENT's decays over MAX_ITERS 250,000 and stops at
  120,000 (lr then ~0.55x base), as source-only's DeepLab recipe does here.
- deeplabv2_r101's batch norm is frozen (running statistics too, CRST's recipe); ADVENT runs
  ``model.train()``, so its running statistics follow batches of one.
- Source and target pass through F separately, as in ADVENT; on deeplabv2_small (trainable
  batch norm) each batch is then normalised with its own statistics, and the running
  statistics used at test time follow both domains (a source-only run's follow the source).
- Digit scenes (``deeplabv2_small``): source-only's CPU recipe (Adam 1e-3 on F, batch 16,
  1,500 steps, no pretrained weights) with ``SMALL_LAMBDAS`` (lambda_adv 0.01, ten times the
  paper's, for a 0.33 M network trained from scratch); D keeps ADVENT's Adam settings.
- The reported number is the final checkpoint's, never the best snapshot on the target's
  test set (ADVENT's TEST.MODE "best").
- Logged losses are unweighted: "c/seg" (and "c/seg_aux"), "f/adv" (BCE of D on the target
  map against label 0) or "f/ent" (the target's mean normalised entropy), "d/adv" (D's
  halved source + target BCE), each with an "_aux" twin in multi-level runs.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from uda_cli.errors import ConfigError
from uda_cli.methods.base import Method, OptimSpec
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import (
    DEEPLAB_RECIPE,
    SegmentationConfig,
    build_segmentation_net,
    segmentation_defaults,
    segmentation_loss,
    segmentation_net_name,
)
from uda_cli.models.discriminators import EntropyDiscriminator

# The digit scenes (deeplabv2_small): lambda_adv 0.01 read above the paper's 0.001 and above
# source-only at 1,000 steps (one seed, docs/methods/advent.md); minent keeps the paper's
# lambda_ent (not measured there).
SMALL_LAMBDAS: dict[str, float] = {"lambda_adv": 0.01}


def entropy_map(logits_or_prob: torch.Tensor, *, probs: bool = False) -> torch.Tensor:
    """ADVENT's weighted self-information map, ``[B, K, H, W]`` -> ``[B, K, H, W]``:
    I_k = -p_k log(p_k + 1e-30) / log K, with p the softmax over dim 1 of logits (or the
    given probabilities with ``probs=True``). Summed over k it is the entropy normalised to
    [0, 1] (1 for a uniform p, 0 for a one-hot p). ADVENT writes it in log2 / log2 K: the same
    value. Computed in float32."""
    x = logits_or_prob.float()
    k = x.shape[1]
    if k < 2:
        raise ValueError(f"entropy_map needs at least 2 classes along dim 1, got shape {tuple(x.shape)}")
    p = x if probs else x.softmax(dim=1)
    return -p * torch.log(p + 1e-30) / math.log(k)


def _bce(logits: torch.Tensor, label: float) -> torch.Tensor:
    """BCE-with-logits of a D output map against a constant label (0 source, 1 target)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, label, dtype=torch.float32))


@register_method("advent")
class Advent(Method):
    """Networks: F (segmentation net); D (entropy discriminator, main head) and D_aux (aux
    head, multi-level) in the "advent" variant."""

    class Config(SegmentationConfig):
        variant: Literal["advent", "minent"] = Field(
            "advent", description="advent: adversarial training on entropy maps; minent: entropy minimisation")
        steps: int = Field(DEEPLAB_RECIPE["steps"], gt=0, description="ADVENT's EARLY_STOP")
        batch_size: int = Field(DEEPLAB_RECIPE["batch_size"], gt=0)
        optimizer: Literal["adam", "sgd"] = DEEPLAB_RECIPE["optimizer"]
        lr: float = DEEPLAB_RECIPE["lr"]
        momentum: float = DEEPLAB_RECIPE["momentum"]
        weight_decay: float = DEEPLAB_RECIPE["weight_decay"]
        lr_schedule: Literal["constant", "step", "inv", "poly"] = DEEPLAB_RECIPE["lr_schedule"]
        multi_level: Literal["auto"] | bool = Field(
            "auto", description="second (aux) head on layer3 with its own losses and D; auto: on where the "
                                "network has one (deeplabv2_r101), off otherwise")
        lambda_seg: float = Field(1.0, ge=0, description="weight of the main head's source CE")
        lambda_seg_aux: float = Field(0.1, ge=0, description="weight of the aux head's source CE")
        lambda_adv: float = Field(0.001, ge=0, description="weight of F's adversarial loss, main head")
        lambda_adv_aux: float = Field(0.0002, ge=0, description="weight of F's adversarial loss, aux head")
        lambda_ent: float = Field(0.001, ge=0, description="minent: weight of the target entropy, main head")
        lambda_ent_aux: float = Field(0.0002, ge=0, description="minent: weight of the target entropy, aux head")
        d_lr: float = Field(1e-4, gt=0, description="D's Adam learning rate (its schedule is F's)")
        d_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
            (0.9, 0.99), description="D's Adam betas")
        ndf: int = Field(64, gt=0, description="D's first width (64, 128, 256, 512 then 1)")

    tasks = {"segmentation"}

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        if task != "segmentation":
            return {}
        d = segmentation_defaults(domains)
        if d.get("model") == "deeplabv2_small":
            d.update(SMALL_LAMBDAS)
        return d

    # ---- networks ---------------------------------------------------------------------
    @property
    def multi_level(self) -> bool:
        """Whether F has the aux head: the config's choice, auto meaning "where it can"."""
        from uda_cli.models.registry import model_entry

        name = segmentation_net_name(self.cfg)
        able = "multi_level" in model_entry(name).options
        if self.cfg.multi_level == "auto":
            return able
        if self.cfg.multi_level and not able:
            raise ConfigError(f"advent: {name} has no aux head for multi_level; use --set multi_level=false "
                              "or --set model=deeplabv2_r101")
        return bool(self.cfg.multi_level)

    def build(self):
        ml = self.multi_level
        nets = {"F": build_segmentation_net(self.cfg, self.spec, **({"multi_level": True} if ml else {}))}
        if self.cfg.variant == "advent":
            k = self.spec.num_classes
            nets["D"] = EntropyDiscriminator(k, self.cfg.ndf)
            if ml:
                nets["D_aux"] = EntropyDiscriminator(k, self.cfg.ndf)
        return nets

    def optimizers(self):
        groups = {"F": OptimSpec.from_config(self.cfg, ("F",))}
        if self.cfg.variant == "advent":
            d_nets = ("D", "D_aux") if "D_aux" in self.nets else ("D",)
            # Adam is per parameter: one group over D and D_aux is ADVENT's two optimisers.
            groups["D"] = OptimSpec.from_config(self.cfg, d_nets, kind="adam", lr=self.cfg.d_lr,
                                                betas=tuple(self.cfg.d_betas), weight_decay=0.0)
        return groups

    # ---- one step ---------------------------------------------------------------------
    def _levels(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """F's logits per level ("main", and "aux" when multi-level), upsampled to x's size."""
        out = self.nets["F"].forward_multi(x)
        size = x.shape[-2:]
        return {lvl: (v if v.shape[-2:] == size else F.interpolate(v, size=size, mode="bilinear", align_corners=True))
                for lvl, v in out.items()}

    def train_step(self, batch, step):
        cfg = self.cfg
        x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
        sfx = {"main": "", "aux": "_aux"}
        w_seg = {"main": cfg.lambda_seg, "aux": cfg.lambda_seg_aux}
        losses: dict[str, torch.Tensor] = {}

        # (a) source CE on every level
        out_s = self._levels(x_s)
        loss_f = 0.0
        for lvl, logits in out_s.items():
            ce = segmentation_loss(logits, y_s)
            losses["c/seg" + sfx[lvl]] = ce.detach()
            loss_f = loss_f + w_seg[lvl] * ce

        # (b) target: entropy maps, fooled D (its weights are not in F's group) or their mean
        out_t = self._levels(x_t)
        ent_t = {lvl: entropy_map(v) for lvl, v in out_t.items()}
        if cfg.variant == "minent":
            w_ent = {"main": cfg.lambda_ent, "aux": cfg.lambda_ent_aux}
            for lvl, e in ent_t.items():
                ent = e.sum(1).mean()  # ADVENT's entropy_loss: the mean normalised entropy per pixel
                losses["f/ent" + sfx[lvl]] = ent.detach()
                loss_f = loss_f + w_ent[lvl] * ent
            self.update("F", loss_f)
            return losses

        d_net = {"main": self.nets["D"], "aux": self.nets["D_aux"] if "D_aux" in self.nets else None}
        w_adv = {"main": cfg.lambda_adv, "aux": cfg.lambda_adv_aux}
        for lvl, e in ent_t.items():
            adv = _bce(d_net[lvl](e), 0.0)  # target maps read as source
            losses["f/adv" + sfx[lvl]] = adv.detach()
            loss_f = loss_f + w_adv[lvl] * adv
        self.update("F", loss_f)

        # (c) D on detached maps: source 0, target 1, each halved
        loss_d = 0.0
        for lvl in ent_t:
            d = d_net[lvl]
            ld = (_bce(d(entropy_map(out_s[lvl].detach())), 0.0) + _bce(d(ent_t[lvl].detach()), 1.0)) / 2
            losses["d/adv" + sfx[lvl]] = ld.detach()
            loss_d = loss_d + ld
        self.update("D", loss_d)
        return losses

    def predict(self, x):
        return self.nets["F"](x)  # the main head: ADVENT evaluates it alone

    def features(self, x):
        return self.nets["F"].features(x)
