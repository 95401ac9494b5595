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

Segmentation: the same objective per pixel, CE(F(x_s) upsampled to the label, y_s) with
255 ignored, on a segmentation network F (``--set model=``: ``deeplabv2_r101`` by default,
``fcn8s_vgg16``, or ``deeplabv2_small`` for digit scenes). Defaults are DeepLab's recipe as
ADVENT trains its source model: SGD lr 2.5e-4 (10x on the classifier), momentum 0.9,
weight decay 5e-4, poly 0.9, batch 1, 120,000 steps (ADVENT's early stop), ImageNet weights.
Logits are upsampled bilinearly with align_corners=True, as ADVENT and CRST do.
Departure: digit scenes (a domain that names ``deeplabv2_small`` as its model) train with
Adam 1e-3, batch 16, 1,500 steps and no pretrained weights: minutes on one CPU thread, the mIoU
still rising slowly at the end (docs/methods/source-only.md).
Office-31 (a pair with an ``office31-*`` domain; ``backbone=auto`` there, or
``backbone=resnet50``): F is torchvision's ResNet-50 up to its pooling (2048-d) and C the head
DANN's Office re-implementations use, a 256-d bottleneck (linear, batch norm, ReLU; TLlib's
``dann.ImageClassifier``) then a linear layer to the 31 classes
(``uda_cli/models/classifiers.py``); ``features`` is the bottleneck. ``--set
pretrained=imagenet`` (default; torchvision's ``ResNet50_Weights.IMAGENET1K_V1`` from
$TORCH_HOME, never downloaded: a missing file is one line naming it), ``none`` or a
``.safetensors`` file. The recipe (:data:`OFFICE_RECIPE`, shared with dann) is CDAN's PyTorch
code for Office-31 (thuml/CDAN pytorch/train_image.py, the usual ResNet-50 DANN baseline there):
SGD lr 1e-3, momentum 0.9, weight decay 5e-4, the new layers (C) at 10x lr, and its "inv"
annealing lr (1 + 0.001 i)^-0.75, which over 10,000 steps is the engine's
``lr_schedule="inv"`` (the DANN paper's mu_0 / (1 + 10 p)^0.75) exactly; batch 32 per domain
(TLlib's DANN; CDAN's is 36); 10,000 steps (CDAN's reversal ramp reaches 1 over 10,000
iterations; its runs are longer). Departures: CDAN's SGD is Nesterov and its scheduler
multiplies the decay by 2 (1e-3 in effect, TLlib's value too), neither done here; images are
the reader's 224x224 resize, without the resize-256 / random-crop-224 / flip augmentation of
those codes, and the 10-crop test of CDAN is not done. All Office-31 numbers are unmeasured
(no images here).
The target oracle is this method with the target as the source.
"""

from __future__ import annotations

from typing import Any, Literal

import torch.nn.functional as F
from pydantic import Field, field_validator

from uda_cli.errors import ConfigError, did_you_mean
from uda_cli.methods.base import Method, MethodConfig, OptimSpec
from uda_cli.methods.registry import register_method
from uda_cli.models.classifiers import BottleneckClassifier, classification_backbone, digit_model_name, photo_run
from uda_cli.models.registry import build_model


class SegmentationConfig(MethodConfig):
    """The fields every segmentation method shares: which network F is and how it starts."""

    model: str = Field("auto", description="segmentation network (deeplabv2_r101, fcn8s_vgg16, deeplabv2_small); "
                                           "auto: the domain's own choice, else deeplabv2_r101")
    pretrained: str = Field("auto", description="initialisation: imagenet, none, or a .safetensors file; auto: "
                                                "imagenet for the big networks (and Office-31's ResNet-50), none "
                                                "for the small")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from uda_cli.models.registry import list_models

        known = list_models("segmentation")
        if v != "auto" and v not in known:
            raise ValueError(f"unknown segmentation network {v!r}{did_you_mean(v, known)}; known: "
                             f"{', '.join(known)}")
        return v


@register_method("source-only")
class SourceOnly(Method):
    """Networks: F (encoder), C (classifier)."""

    class Config(SegmentationConfig):
        steps: int = Field(2_000, gt=0, description="see the docstring: ADDA's scripts use 10,000")
        backbone: Literal["auto", "lenet", "svhn", "resnet50"] = Field(
            "auto", description="auto: ResNet-50 on Office-31, the DANN SVHN network when SVHN is involved, "
                                "else LeNet"
        )
        weight_decay: float = 2.5e-5

    tasks = {"classification", "segmentation"}

    @classmethod
    def task_defaults(cls, task: str, domains: tuple[str, ...]) -> dict[str, Any]:
        if task == "classification" and photo_run(domains):
            return dict(OFFICE_RECIPE)
        if task != "segmentation":
            return {}
        return segmentation_defaults(domains)

    @property
    def photo(self) -> bool:
        """Whether this is an Office-31 (ResNet-50) classification run."""
        return self.spec.task == "classification" and isinstance(self.nets["C"], BottleneckClassifier)

    def build(self):
        if self.spec.task == "segmentation":
            return {"F": build_segmentation_net(self.cfg, self.spec)}
        if classification_backbone(self.cfg.backbone, self.spec.domains, self.spec.channels) == "resnet50":
            return build_photo_nets(self.cfg, self.spec)
        return build_digit_nets(self.cfg, self.spec)

    def optimizers(self):
        if self.photo:  # the new layers (C) at 10x, as CDAN's and DANN's Office recipes
            return {"main": OptimSpec.from_config(self.cfg, ("F", "C"), lr_mult={"C": NEW_LAYER_LR_MULT})}
        return super().optimizers()

    def train_step(self, batch, step):
        if self.spec.task == "segmentation":
            loss = segmentation_loss(self.nets["F"](batch["x_s"]), batch["y_s"])
        else:
            loss = F.cross_entropy(self.nets["C"](self.nets["F"](batch["x_s"])), batch["y_s"])
        self.update("main", loss)
        return {"c/cls": loss.detach()}

    def predict(self, x):
        if self.spec.task == "segmentation":
            return self.nets["F"](x)
        return self.nets["C"](self.nets["F"](x))

    def features(self, x):
        if self.spec.task == "segmentation":
            return self.nets["F"].features(x)
        if self.photo:
            return self.nets["C"].features(self.nets["F"](x))
        return self.nets["F"](x)


def build_digit_nets(cfg, spec) -> dict:
    """A digit run's F (encoder) and C (classifier), the network ``cfg.backbone`` picks (auto:
    the DANN SVHN network when SVHN is involved, else LeNet), kept as two networks, as
    checkpoints store them (F.*, C.*). Shared by the methods that also run on segmentation
    (source-only, cbst, crst): a ``--set model=`` there is refused in one line."""
    if getattr(cfg, "model", "auto") != "auto":
        raise ConfigError("--set model applies to segmentation runs; a digit run picks its network with "
                          "--set backbone=lenet|svhn")
    if photo_run(spec.domains):
        raise ConfigError(f"the digit networks take 32x32 digits, not Office-31's {spec.image_size[1]}x"
                          f"{spec.image_size[0]} photos; source-only, dann and i2i train on office31 pairs "
                          "(with the ResNet-50)")
    ch = spec.channels
    net = build_model(digit_model_name(cfg.backbone, spec.domains, ch), num_classes=spec.num_classes, in_channels=ch)
    return {"F": net.F, "C": net.C}


# ---- Office-31: the ResNet-50 (shared with dann) -------------------------------------------------

# CDAN's PyTorch Office-31 recipe (thuml/CDAN pytorch/train_image.py: SGD lr 0.001, momentum 0.9,
# weight_decay 0.0005, "inv" lr with gamma 0.001, power 0.75; new layers at lr_mult 10), batch
# 32 per domain (TLlib's DANN), 10,000 steps; see the module docstring for what differs.
OFFICE_RECIPE = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "inv",
                 "batch_size": 32, "steps": 10_000}
NEW_LAYER_LR_MULT = 10.0  # the bottleneck, classifier and domain classifier: 10x the ResNet's lr


def photo_pretrained_field():
    """The ``pretrained`` field of the classification methods that train the Office-31 ResNet-50."""
    return Field("auto", description="ResNet-50 (Office-31) initialisation: imagenet, none, or a .safetensors file; "
                                     "auto: imagenet. Digit networks start from scratch")


def build_photo_nets(cfg, spec) -> dict:
    """An Office-31 run's F (ImageNet ResNet-50 up to pooling, ``cfg.pretrained``: auto/imagenet,
    none or a .safetensors file) and C (256-d bottleneck, then linear), as two networks (F.*, C.*)."""
    from uda_cli.models.classifiers import resnet50_backbone

    if getattr(cfg, "model", "auto") != "auto":
        raise ConfigError("--set model applies to segmentation runs; an Office-31 run builds the ResNet-50 "
                          "(--set pretrained=imagenet|none|FILE picks its start)")
    f, c = resnet50_backbone(spec.num_classes, pretrained=getattr(cfg, "pretrained", "auto"))
    return {"F": f, "C": c}


# ---- shared by the segmentation methods ---------------------------------------------------------

# DeepLab-v2 as ADVENT trains its source model (advent/domain_adaptation/config.py).
DEEPLAB_RECIPE = {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "poly",
                  "batch_size": 1, "steps": 120_000}
# Digit scenes on a CPU (benchmarks/segmentation.py, docs/methods/source-only.md).
SMALL_RECIPE = {"optimizer": "adam", "lr": 1e-3, "betas": (0.9, 0.999), "weight_decay": 0.0, "lr_schedule": "constant",
                "batch_size": 16, "steps": 1_500, "pretrained": "none"}


def segmentation_defaults(domains: tuple[str, ...]) -> dict[str, Any]:
    """The recipe for a pair: the small CPU one where a domain names ``deeplabv2_small`` as its
    network (the digit scenes do, in their DomainSpec notes), else DeepLab's."""
    from uda_cli.data.registry import get_domain

    models = {get_domain(d).notes.get("model") for d in domains}
    if "deeplabv2_small" in models:
        return {**SMALL_RECIPE, "model": "deeplabv2_small"}
    return dict(DEEPLAB_RECIPE)


