"""DTN: Taigman, Polyak & Wolf, "Unsupervised Cross-Domain Image Generation", ICLR 2017.

Networks (named as in the paper): f (a fixed encoder, pretrained as a source classifier
with the head ``f_head``), g (a decoder to a 32x32 image), G = g o f, and D (a 3-way
discriminator: class 1 "G of a source image", 2 "G of a target image", 3 "real target").
The paper's digit networks are ``DTNEncoder`` (f, ``uda_cli/models/classifiers.py``),
``DTNDecoder`` (g, ``generators.py``) and ``DTNDiscriminator`` (D, ``discriminators.py``).

Objective, with s the source and t the target batch:

    L_D     = -E_s log D_1(G(x)) - E_t log D_2(G(x)) - E_t log D_3(x)
    L_GANG  = -E_s log D_3(G(x)) - E_t log D_3(G(x))
    L_CONST = E_s d(f(x), f(G(x)))          d = MSE
    L_TID   = E_t d_2(x, G(x))              d_2 = MSE
    L_TV(z) = sum_ij ((z_i,j+1 - z_ij)^2 + (z_i+1,j - z_ij)^2)^(B/2)   B = 1
    L_G     = L_GANG + alpha L_CONST + beta L_TID + gamma L_TV

D descends L_D, g descends L_G; f stays fixed (only g and D are trained adversarially).

Phases (one loop; both derive from ``step``, so resume is exact): for
``step < pretrain_steps`` f and f_head learn the source labels (CE); from then on f is frozen
and each step updates D, then g, then C.

Accuracy follows the paper's digit protocol: a classifier C trained on G(x_s) with
the source labels and tested on real target images. C trains alongside g, on detached
G(x_s), in its own optimizer group (the paper trains it after G; alongside keeps one loop,
and at the end it has followed G's latest images for the whole adversarial phase).
``predict`` is C, so ``uda evaluate`` reports the paper's number; ``features`` is C's
encoder (the embedding behind those predictions). Until C's first update (a run, or a
checkpoint, that ends inside f's pretraining: ``--steps`` at most ``pretrain_steps``, which is
10,000 by default) C has seen nothing, so ``predict`` and ``features`` read f and its head
instead, a source-only classifier, rather than report an untrained C's chance accuracy. The
count of C's updates is checkpointed (``extra_state``); a checkpoint written before it was
kept is read as C trained.

Channels: the paper's setting is SVHN (colour) -> MNIST (grey); its f reads 32x32 RGB and its
g "maps ... to 32x32 grayscale images". A run has one channel count (colour when either
domain is colour, grey images repeated), so f reads it as is; with ``grey_output`` (the
default) g decodes one channel, repeated to the run's channels wherever an image is
compared or shown (D, f, C, ``translate``): a real grey target repeated to RGB has equal
channels, so D sees the same kind of image from both sides. With a colour target set
``grey_output=false`` (g then decodes the run's channels); a colour target with
``grey_output=true`` is refused at the start of the run.

Where we depart from the paper or choose where it is silent (what each choice measured, dated,
with its result files: docs/methods/dtn.md):
- ``f_output="tanh"`` (default): f ends in batch norm and tanh, as the public
  re-implementation (yunjey/domain-transfer-network) does, not the paper's max pooling and
  ReLU, whose unbounded features let alpha L_CONST swamp the other terms (g drew noise). Its
  batch norm is frozen with f after pretraining. ``f_output="relu"`` is the paper's f.
- ``d_every`` / ``g_steps`` (default 1 / 1, as the paper): D on every N-th adversarial step,
  g several times per step (the re-implementation's ratio); neither helped.
- ``d_batches`` (the paper is silent): "separate" (default) runs D on G(x_s), G(x_t) and x_t
  as three batches, so its batch norm never mixes real and fake images (DCGAN's habit);
  "mixed" runs one batch of the three. They measured level; separate is the cheaper.
- ``grayscale`` (default off): every network sees one channel, a colour domain loaded as luma
  (I2I's option of the same name). Off, a colour domain keeps colour and a grey one is
  repeated to three channels.
- ``pretrain_augment`` (default off, as the paper): random translation and rotation of the
  source while f pretrains; the paper pretrains f on SVHN's 531k "extra" images, and on a
  small source f overfits without it.
- ``c_augment`` (default off; the paper says nothing of how C is trained): random
  translation and rotation of C's copy of G(x_s) (D and g see the images as they are).
- C trains alongside g, in its own group (above), where the paper trains it after G.
- gamma = 0: TV is the paper's smoothing for its faces; we could not confirm a TV weight for
  digits, and the re-implementation has none. ``g/tv`` is logged either way and adds to L_G
  with ``--set gamma=...``. alpha = beta = 15 and B = 1 are the paper's digit setting.
- Where the paper is silent: Adam, lr 2e-4, betas (0.5, 0.999) for every group (DCGAN's);
  batch 128 per domain; 10,000 pretraining steps (source-only's length) then 10,000
  adversarial ones; C is the ADDA LeNet on grey G(x_s) (with colour output, source-only's
  choice of backbone). Losses are batch means: MSE averages over elements; L_TV sums over
  each image's pixels (the paper's sum_ij, where both differences exist) and channels of g's
  output, and averages over the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from uda_cli.data.augment import random_affine
from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.methods.base import Method, MethodConfig, OptimSpec
from uda_cli.methods.registry import register_method
from uda_cli.models.classifiers import DTNEncoder, digit_model_name
from uda_cli.models.discriminators import DTNDiscriminator
from uda_cli.models.generators import DTNDecoder
from uda_cli.models.registry import build_model

# D's classes (the paper's D_1, D_2, D_3).
FAKE_S, FAKE_T, REAL_T = 0, 1, 2


def tv_loss(z: torch.Tensor, b: float = 1.0) -> torch.Tensor:
    """L_TV of ``z`` [N, C, H, W]: per image and channel, sum over (i, j) of
    ``((z[i, j+1] - z[i, j])^2 + (z[i+1, j] - z[i, j])^2)^(b/2)``; mean over images."""
    z = z.float()  # float32: the clamp below must not underflow in half precision
    dx = z[:, :, :-1, 1:] - z[:, :, :-1, :-1]
    dy = z[:, :, 1:, :-1] - z[:, :, :-1, :-1]
    sq = dx.square() + dy.square()
    # d/ds s^(b/2) is infinite at s = 0 for b < 2; the clamp keeps the gradient finite.
    per_pixel = sq.clamp_min(1e-12).pow(b / 2) if b < 2 else sq.pow(b / 2)
    return per_pixel.flatten(1).sum(1).mean()


def const_loss(f_x: torch.Tensor, f_gx: torch.Tensor) -> torch.Tensor:
    """L_CONST: MSE between f(x_s) and f(G(x_s))."""
    return F.mse_loss(f_gx.float(), f_x.float())


def tid_loss(x_t: torch.Tensor, g_xt: torch.Tensor) -> torch.Tensor:
    """L_TID: MSE between a target image and G of it."""
    return F.mse_loss(g_xt.float(), x_t.float())


def _ce_to(logits: torch.Tensor, cls: int) -> torch.Tensor:
    return F.cross_entropy(logits, torch.full((logits.shape[0],), cls, dtype=torch.long, device=logits.device))


def d_loss(d_gs: torch.Tensor, d_gt: torch.Tensor, d_xt: torch.Tensor) -> torch.Tensor:
    """L_D from D's logits on G(x_s), G(x_t) and x_t."""
    return _ce_to(d_gs, FAKE_S) + _ce_to(d_gt, FAKE_T) + _ce_to(d_xt, REAL_T)


