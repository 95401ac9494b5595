"""DANN: Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015;
Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016.

Networks (the paper's figure): F (feature extractor G_f), C (label predictor G_y), D (domain
classifier G_d). A gradient reversal layer R_lambda sits between F and D: identity forward,
gradient times -lambda backward. With domain label d = 0 for source and 1 for target, one
SGD step on

    L = CE(C(F(x_s)), y_s) + CE(D(R(F(x_s))), 0) + CE(D(R(F(x_t))), 1)

moves C and D down their own losses and F down ``L_y - lambda L_d`` (the saddle point of
the paper's E(theta_f, theta_y, theta_d)): features that predict the label and that the
domain classifier cannot tell apart. L_d is, as in the paper, the source mean plus the
target mean.

Schedules (the paper's image experiments): progress p = step / total steps goes 0 -> 1;
lambda_p = 2 / (1 + exp(-gamma p)) - 1 with gamma = 10, so the noisy early domain signal
is suppressed; the learning rate anneals as mu_p = mu_0 / (1 + 10 p)^0.75 with mu_0 = 0.01
(the engine's ``lr_schedule="inv"``); SGD with momentum 0.9.

The schedule needs the run's total steps, which ``--steps`` may set apart from
``cfg.steps``: the engine sets ``method.total_steps`` before the loop (``cfg.steps`` until
then). lambda depends on ``step`` alone, so
a resumed run continues the ramp exactly.

Defaults and departures (what was measured behind them, dated, with its result files:
docs/methods/dann.md):
- Batch: the paper fills half of each 128-image batch with source and half with target;
  the engine's batch size counts images per domain, so 64.
- Backbone: as source-only, the DANN SVHN network when SVHN is involved, else the ADDA
  LeNet (``uda_cli/models/classifiers.py``; see there for the SVHN net's batch norm, which the
  paper lacks). The paper's MNIST network is a smaller LeNet variant (32/48 conv filters,
  100-100 fc); we use the ADDA LeNet so that the DANN and source-only rows of a table
  share one backbone.
- D: three fc layers, hidden width 500 on the 500-d LeNet features (the usual 500-500-2 of
  the ADDA/DANN digit re-implementations) and 1024 on the 3072-d SVHN features (the
  paper's SVHN domain classifier, 1024-1024-2). Its input goes through the same ReLU that
  starts C, since F's last layer is linear.
- D's own gradient is not scaled by lambda: lambda only enters through the reversal layer,
  the form the paper trains with (its gradient reversal layer for Caffe).
- Steps: the paper gives no iteration count for digits; 10,000, ADDA's source-only length
  (source-only defaults to 2,000; ``benchmarks/digits.py`` trains a table's rows equally long). No weight decay (the paper mentions none).
- ``ramp_delay`` (default 0, the paper): steps with no reversal before the ramp, which
  then spans the rest of the run. It did not help where measured (SVHN->MNIST).
- ``f_batches`` (the paper is silent; default "auto"): F reads the source and target
  batches as one batch ("mixed"), so the batch norm of the SVHN net (ours, see
  ``models/classifiers.py``) normalises them together, or as two ("separate"), each with its
  own statistics (the running statistics used at test time follow both). "auto" is
  "separate" when F has batch norm (the SVHN net) and "mixed" when it has none (LeNet, where
  the two train alike and only the dropout draws would differ, so the LeNet rows keep
  their numbers). On SVHN->MNIST "mixed" collapses and "separate" does not.
- What D reads (``d_input``): the encoder's output by default (the 500-d LeNet features, as
  ADDA's discriminator; 3072-d on the SVHN net). ``conv`` feeds D the conv output instead
  (128 x 7 x 7 on the SVHN net), where the SVHN figure of the paper and public
  re-implementations split feature extractor from label predictor; it did not change the
  SVHN->MNIST collapse under "mixed", so the default stays.

Office-31 (a pair with an ``office31-*`` domain; ``backbone=auto`` there, or ``resnet50``):
- F, C: source-only's Office networks (``uda_cli.methods.source_only.build_photo_nets``):
  ImageNet ResNet-50 up to pooling, then C = a 256-d bottleneck (linear, batch norm, ReLU;
  TLlib's ``dann.ImageClassifier``) and a linear layer to the 31 classes. ``--set
  pretrained=imagenet|none|FILE`` (default imagenet: torchvision's weights from $TORCH_HOME,
  never downloaded; a missing file is one line naming it).
- D reads the bottleneck (``C.features``), behind the reversal layer, as in the DANN paper's
  Office networks and its re-implementations: fc 1024 - ReLU - dropout 0.5 - fc 1024 - ReLU -
  dropout 0.5 - fc 2 (``DropoutDomainClassifier``, CDAN's ``AdversarialNetwork(256, 1024)``;
  ``d_hidden`` changes 1024). ``d_input=conv`` is refused (it names the digit SVHN net's conv
  output).
- Recipe: source-only's ``OFFICE_RECIPE``, CDAN's PyTorch Office code (thuml/CDAN
  pytorch/train_image.py): SGD lr 1e-3 with the new layers (C and D) at 10x, momentum 0.9,
  weight decay 5e-4, the "inv" annealing (1 + 0.001 i)^-0.75 = the paper's
  mu_0 / (1 + 10 p)^0.75 over 10,000 steps; batch 32 per domain (TLlib's DANN; CDAN 36);
  10,000 steps, over which lambda ramps 0 -> 1 (gamma 10) as in CDAN's ``calc_coeff``
  (max_iter 10,000). F reads source and target as two batches ("auto": ResNet-50 has batch
  norm), as CDAN's code does. Not done: CDAN's Nesterov momentum and doubled decay (1e-3 in
  effect), the resize-256 / crop-224 / flip augmentation (images are the reader's 224x224
  resize), 10-crop testing. Assumed: that this CDAN recipe stands for "DANN's Office
  schedule" (the DANN paper's own Office runs use AlexNet). Every Office-31 number is
  unmeasured (no images here).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from uda_cli.errors import ConfigError
from uda_cli.methods.base import Method, MethodConfig, OptimSpec
from uda_cli.methods.registry import register_method
from uda_cli.methods.source_only import NEW_LAYER_LR_MULT, OFFICE_RECIPE, build_photo_nets, photo_pretrained_field
from uda_cli.models.classifiers import LeNetEncoder, classification_backbone, digit_model_name, photo_run
from uda_cli.models.discriminators import DomainClassifier, DropoutDomainClassifier
from uda_cli.models.registry import build_model


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float) -> torch.Tensor:
    """The gradient reversal layer R_lambda: forward identity, backward ``-lambda * grad``."""
    return _GradReverse.apply(x, float(lambd))


def grl_lambda(p: float, gamma: float = 10.0) -> float:
    """The paper's ramp of the reversal weight: ``2 / (1 + exp(-gamma p)) - 1``, p in [0, 1]."""
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def domain_loss(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """L_d: mean CE of the source as domain 0 plus mean CE of the target as domain 1."""
    zeros = torch.zeros(logits_s.shape[0], dtype=torch.long, device=logits_s.device)
    ones = torch.ones(logits_t.shape[0], dtype=torch.long, device=logits_t.device)
    return F.cross_entropy(logits_s, zeros) + F.cross_entropy(logits_t, ones)


@register_method("dann")
class DANN(Method):
    """Networks: F (feature extractor), C (label predictor), D (domain classifier)."""

    class Config(MethodConfig):
        backbone: Literal["auto", "lenet", "svhn", "resnet50"] = Field(
            "auto", description="auto: ResNet-50 on Office-31, the DANN SVHN network when SVHN is involved, "
                                "else LeNet"
        )
        pretrained: str = photo_pretrained_field()
        steps: int = Field(10_000, gt=0)
        batch_size: int = Field(64, gt=0, description="per domain: the paper's 128-image batch is half source, half target")
        optimizer: Literal["adam", "sgd"] = "sgd"
        lr: float = Field(0.01, gt=0, description="mu_0 of the annealing mu_0 / (1 + 10 p)^0.75")
        momentum: float = Field(0.9, ge=0)
        lr_schedule: Literal["constant", "step", "inv", "poly"] = "inv"
        gamma: float = Field(10.0, gt=0, description="steepness of the reversal ramp 2/(1+exp(-gamma p))-1")
        lambda_max: float = Field(1.0, ge=0, description="the reversal weight the ramp ends at")
        ramp_delay: int = Field(0, ge=0, description="steps with no reversal before the ramp starts (0: the paper; see the docstring)")
        f_batches: Literal["auto", "mixed", "separate"] = Field(
            "auto", description="F sees source and target as one batch (its batch norm mixes them) or as two; "
                                "auto: separate when F has batch norm, else mixed; see the docstring")
        d_hidden: int | None = Field(None, gt=0, description="D's hidden width (default: 500 on LeNet, 1024 on the "
                                                             "SVHN net and on Office-31's bottleneck)")
        d_input: Literal["features", "conv"] = Field(
            "features", description="what D reads: the encoder's features (ADDA's split) or its conv output; see the docstring")

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        if task == "classification" and photo_run(domains):
            return dict(OFFICE_RECIPE)
        return {}

    @functools.cached_property
    def photo(self) -> bool:
        """Whether F is the Office-31 ResNet-50 (D then reads C's bottleneck)."""
        return isinstance(self.nets["D"], DropoutDomainClassifier)

    def build(self):
        c = self.spec.channels
        if classification_backbone(self.cfg.backbone, self.spec.domains, c) == "resnet50":
            if self.cfg.d_input == "conv":
                raise ConfigError("--set d_input=conv reads the digit SVHN network's conv output; an Office-31 "
                                  "run's D reads the bottleneck (d_input=features)")
            nets = build_photo_nets(self.cfg, self.spec)
            nets["D"] = DropoutDomainClassifier(nets["C"].out_features, self.cfg.d_hidden or 1024)
            return nets
        net = build_model(digit_model_name(self.cfg.backbone, self.spec.domains, c),
                          num_classes=self.spec.num_classes, in_channels=c)
        # F and C stay two networks (their checkpoint keys are F.* and C.*), D reads between them.
        f = net.F
        hidden = self.cfg.d_hidden or (500 if isinstance(f, LeNetEncoder) else 1024)
        d_in = f.fc.in_features if self.cfg.d_input == "conv" else f.out_features
        return {"F": f, "C": net.C, "D": DomainClassifier(d_in, hidden)}

    def optimizers(self):
        # One SGD over all three: the GRL makes a single backward give each its update.
        if self.photo:  # Office-31: the new layers (C, D) at 10x the pretrained ResNet's lr
            mult = {"C": NEW_LAYER_LR_MULT, "D": NEW_LAYER_LR_MULT}
            return {"main": OptimSpec.from_config(self.cfg, ("F", "C", "D"), lr_mult=mult)}
        return {"main": OptimSpec.from_config(self.cfg, ("F", "C", "D"))}

    def reversal_weight(self, step: int) -> float:
        # total_steps: the run's length, set by the engine; the ramp spans what follows the delay
        delay = self.cfg.ramp_delay
        if step < delay:
            return 0.0
        p = min((step - delay) / max(self.total_steps - delay, 1), 1.0)
        return self.cfg.lambda_max * grl_lambda(p, self.cfg.gamma)

    def train_step(self, batch, step):
        x_s, y_s, x_t = batch["x_s"], batch["y_s"], batch["x_t"]
        n_s = x_s.shape[0]
        lambd = self.reversal_weight(step)  # a host float from `step`: no sync
        enc = self.nets["F"]
        if self.photo:  # Office-31: C's bottleneck is what D reads and C's last layer classifies
            cls = self.nets["C"]
            h = self._per_batch(lambda x: cls.features(enc(x)), x_s, x_t)
            loss_y = F.cross_entropy(cls.fc(h[:n_s]), y_s)
            d = self.nets["D"](grad_reverse(h, lambd))
            loss_d = domain_loss(d[:n_s], d[n_s:])
            self.update("main", loss_y + loss_d)
            return {"c/cls": loss_y.detach(), "d/adv": loss_d.detach(),
                    "grl/lambda": torch.full((), lambd, device=x_s.device)}
        if self.cfg.d_input == "conv":  # D on the conv output, C on the fc features above it
            h = self._per_batch(lambda x: enc.conv(x).flatten(1), x_s, x_t)
            f = enc.fc(h)
        else:
            f = h = self._per_batch(enc, x_s, x_t)
        loss_y = F.cross_entropy(self.nets["C"](f[:n_s]), y_s)
        d = self.nets["D"](grad_reverse(h, lambd))
        loss_d = domain_loss(d[:n_s], d[n_s:])
        self.update("main", loss_y + loss_d)
        return {"c/cls": loss_y.detach(), "d/adv": loss_d.detach(),
                "grl/lambda": torch.full((), lambd, device=x_s.device)}

    def _per_batch(self, fn, x_s, x_t):
        """``fn`` on the source and target together, or on each alone (``f_batches="separate"``:
        F's batch norm then normalises each domain with its own batch statistics)."""
        if self.separate_batches:
            return torch.cat([fn(x_s), fn(x_t)])
        return fn(torch.cat([x_s, x_t]))

    @functools.cached_property
    def separate_batches(self) -> bool:
        """Whether F reads each domain's batch alone: ``f_batches``, where "auto" means "when F
        has batch norm" (the SVHN net; LeNet has none). Looked up once: the config and F's
        layers are fixed when the method is built, and ``train_step`` asks every step."""
        if self.cfg.f_batches == "auto":
            return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.nets["F"].modules())
        return self.cfg.f_batches == "separate"

    def predict(self, x):
        return self.nets["C"](self.nets["F"](x))

    def features(self, x):
        if self.photo:
            return self.nets["C"].features(self.nets["F"](x))
        return self.nets["F"](x)
