"""CBST: class-balanced self-training (Zou, Yu, Kumar, Wang, ECCV 2018), as CRST's code runs it.

A run is a source-only warm-up and then rounds. Each round begins with a pseudo-label pass
over the target's training images (``engine/rounds.py``): per class k, lambda_k is the
confidence at the top ``portion`` of the pixels predicted as k (histograms summed over the
images, ``self_training.thresholds``), and a pixel's pseudo-label is argmax_k p_k/lambda_k
where max_k p_k/lambda_k >= 1, else ignored (CBST Eq. 8; TPLD Eq. 2). The portion grows
0.2, 0.25, ... up to 0.5 (CRST's schedule). The round then trains on source labels plus the
target pseudo-labels:

    min_F  CE(F(x_s), y_s) + target_weight * CE(F(x_t), y^_t)      (255 ignored in both)

Files: ``rounds/NN/labels/<stem>.png`` (train ids, 255 ignored), ``pred/<stem>.npz`` (the
pass's top-2 classes and probabilities), ``thresholds.json`` (portion, lambda per class),
``stats.json`` (share labelled, overall and per class). See ``docs/methods/self-training.md``.

Length: ``warmup_steps + rounds * round_steps`` steps, derived (``--steps`` is refused);
``--init RUN`` starts from another run's network and skips the warm-up.

Departures from CRST's code, one line each:
- each step draws one source and one target batch (the loop's contract); CRST shuffles a
  small random portion of source images (3-6 %) together with the target list instead.
- rounds are counted in steps (``round_steps``), not epochs of that mixed list.
- the pass keeps each pixel's top-2 classes, so a class outside them is never selected there.
- no rare-class patch mining (CRST's ``MINE_PORT``); no 505-image target subset (the target's
  train split as given: slice it, e.g. ``--tgt 'cityscapes:train[:505]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import Field

from uda_cli.errors import ConfigError
from uda_cli.methods import self_training as st
from uda_cli.methods.base import Method, RoundContext
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import (
    SegmentationConfig,
    build_segmentation_net,
    segmentation_defaults,
    segmentation_loss,
)

# CRST's self-training recipe (crst_seg.py): SGD lr 5e-5 constant, 10x on the classifier,
# weight decay 5e-4, batch 2; its source model trained with DeepLab's recipe before.
CRST_RECIPE = {"optimizer": "sgd", "lr": 5e-5, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "constant",
               "batch_size": 2, "warmup_steps": 120_000, "rounds": 3, "round_steps": 1_104}
# Digit scenes on a CPU: source-only's small recipe for the warm-up, then rounds.
SMALL_ROUNDS = {"warmup_steps": 1_500, "rounds": 3, "round_steps": 500}


class SelfTrainingConfig(SegmentationConfig):
    """What every class-balanced self-training method shares (cbst, crst, tpld)."""

    warmup_steps: int = Field(1_500, ge=0, description="source-only steps before the first round (0 with --init)")
    rounds: int = Field(3, ge=1, description="self-training rounds")
    round_steps: int = Field(500, gt=0, description="training steps of each round")
    portion_start: float = Field(0.2, gt=0, le=1, description="target portion of the first round (CRST 0.2)")
    portion_step: float = Field(0.05, ge=0, le=1, description="portion added per round (CRST 0.05)")
    portion_max: float = Field(0.5, gt=0, le=1, description="largest portion (CRST 0.5)")
    target_weight: float = Field(1.0, ge=0, description="weight of the target pseudo-label loss")
    pass_flip: bool = Field(True, description="average the pass's prediction with its mirror (CRST)")
    pass_scale: float = Field(1.0, gt=0, description="the pass's input scale (CRST: 0.9 at Cityscapes size)")


@register_method("cbst")
class CBST(Method):
    """Networks: F (the segmentation network)."""

    Config = SelfTrainingConfig
    tasks = {"segmentation"}
    topk = 2  # classes kept per pixel by the pass

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        if task != "segmentation":
            return {}
        base = segmentation_defaults(domains)
        base.pop("steps", None)
        if base.get("model") == "deeplabv2_small":
            return {**base, **SMALL_ROUNDS}
        return {**base, **CRST_RECIPE}

    @classmethod
    def derived_steps(cls, cfg) -> int:
        return cfg.warmup_steps + cfg.rounds * cfg.round_steps

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.lam: torch.Tensor | None = None  # this round's thresholds

    def build(self):
        return {"F": build_segmentation_net(self.cfg, self.spec)}

    # ---- rounds ----------------------------------------------------------------------------
    def round_starts(self, total_steps: int) -> list[int]:
        return [self.cfg.warmup_steps + r * self.cfg.round_steps for r in range(self.cfg.rounds)]

    def portion(self, index: int) -> float:
        return st.portion(index, self.cfg.portion_start, self.cfg.portion_step, self.cfg.portion_max)

    def select(self, classes: np.ndarray, probs: np.ndarray, lam: torch.Tensor, round_index: int = 0) -> np.ndarray:
        """A pixel's pseudo-label from its stored top-k classes and probabilities."""
        labels, _ = st.select_labels_top2(torch.from_numpy(classes.astype(np.int64))[None],
                                          torch.from_numpy(probs.astype(np.float32))[None], lam.cpu())
        return labels[0].to(torch.uint8).numpy()

    def prepare_round(self, ctx: RoundContext) -> None:
        from uda_cli.engine import rounds as R
        from uda_cli.engine.setup import eval_batch_size

        files = R.RoundFiles(ctx.run_dir, ctx.round_index)
        if ctx.set_target is None:
            raise ConfigError(f"{self.name} needs a dense (segmentation) target")
        if not files.complete:
            if ctx.resumed:  # the checkpoint is inside this round, so its files were complete once
                raise ConfigError(f"{files.folder} is incomplete but the checkpoint is inside round "
                                  f"{ctx.round_index}; restore that folder, or resume from a checkpoint before "
                                  f"step {ctx.step}")
            ctx.info(f"round {ctx.round_index}: pseudo-label pass over {len(ctx.target):,} target images "
                     f"-> {files.folder}")
            k = self.spec.num_classes
            hist = R.predict_pass(self, ctx.target, ctx.size, files, ctx.autocast, ctx.dist, topk=self.topk,
                                  accumulate=lambda pmax, pred: st.class_histograms(pmax, pred, k),
                                  flip=self.cfg.pass_flip, scale=self.cfg.pass_scale, num_workers=ctx.num_workers,
                                  batch_size=eval_batch_size(ctx.size), device=ctx.device)
            portion = self.portion(ctx.round_index)
            lam = st.thresholds(hist, portion).cpu()
            stats = R.select_pass(ctx.target, files, k, ctx.dist,
                                  lambda stem, c, p: self.select(c, p, lam, ctx.round_index),
                                  info={"round": ctx.round_index, "portion": portion,
                                        "lambda": dict(zip(self.spec.classes, lam.tolist()))},
                                  image_stats=self.image_stats(lam, ctx.round_index))
            self.after_select(ctx, files, stats)
            if ctx.dist is None or ctx.dist.is_main:
                files.mark_complete()
            if ctx.dist is not None:
                ctx.dist.barrier()
            ctx.info(f"round {ctx.round_index}: portion {portion:.2f}, {100 * stats['labelled']:.1f}% of target "
                     f"pixels labelled")
        self.lam = self._read_lambda(files)
        self.set_streams(ctx, files)

    def image_stats(self, lam: torch.Tensor, round_index: int):
        """Per image, what ``stats.json`` keeps beside the label counts (None: nothing)."""
        return None

    def after_select(self, ctx: RoundContext, files, stats: dict[str, Any]) -> None:
        """What a round adds to its files once every pseudo-label is written (TPLD: the split)."""

    def set_streams(self, ctx: RoundContext, files) -> None:
        from uda_cli.engine import rounds as R

        ctx.set_target(R.PseudoLabelSource(ctx.target, files, size=ctx.size))

    def _read_lambda(self, files) -> torch.Tensor:
        import json

        lam = json.loads(files.thresholds.read_text())["lambda"]
        return torch.tensor([lam[c] for c in self.spec.classes], dtype=torch.float32)

    # ---- a step --------------------------------------------------------------------------------
    def target_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return segmentation_loss(logits, batch["y_t"])

    def train_step(self, batch, step):
        f = self.nets["F"]
        loss_s = segmentation_loss(f(batch["x_s"]), batch["y_s"])
        if "y_t" not in batch:  # the source-only warm-up
            self.update("main", loss_s)
            return {"c/seg": loss_s.detach()}
        loss_t = self.target_loss(f(batch["x_t"]), batch)
        self.update("main", loss_s + self.cfg.target_weight * loss_t)
        return {"c/seg": loss_s.detach(), "c/pseudo": loss_t.detach()}

    def predict(self, x):
        return self.nets["F"](x)

    def features(self, x):
        return self.nets["F"].features(x)