def gang_loss(d_gs: torch.Tensor, d_gt: torch.Tensor) -> torch.Tensor:
    """L_GANG: G wants D to call both G(x_s) and G(x_t) a real target image."""
    return _ce_to(d_gs, REAL_T) + _ce_to(d_gt, REAL_T)


@register_method("dtn")
class DTN(Method):
    """Networks: f (encoder), f_head (its pretraining classifier), g (decoder), D, C (task)."""

    class Config(MethodConfig):
        steps: int = Field(20_000, gt=0, description="pretraining steps included")
        pretrain_steps: int = Field(10_000, ge=0, description="steps that train f as a source classifier before it is frozen")
        alpha: float = Field(15.0, ge=0, description="weight of L_CONST")
        beta: float = Field(15.0, ge=0, description="weight of L_TID")
        gamma: float = Field(0.0, ge=0, description="weight of L_TV")
        tv_b: float = Field(1.0, gt=0, description="exponent B of L_TV")
        f_output: Literal["relu", "tanh"] = Field(
            "tanh", description="f's last activation: batch norm + tanh (bounded; see the docstring) or relu (the paper)")
        d_every: int = Field(1, gt=0, description="update D on every N-th adversarial step (1: every step, the paper)")
        pretrain_augment: bool = Field(
            False, description="random translation and rotation of the source while f pretrains (see the docstring)")
        c_augment: bool = Field(False, description="random translation and rotation of G(x_s) for C")
        g_steps: int = Field(1, gt=0, description="g updates per adversarial step (1: the paper)")
        d_batches: Literal["mixed", "separate"] = Field(
            "separate", description="D's batch norm sees the three classes in one batch, or each class in its own")
        grey_output: bool = Field(True, description="g decodes one grey channel (the paper's MNIST target)")
        grayscale: bool = Field(
            False, description="run in grey even when a domain is colour (f, g, D and C see one channel; see the docstring)")
        classifier: Literal["auto", "lenet", "svhn"] = Field(
            "auto", description="C, trained on G(x_s): auto is LeNet on grey G(x_s), else as source-only"
        )

    translates_images = True

    def __init__(self, config, spec):
        super().__init__(config, spec)
        self.c_steps = 0  # C's updates so far (checkpointed): until the first, f's head predicts

    @classmethod
    def input_channels(cls, config, src_channels, tgt_channels):
        if config.grey_output and tgt_channels == 3 and not config.grayscale:
            raise ConfigError("dtn: the target domain is colour but g outputs grey images; add --set grey_output=false "
                              "(colour networks) or --set grayscale=true (every network grey)")
        return super().input_channels(config, src_channels, tgt_channels)

    def build(self):
        if tuple(self.spec.image_size) != (32, 32):
            raise ConfigError(f"dtn's networks are built for 32x32 images, not {self.spec.image_size}")
        c = self.spec.channels
        f = DTNEncoder(c, self.cfg.f_output)
        kind = self.cfg.classifier
        if kind == "auto" and self.cfg.grey_output:
            kind = "lenet"  # G(x_s) is a grey digit (MNIST-like), whatever the source was
        task = build_model(digit_model_name(kind, self.spec.domains, c), num_classes=self.spec.num_classes,
                           in_channels=c)
        return {
            "f": f,
            "f_head": nn.Linear(f.out_features, self.spec.num_classes),
            "g": DTNDecoder(1 if self.cfg.grey_output else c, f.out_features),
            "D": DTNDiscriminator(c, 3),
            "C": nn.Sequential(task.F, task.C),  # checkpoint keys C.0.* (encoder), C.1.* (classifier)
        }

    def optimizers(self):
        spec = lambda *nets: OptimSpec.from_config(self.cfg, nets)  # noqa: E731
        return {"f": spec("f", "f_head"), "g": spec("g"), "D": spec("D"), "C": spec("C")}

    def _to_run_channels(self, img: torch.Tensor, channels: int | None = None) -> torch.Tensor:
        c = channels or self.spec.channels
        return img.expand(-1, c, -1, -1) if img.shape[1] == 1 and c != 1 else img

    def train_step(self, batch, step):
        x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
        f, g = self.nets["f"], self.nets["g"]
        pretraining = step < self.cfg.pretrain_steps
        f.train(pretraining and self.nets.training)  # frozen f: its batch norm (tanh output) keeps its statistics
        if pretraining:
            f.requires_grad_(True)
            if self.cfg.pretrain_augment:
                x_s = random_affine(x_s)
            loss = F.cross_entropy(self.nets["f_head"](f(x_s)), y_s)
            self.update("f", loss)
            return {"f/cls": loss.detach()}

        # f is fixed from here on: gradients flow through it to G(x_s), never into it.
        f.requires_grad_(False)
        n_s = x_s.shape[0]
        with torch.no_grad():
            z = f(torch.cat([x_s, x_t]))
        raw = g(z)  # g's own output (one channel with grey_output), for L_TV
        fake = self._to_run_channels(raw)
        fake_s, fake_t = fake[:n_s], fake[n_s:]

        # D on every d_every-th adversarial step, then g (g_steps times; a later g step
        # recomputes G's images, the first reuses them).
        out = {}
        if (step - self.cfg.pretrain_steps) % self.cfg.d_every == 0:
            d_gs, d_gt, d_xt = self._discriminate(fake.detach(), x_t, n_s)
            loss_d = d_loss(d_gs, d_gt, d_xt)
            self.update("D", loss_d)
            out["d/adv"] = loss_d.detach()

        for i in range(self.cfg.g_steps):
            if i:
                raw = g(z)
                fake = self._to_run_channels(raw)
                fake_s, fake_t = fake[:n_s], fake[n_s:]
            d_gs, d_gt, _ = self._discriminate(fake, x_t, n_s, real=False)
            loss_gang = gang_loss(d_gs, d_gt)
            loss_const = const_loss(z[:n_s], f(fake_s))
            loss_tid = tid_loss(x_t, fake_t)
            loss_tv = tv_loss(raw, self.cfg.tv_b)
            loss_g = loss_gang + self.cfg.alpha * loss_const + self.cfg.beta * loss_tid
            if self.cfg.gamma:
                loss_g = loss_g + self.cfg.gamma * loss_tv
            self.update("g", loss_g)

        # The paper's protocol: a classifier of G(x_s) with the source labels (detached: C
        # must not shape G).
        c_in = fake_s.detach()
        if self.cfg.c_augment:
            c_in = random_affine(c_in)
        loss_c = F.cross_entropy(self.nets["C"](c_in), y_s)
        self.update("C", loss_c)
        self.c_steps += 1
        return {**out, "g/gan": loss_gang.detach(), "g/const": loss_const.detach(),
                "g/tid": loss_tid.detach(), "g/tv": loss_tv.detach(), "c/cls": loss_c.detach()}

    def _discriminate(self, fake: torch.Tensor, x_t: torch.Tensor, n_s: int, real: bool = True):
        """D's logits on G(x_s), G(x_t) and x_t (None for x_t when not ``real``).

        ``d_batches="mixed"``: one batch, so D's batch norm normalises the three classes
        together; g's pass keeps x_t in it (no gradient reaches g through it), or D's batch
        statistics would differ between D's pass and g's. ``"separate"``: one batch per
        class, DCGAN's habit of never mixing real and fake images in a batch-norm batch;
        g's pass then needs no x_t."""
        D = self.nets["D"]
        if self.cfg.d_batches == "separate":
            return D(fake[:n_s]), D(fake[n_s:]), (D(x_t) if real else None)
        logits = D(torch.cat([fake, x_t]))
        n = fake.shape[0]
        return logits[:n_s], logits[n_s:n], (logits[n:] if real else None)

    def predict(self, x):
        if not self.c_steps:  # f still pretraining: C is untrained, f's source classifier answers
            return self.nets["f_head"](self.nets["f"](x))
        return self.nets["C"](x)

    def features(self, x):
        return self.nets["f"](x) if not self.c_steps else self.nets["C"][0](x)

    def extra_state(self):
        return {"c_steps": torch.tensor(self.c_steps, dtype=torch.int64)}

    def load_extra_state(self, state):
        unknown = set(state) - {"c_steps"}
        if unknown:
            raise CheckpointError(f"dtn: the checkpoint holds extra state {sorted(unknown)} that dtn does not write; "
                                  "pass a checkpoint of a dtn run")
        # Checkpoints from before the count was kept: their C is the one that was evaluated.
        self.c_steps = int(state["c_steps"]) if "c_steps" in state else 1

    def translate(self, x, noise=None):
        return self._to_run_channels(self.nets["g"](self.nets["f"](x)), x.shape[1])