def segmentation_net_name(cfg) -> str:
    """The registry name of the segmentation network ``cfg.model`` picks (auto: deeplabv2_r101)."""
    return "deeplabv2_r101" if cfg.model == "auto" else cfg.model


def build_segmentation_net(cfg, spec, **options):
    """The segmentation network ``cfg.model`` (auto: deeplabv2_r101) for ``spec``'s classes;
    ``options`` go to its builder (ADVENT's ``multi_level=True``)."""
    from uda_cli.models.registry import build_model, model_entry

    name = segmentation_net_name(cfg)
    if model_entry(name).task != "segmentation":
        raise ConfigError(f"{name} is a {model_entry(name).task} network; pick a segmentation one with --set model=, "
                          "e.g. deeplabv2_r101, fcn8s_vgg16, deeplabv2_small")
    pretrained = cfg.pretrained
    if pretrained == "auto":
        pretrained = "none" if name == "deeplabv2_small" else "imagenet"
    return build_model(name, num_classes=spec.num_classes, pretrained=pretrained, **options)


def upsample_to(logits, labels):
    """Logits at the network's stride, upsampled bilinearly (align_corners=True, as ADVENT and
    CRST) to the labels' [H, W]."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    return logits


def segmentation_loss(logits, labels, ignore_index: int = 255):
    """Pixel cross-entropy: logits at the network's stride, upsampled (bilinear,
    align_corners=True, as ADVENT and CRST) to the labels' size; 255 is ignored."""
    logits = upsample_to(logits, labels)
    # Summed over the labelled pixels and divided by their count (at least 1): a crop that holds
    # only ignored pixels gives 0, where the mean would be NaN.
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)
