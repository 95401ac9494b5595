"""TPLD: two-phase pseudo-label densification (Shin, Woo, Pan, Kweon, ECCV 2020, arXiv 2012.04828).

Built on CRST-MRKLD's rounds (``methods/crst.py``, ``methods/cbst.py``). TPLD has no public
code and its text could not be read here: every formula below follows the two secondary
write-ups collected in ``docs/methods/tpld.md`` and ``../shared/notes/segmentation-papers.md``,
and each open point is a hyperparameter whose default is an assumption, listed below.

After a source-only warm-up (or ``--init``), ``phase1_rounds`` then ``phase2_rounds`` rounds:

- **Phase 1** (each round): CBST labels (argmax p/lambda where it passes 1, TPLD Eq. 2), then
  sliding-window voting densification (TPLD Eq. 4, ``self_training.vote_densify_top2``): an
  unlabelled pixel's top-2 classes pool their confident neighbours' values in a
  ``vote_window`` square, mixed with its own p/lambda (alpha 0.7), and the pixel is labelled
  where the result passes 1; 3 iterations. Training: source CE + the bootstrapped target
  loss -sum_k [beta y_k + (1-beta) q_k] log p_k + 0.1 MRKLD.
- **Phase 2** (each round): the same labels, and per target image conf = (1/K')
  sum_k (N_k*/N_k)(1/lambda_k); the top ``easy_fraction`` (q = 0.3) are easy, the rest hard
  (``stats.json``: ``easy``, ``hard``). Easy images train on full pseudo-labels (labelled
  pixels one-hot, the rest (p/lambda)^gamma, gamma 2) with the bootstrapped loss and no
  source term; hard images get an intra-domain adversarial loss on entropy maps (ADVENT's
  discriminator, ``methods/advent.py``): D learns easy = 1 / hard = 0, F makes hard look easy
  (weight ``lambda_adv``).

Assumptions where the paper could not be read (each a hyperparameter):
- voting: ``vote_pooling="sum"`` of the confident neighbours' p/lambda, alpha on the pixel's
  own value, ``vote_window=3``: on one real round of the embedded digit scenes (cbst's round
  0, seed 0) windows 3 / 5 / 9 labelled 72 / 89 / 98 % of pixels at 96 / 92 / 90 % precision
  (43 % at 99 % before voting); mean pooling with alpha on the pool labelled nothing, and
  ``"confident"`` (the mean over the neighbours labelled in that class) under 1 % more. On
  those scenes every object is a thin stroke and voting lowers mIoU (docs/methods/tpld.md).
- bootstrapping: beta 0.95 (Reed et al.'s soft value), q = p/lambda renormalised, detached.
- full pseudo-labels renormalised over the classes; with the pass's top two only.
- phase 2 keeps the voting of phase 1 for its one-hot pixels; no MRKLD in phase 2.
- the adversarial weight 0.001 and ADVENT's D (Adam 1e-4, betas 0.9/0.99), IntraDA's values.
- rounds 6 + 3 (one AI-written summary), CRST's lr, batch and epochs per round.
Departures: everything CBST departs in (its docstring); for the digit scenes a smaller
schedule (2 + 1 rounds of 500 steps), ``lambda_adv`` 0.01 and ``ndf`` 32 (advent's measurement
on the scenes favoured 0.01; a 64-filter D is 8x the small network).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from uda_cli.errors import ConfigError
from uda_cli.methods import self_training as st
from uda_cli.methods.base import OptimSpec, RoundContext
from uda_cli.methods.cbst import CRST_RECIPE, SMALL_ROUNDS
from uda_cli.methods.crst import CRST, CRSTConfig
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import build_segmentation_net, segmentation_loss, upsample_to


class TPLDConfig(CRSTConfig):
    phase1_rounds: int = Field(6, ge=0, description="rounds of phase 1 (voting densification)")
    phase2_rounds: int = Field(3, ge=0, description="rounds of phase 2 (easy/hard split)")
    rounds: int = Field(9, ge=1, description="phase1_rounds + phase2_rounds (set those instead)")
    beta: float = Field(0.95, ge=0, le=1, description="bootstrapping: weight of the pseudo-label (Reed et al.)")
    vote_window: int = Field(3, gt=0, description="voting window (odd), at the size the round writes")
    vote_alpha: float = Field(0.7, ge=0, le=1, description="voting: weight of the pixel's own p/lambda")
    vote_iterations: int = Field(3, ge=0)
    vote_pooling: Literal["sum", "mean", "confident"] = "sum"
    vote_alpha_on: Literal["own", "pooled"] = "own"
    easy_fraction: float = Field(0.3, gt=0, lt=1, description="q: the share of target images that are easy")
    gamma: float = Field(2.0, gt=0, description="easy images' soft labels (p/lambda)^gamma")
    lambda_adv: float = Field(0.001, ge=0, description="hard images' adversarial weight (IntraDA/ADVENT)")
    d_lr: float = Field(1e-4, gt=0)
    d_betas: tuple[float, float] = (0.9, 0.99)
    ndf: int = Field(64, gt=0, description="the discriminator's first width")

    @model_validator(mode="after")
    def _rounds(self):
        if self.regularizer == "lrent":
            raise ValueError("tpld trains on hard (voted) pseudo-labels with crst's mrkld (or none); lrent's soft "
                             "labels are crst's: use --method crst --set regularizer=lrent")
        if self.vote_window % 2 == 0:
            raise ValueError(f"vote_window must be odd, not {self.vote_window}")
        total = self.phase1_rounds + self.phase2_rounds
        if "rounds" in self.model_fields_set and self.rounds != total:
            raise ValueError(f"rounds is phase1_rounds + phase2_rounds = {total}; set phase1_rounds and "
                             "phase2_rounds instead")
        if total < 1:
            raise ValueError("phase1_rounds + phase2_rounds must be at least 1")
        self.__dict__["rounds"] = total  # recorded as it is (no re-validation: validate_assignment would loop)
        return self


SMALL_TPLD = {"phase1_rounds": 2, "phase2_rounds": 1, "rounds": 3, "round_steps": SMALL_ROUNDS["round_steps"],
              "lambda_adv": 0.01, "ndf": 32}


@register_method("tpld")
class TPLD(CRST):
    """Networks: F (the segmentation network), D (the entropy discriminator of phase 2)."""

    Config = TPLDConfig
    tasks = {"segmentation"}

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        base = super().task_defaults(task, domains)
        if not base:
            return base
        base.pop("rounds", None)
        if base.get("model") == "deeplabv2_small":
            return {**base, **SMALL_TPLD}
        return {**base, "round_steps": CRST_RECIPE["round_steps"]}

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.easy_hard: tuple[list[str], list[str]] | None = None

    def build(self):
        from uda_cli.models.discriminators import EntropyDiscriminator

        return {"F": build_segmentation_net(self.cfg, self.spec),
                "D": EntropyDiscriminator(self.spec.num_classes, ndf=self.cfg.ndf)}

    def optimizers(self):
        return {"main": OptimSpec.from_config(self.cfg, ("F",)),
                "D": OptimSpec(nets=("D",), kind="adam", lr=self.cfg.d_lr, betas=tuple(self.cfg.d_betas))}

    def phase(self, round_index: int) -> int:
        return 1 if round_index < self.cfg.phase1_rounds else 2

    # ---- the round's files -------------------------------------------------------------------
    def select(self, classes, probs, lam, round_index=0):
        idx = torch.from_numpy(classes[:2].astype(np.int64))[None]
        p = torch.from_numpy(probs[:2].astype(np.float32))[None]
        labels, _ = st.select_labels_top2(idx, p, lam)
        if self.cfg.vote_iterations:
            labels = st.vote_densify_top2(idx, p, lam, labels, self.spec.num_classes, window=self.cfg.vote_window,
                                          alpha=self.cfg.vote_alpha, iterations=self.cfg.vote_iterations,
                                          pooling=self.cfg.vote_pooling, alpha_on=self.cfg.vote_alpha_on)
        return labels[0].to(torch.uint8).numpy()

    def image_stats(self, lam, round_index):
        k = self.spec.num_classes

        def stats(stem, classes, probs, labels):
            top1 = torch.from_numpy(classes[0].astype(np.int64))
            before, _ = st.select_labels_top2(torch.from_numpy(classes[:2].astype(np.int64))[None],
                                              torch.from_numpy(probs[:2].astype(np.float32))[None], lam)
            return {"conf": float(st.image_confidence(torch.from_numpy(probs[0].astype(np.float32)), top1, lam, k)),
                    "labelled_before_voting": int((before != 255).sum()),
                    "labelled_after_voting": int((labels != 255).sum()), "pixels": int(labels.size)}

        return stats

    def after_select(self, ctx: RoundContext, files, stats: dict[str, Any]) -> None:
        from uda_cli.engine import rounds as R

        if ctx.dist is not None and not ctx.dist.is_main:
            return
        per = stats["per_image"]
        pixels = max(sum(v["pixels"] for v in per.values()), 1)
        stats["labelled_before_voting"] = sum(v["labelled_before_voting"] for v in per.values()) / pixels
        stats["labelled_after_voting"] = sum(v["labelled_after_voting"] for v in per.values()) / pixels
        stats["phase"] = self.phase(ctx.round_index)
        if stats["phase"] == 2:
            easy, hard = st.easy_hard_split({s: v["conf"] for s, v in per.items()}, self.cfg.easy_fraction)
            stats["easy"], stats["hard"] = easy, hard
        R.write_json(files.stats, stats)
        ctx.info(f"round {ctx.round_index} (phase {stats['phase']}): {100 * stats['labelled_before_voting']:.1f}% "
                 f"of target pixels labelled before voting, {100 * stats['labelled_after_voting']:.1f}% after"
                 + (f"; {len(stats['easy'])} easy / {len(stats['hard'])} hard images" if stats["phase"] == 2 else ""))

    def set_streams(self, ctx: RoundContext, files) -> None:
        import json

        from uda_cli.data.dense import SubsetSource
        from uda_cli.engine import rounds as R

        if self.phase(ctx.round_index) == 1:
            ctx.set_target(R.PseudoLabelSource(ctx.target, files, size=ctx.size))
            return
        stats = json.loads(files.stats.read_text())
        where = {ctx.target.stem(i): i for i in range(len(ctx.target))}
        try:
            easy, hard = [where[s] for s in stats["easy"]], [where[s] for s in stats["hard"]]
        except KeyError as e:
            raise ConfigError(f"{files.stats} names an image the target does not have ({e}); delete the round's "
                              "folder and resume to write it again") from None
        if not easy or not hard:
            raise ConfigError(f"round {ctx.round_index}: {len(easy)} easy and {len(hard)} hard target images; phase 2 "
                              "needs both (more target images, or another easy_fraction)")
        ctx.set_target(R.PseudoLabelSource(ctx.target, files, indices=easy, size=ctx.size, topk=2))
        ctx.set_target(SubsetSource(ctx.target, hard, f"{ctx.target.name} hard"), "hard")

    # ---- a step ----------------------------------------------------------------------------------
    def target_loss(self, logits, batch):
        labels = batch["y_t"]
        up = upsample_to(logits, labels).float()
        loss = st.bootstrapped_ce(up, labels, self.lam.to(up.device), beta=self.cfg.beta)
        if self.cfg.regularizer == "mrkld" and self.cfg.reg_weight > 0:
            loss = loss + self.cfg.reg_weight * st.mrkld(up, labels != 255)
        return loss

    def train_step(self, batch, step):
        if "x_hard" not in batch:  # warm-up and phase 1: CRST's step with the bootstrapped target term
            return super().train_step(batch, step)
        from uda_cli.methods.advent import entropy_map

        f, d, k = self.nets["F"], self.nets["D"], self.spec.num_classes
        lam = self.lam.to(batch["x_t"].device)
        # Easy images: full pseudo-labels, bootstrapped, no source term.
        labels = batch["y_t"]
        logits_e = upsample_to(f(batch["x_t"]), labels).float()
        top2 = batch["topk_t"]
        valid = top2 < k  # padding carries 255
        prob = st.scatter_top2(top2.clamp(max=k - 1), batch["topkp_t"] * valid, k)
        targets = st.full_pseudo_labels(prob, lam, labels, gamma=self.cfg.gamma)
        loss_easy = st.bootstrapped_soft_ce(logits_e, targets, lam, beta=self.cfg.beta)
        # Hard images: make their entropy maps look easy to D (whose gradients are not applied here).
        x_h = batch["x_hard"]
        logits_h = F.interpolate(f(x_h), size=x_h.shape[-2:], mode="bilinear", align_corners=True).float()
        ent_h = entropy_map(logits_h)
        out_h = d(ent_h)
        loss_adv = F.binary_cross_entropy_with_logits(out_h, torch.ones_like(out_h))
        self.update("main", loss_easy + self.cfg.lambda_adv * loss_adv)
        # D: easy = 1, hard = 0, on detached maps.
        ent_e = entropy_map(logits_e.detach())
        out_e, out_h = d(ent_e), d(ent_h.detach())
        loss_d = (F.binary_cross_entropy_with_logits(out_e, torch.ones_like(out_e))
                  + F.binary_cross_entropy_with_logits(out_h, torch.zeros_like(out_h))) / 2
        self.update("D", loss_d)
        return {"c/easy": loss_easy.detach(), "f/adv": loss_adv.detach(), "d/adv": loss_d.detach()}

    @classmethod
    def derived_steps(cls, cfg) -> int:
        return cfg.warmup_steps + (cfg.phase1_rounds + cfg.phase2_rounds) * cfg.round_steps

    def round_starts(self, total_steps: int) -> list[int]:
        n = self.cfg.phase1_rounds + self.cfg.phase2_rounds
        return [self.cfg.warmup_steps + r * self.cfg.round_steps for r in range(n)]
