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
- no rare-class patch mining (CRST's ``MINE_PORT``).
- the target images are the target's train split unless ``--set target_list=FILE`` names some
  (CRST's default is its 505-image ``train_ClsConfSet.lst``, not shipped here: give the file).

Classification domains (digits, ``uda train --method cbst --src mnist --tgt usps``): the same
rounds with one confidence per image instead of per pixel. F and C are source-only's digit
networks (``--set backbone=``), the warm-up is source-only's digit recipe (Adam 2e-4, betas
(0.5, 0.999), weight decay 2.5e-5, batch 128, 2,000 steps), then 3 rounds of 1,000 steps. A
round's pass predicts every target training image (no flip by default: a mirrored digit is
another image), lambda_k comes from the images predicted as k exactly as above, and an
image's pseudo-label is argmax_k p_k/lambda_k where that passes 1. Files in ``rounds/NN/``:
``probs.npy`` (float16 [N, K], all K classes), ``labels.csv`` (``index,label,confidence``:
the label empty where unlabelled, the confidence max_k p_k), ``thresholds.json``, ``stats.json``
(share of images labelled, overall and per class). Departures, one line each:
- unlabelled target images are drawn and masked, so the effective target batch is the labelled share.
- the source and target batches go through F separately (the SVHN net's batch norm sees one domain at a time).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from uda_cli.errors import ConfigError, DataError
from uda_cli.methods import self_training as st
from uda_cli.methods.base import Method, RoundContext
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import (
    SegmentationConfig,
    SourceOnly,
    build_digit_nets,
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
# Digits: source-only's digit recipe and length for the warm-up, then rounds; no flip in the pass.
DIGIT_ROUNDS = {"rounds": 3, "round_steps": 1_000, "pass_flip": False}


def digit_defaults() -> dict[str, Any]:
    """Source-only's digit recipe (its Config's defaults) with its length as the warm-up."""
    so = SourceOnly.Config.model_fields
    recipe = {k: so[k].default for k in ("optimizer", "lr", "betas", "weight_decay", "lr_schedule", "batch_size")}
    return {**recipe, "warmup_steps": so["steps"].default, **DIGIT_ROUNDS}


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
    target_list: str | None = Field(None, description="a text file of target image names, one per line: the rounds "
                                                      "label and train on these only (CRST's 505-image "
                                                      "train_ClsConfSet.lst); default: the whole target split")
    backbone: Literal["auto", "lenet", "svhn"] = Field(
        "auto", description="digit runs: auto: the DANN SVHN network when SVHN is involved, else LeNet")


@register_method("cbst")
class CBST(Method):
    """Networks: F (the segmentation network); on digits F (encoder) and C (classifier)."""

    Config = SelfTrainingConfig
    tasks = {"segmentation", "classification"}
    topk = 2  # classes kept per pixel by the pass

    def __init_subclass__(cls, **kwargs):
        # The classification path is this class's and CRST's: a subclass that does not name its
        # tasks itself (TPLD, whose phases are per pixel) stays a segmentation method.
        super().__init_subclass__(**kwargs)
        if "tasks" not in cls.__dict__:
            cls.tasks = {"segmentation"}

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        if task == "classification":
            return digit_defaults()
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
        # Classification: this round's pseudo-label per target image (long [N], 255 unlabelled)
        # and, where the loss needs them (crst lrent), the pass's probabilities [N, K], on the device.
        self.image_labels: torch.Tensor | None = None
        self.image_probs: torch.Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.spec.task == "segmentation"

    def build(self):
        if not self.dense:
            if self.cfg.target_list:
                raise ConfigError("--set target_list applies to segmentation runs; slice a digit target instead, "
                                  "e.g. --tgt 'usps:train[:1000]'")
            if self.cfg.pass_scale != 1.0:
                raise ConfigError("--set pass_scale applies to segmentation runs; a digit run's pass reads the "
                                  "images at their size")
            return build_digit_nets(self.cfg, self.spec)
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

        if not self.dense:
            return self.prepare_image_round(ctx)
        files = R.RoundFiles(ctx.run_dir, ctx.round_index)
        if ctx.set_target is None:
            raise ConfigError(f"{self.name} needs a dense (segmentation) target")
        if self.cfg.target_list:
            ctx = dataclasses.replace(ctx, target=listed_target(ctx.target, self.cfg.target_list))
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

    def check_target(self, target) -> None:
        if self.dense and self.cfg.target_list:
            listed_target(target, self.cfg.target_list)

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

    # ---- classification rounds: one confidence per image ------------------------------------------
    soft_targets = False  # whether the target loss needs the pass's probabilities (crst lrent)

    def select_images(self, prob: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """Pseudo-labels of images from their probabilities ``prob`` [N, K] (all classes) and
        lambda [K]: argmax_k p_k/lambda_k where that is >= 1, else 255 (long [N])."""
        labels, _ = st.select_labels(prob[:, :, None, None], lam)
        return labels[:, 0, 0]

    def prepare_image_round(self, ctx: RoundContext) -> None:
        """The per-image round: the main rank predicts every target training image (or reloads
        ``probs.npy``), selects and writes the round's files; then every rank reads them, so the
        straight run and a resumed one train on the same tensors."""
        from uda_cli.engine import rounds as R

        files = R.RoundFiles(ctx.run_dir, ctx.round_index)
        main = ctx.dist is None or ctx.dist.is_main
        if not files.complete:
            if ctx.resumed:  # the checkpoint is inside this round, so its files were complete once
                raise ConfigError(f"{files.folder} is incomplete but the checkpoint is inside round "
                                  f"{ctx.round_index}; restore that folder, or resume from a checkpoint before "
                                  f"step {ctx.step}")
            if main:
                ctx.info(f"round {ctx.round_index}: pseudo-label pass over {len(ctx.target):,} target images "
                         f"-> {files.folder}")
                stats = self._image_pass(ctx, files)
                files.mark_complete()
                ctx.info(f"round {ctx.round_index}: portion {stats['portion']:.2f}, {100 * stats['labelled']:.1f}% "
                         f"of target images labelled")
        if ctx.dist is not None:
            ctx.dist.barrier()
        self.lam = self._read_lambda(files)
        self.image_labels, probs = read_image_round(files, len(ctx.target), self.spec.num_classes)
        self.image_labels = self.image_labels.to(ctx.device)
        self.image_probs = probs.to(ctx.device).float() if self.soft_targets else None

    @torch.no_grad()
    def predict_images(self, ctx: RoundContext, batch_size: int = 512) -> torch.Tensor:
        """Softmax probabilities float32 [N, K] of every target training image (eval mode, the
        run's autocast, optionally averaged with the mirrored image's)."""
        from uda_cli.data.transforms import normalize

        images = ctx.target.images  # uint8 [N, C, H, W] on the device; never the target's labels
        was_training = self.nets.training
        self.eval()
        out = []
        try:
            for i in range(0, images.shape[0], batch_size):
                x = normalize(images[i : i + batch_size])
                with ctx.autocast():
                    p = self.predict(x).float().softmax(1)
                    if self.cfg.pass_flip:
                        p = (p + self.predict(x.flip(-1)).float().softmax(1)) / 2
                out.append(p.float())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.spec.num_classes, device=images.device)

    def _image_pass(self, ctx: RoundContext, files) -> dict[str, Any]:
        from uda_cli.engine import checkpoint as ckpt
        from uda_cli.engine import rounds as R

        n, k = len(ctx.target), self.spec.num_classes
        path = image_probs_path(files)
        if path.exists():  # written whole by an interrupted pass of the same weights
            probs = read_image_probs(path, n, k).to(ctx.device)
        else:
            probs = self.predict_images(ctx).to(torch.float16)
            buf = io.BytesIO()
            np.save(buf, probs.cpu().numpy())
            ckpt.atomic_write_bytes(path, buf.getvalue())
        # Thresholds and labels from the stored float16 values, as a resumed run reads them.
        p = probs.float()
        pmax, pred = p.max(1)
        portion = self.portion(ctx.round_index)
        lam = st.thresholds(st.class_histograms(pmax, pred, k), portion)
        labels = self.select_images(p, lam)
        R.write_json(files.thresholds, {"round": ctx.round_index, "portion": portion,
                                        "lambda": dict(zip(self.spec.classes, lam.cpu().tolist()))})
        labels_np, conf = labels.cpu().numpy(), pmax.cpu().numpy().astype(np.float16)
        ckpt.atomic_write_bytes(image_labels_path(files), labels_csv(labels_np, conf))
        counts = np.bincount(labels_np[labels_np != 255], minlength=k)[:k] if n else np.zeros(k, np.int64)
        stats = {"round": ctx.round_index, "portion": portion, "images": n,
                 "labelled": float(counts.sum()) / n if n else 0.0,
                 "labelled_per_class": [int(c) / n if n else 0.0 for c in counts]}
        R.write_json(files.stats, stats)
        return stats

    def _image_step(self, batch):
        f, c = self.nets["F"], self.nets["C"]
        loss_s = F.cross_entropy(c(f(batch["x_s"])), batch["y_s"])
        if self.image_labels is None:  # the source-only warm-up
            self.update("main", loss_s)
            return {"c/cls": loss_s.detach()}
        idx = batch["idx_t"]
        k = self.spec.num_classes
        # An image is a 1x1 map: the dense target loss (CE over the labelled ones, crst's
        # regularisers) applies as it is; unlabelled images (255) are masked out.
        target = {"y_t": self.image_labels[idx].view(-1, 1, 1)}
        if self.image_probs is not None:
            target["topk_t"] = torch.arange(k, device=idx.device).view(1, k, 1, 1).expand(len(idx), k, 1, 1)
            target["topkp_t"] = self.image_probs[idx].view(-1, k, 1, 1)
        loss_t = self.target_loss(c(f(batch["x_t"]))[:, :, None, None], target)
        self.update("main", loss_s + self.cfg.target_weight * loss_t)
        return {"c/cls": loss_s.detach(), "c/pseudo": loss_t.detach()}

    # ---- a step --------------------------------------------------------------------------------
    def target_loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return segmentation_loss(logits, batch["y_t"])

    def train_step(self, batch, step):
        if not self.dense:
            return self._image_step(batch)
        f = self.nets["F"]
        loss_s = segmentation_loss(f(batch["x_s"]), batch["y_s"])
        if "y_t" not in batch:  # the source-only warm-up
            self.update("main", loss_s)
            return {"c/seg": loss_s.detach()}
        loss_t = self.target_loss(f(batch["x_t"]), batch)
        self.update("main", loss_s + self.cfg.target_weight * loss_t)
        return {"c/seg": loss_s.detach(), "c/pseudo": loss_t.detach()}

    def predict(self, x):
        if not self.dense:
            return self.nets["C"](self.nets["F"](x))
        return self.nets["F"](x)

    def features(self, x):
        if not self.dense:
            return self.nets["F"](x)
        return self.nets["F"].features(x)


def listed_target(target, list_file: str):
    """The images of ``target`` that ``list_file`` names, in the file's order: one per line,
    as a stem (``aachen_000000_000019``) or a path whose file name starts with it (CRST's
    ``leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png``); blank lines and
    ``#`` comments are skipped. One line for a missing file or a name the target lacks."""
    from pathlib import Path

    from uda_cli.data.dense import SubsetSource

    path = Path(list_file).expanduser()
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"target_list {path}: {e.strerror or e}; give a text file of target image names, one per "
                          "line") from None
    names = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    stems = {target.stem(i): i for i in range(len(target))}
    picked, missing = [], []
    for name in names:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        stem = base if base in stems else next((s for s in (base.rsplit(".", 1)[0], *_suffixless(base))
                                                if s in stems), None)
        (picked if stem is not None else missing).append(stems.get(stem, name))
    if missing:
        raise ConfigError(f"target_list {path}: {len(missing):,} of {len(names):,} names are not images of "
                          f"{target.name}, e.g. {missing[0]!r}; list stems of that split, one per line")
    if not picked:
        raise ConfigError(f"target_list {path} names no image; list stems of {target.name}, one per line")
    return SubsetSource(target, picked, f"{target.name} ({path.name}: {len(picked):,} images)")


def _suffixless(name: str) -> list[str]:
    """Stems a file name may carry behind a dataset suffix: ``x_leftImg8bit.png`` -> ``x``."""
    stem = name.rsplit(".", 1)[0]
    return [stem.rsplit("_", 1)[0]] if "_" in stem else []


# ---- a classification round's files ---------------------------------------------------------------

def image_probs_path(files):
    """``rounds/NN/probs.npy``: the pass's softmax, float16 [N, K], row i = target image i."""
    return files.folder / "probs.npy"


def image_labels_path(files):
    """``rounds/NN/labels.csv``: ``index,label,confidence``, the label empty where unlabelled."""
    return files.folder / "labels.csv"


def labels_csv(labels: np.ndarray, confidence: np.ndarray) -> bytes:
    """``labels.csv`` of labels (255: unlabelled, written empty) and the pass's max probability."""
    lines = ["index,label,confidence"]
    for i, (y, c) in enumerate(zip(labels.tolist(), confidence)):
        lines.append(f"{i},{'' if y == 255 else y},{np.format_float_positional(c, unique=True, trim='-')}")
    return ("\n".join(lines) + "\n").encode()


def read_image_probs(path, n: int, k: int) -> torch.Tensor:
    try:
        a = np.load(path)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete the round's folder and resume to predict again") from None
    if a.shape != (n, k) or a.dtype != np.float16:
        raise DataError(f"{path} holds {a.dtype} {list(a.shape)}, this round needs float16 [{n}, {k}] (one row per "
                        "target image); delete the round's folder and resume to predict again")
    return torch.from_numpy(a)


def read_image_round(files, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A complete classification round's pseudo-labels (long [N], 255 unlabelled, from
    ``labels.csv``) and probabilities (float16 [N, K], from ``probs.npy``), on the CPU."""
    path = image_labels_path(files)
    labels = torch.full((n,), 255, dtype=torch.int64)
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if len(rows) != n or any(int(r["index"]) != i for i, r in enumerate(rows)):
            raise ValueError(f"{len(rows)} rows, the target has {n} images")
        for i, r in enumerate(rows):
            if r["label"] != "":
                y = int(r["label"])
                if not 0 <= y < k:
                    raise ValueError(f"label {y} of image {i} is not a class")
                labels[i] = y
    except FileNotFoundError:
        raise DataError(f"{path} is missing; delete the round's folder ({files.folder}) and resume (--resume auto) "
                        "to write it again") from None
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete the round's folder and resume to write it again") from None
    return labels, read_image_probs(image_probs_path(files), n, k)
