"""Encoders and classifiers: image -> features (``F``), features -> class logits (``C``).

Digits (32x32; registered as ``lenet`` and ``svhn_dann``, see :func:`digit_model_name` for
which one a method's ``backbone=auto`` picks):

- ``LeNetEncoder``/``LeNetClassifier`` follow ADDA (Tzeng et al. 2017), the usual digits
  backbone: conv(20, 5x5) - pool - ReLU - conv(50, 5x5) - dropout - pool - ReLU - fc 500.
  ADDA feeds 28x28 images; every digit here is 32x32, so the fc layer sees 50x5x5 inputs
  instead of 50x4x4.
- ``SVHNEncoder``/``SVHNClassifier`` are the wider colour-digit network of DANN (Ganin &
  Lempitsky 2015, SVHN architecture): conv 64-64-128 (5x5) with 3x3/2 max-pooling, then fc
  3072 - 2048 - classes. We add batch norm after each conv (as most public re-implementations
  do) because without it the network trains slowly at the digit learning rates.
- ``DTNEncoder`` is DTN's f (Taigman, Polyak & Wolf, ICLR 2017, section 5.1).

Photos (Office-31): ``ResNet50Encoder`` (ImageNet ResNet-50 features, 2048-d) and
``BottleneckClassifier`` (a 256-d bottleneck then a linear layer), the F and C that
``source-only`` and ``dann`` build for ``office31-*`` pairs (:func:`classification_backbone`
picks them: ``backbone=auto`` on an Office-31 domain, or ``backbone=resnet50``), and
``ResNet50FeatureMap`` + ``PooledClassifier``, I2I's Office encoder (its 7x7x2048 map at 224x224
is the latent z the decoders draw from) and classifier. None of them is in the model registry
(``list_models("classification")`` stays the digit networks): methods build them here.

``pretrained`` (``--set pretrained=``): ``imagenet`` (the default), ``none`` (torchvision's
initialisation), or a ``.safetensors`` file of ResNet-50 weights under torchvision's names
(``conv1.weight``, ``layer1.0.conv1.weight``...; ``fc.*`` is dropped) or under any one prefix
(our ``net.``, a run checkpoint's ``F.net.``); see :func:`resolve_resnet_init`.

The ResNet-50 weights come through torchvision's weight API (``ResNet50_Weights.IMAGENET1K_V1``,
the original torchvision ImageNet weights most UDA papers start from). torchvision keeps them in
``$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`` (``TORCH_HOME`` defaults to
``~/.cache/torch``). We never download them ourselves: when the file is missing, building the
network stops with one line (a ConfigError, as the segmentation networks' missing ImageNet
weights in ``uda_cli.models.segmentation.imagenet_state``) naming the file, its URL and
$TORCH_HOME; tests and from-scratch runs pass ``pretrained=False`` (``--set pretrained=none``).
Two departures from calling ``resnet50(weights=...)`` directly, both
about the file on disk: the file's sha256 must start with the 8 hex digits in its name (torch
checks that only while downloading), and it is loaded with ``weights_only=True`` (torch's
restricted unpickler, which builds tensors and plain containers only; the default would run
arbitrary pickle code).

Images reach every network here as float in [-1, 1] (``uda_cli.data.transforms.normalize``);
``ImageNetInput`` maps them to the ImageNet mean/std normalisation ImageNet weights were
trained with (the segmentation networks use it too).

Module attribute names (``conv``, ``fc``, ``net``, ``F``, ``C``...) are the keys of saved
checkpoints: renaming one breaks every run saved before.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.models.registry import register_model

# ---- digits -----------------------------------------------------------------------------------


class LeNetEncoder(nn.Module):
    out_features = 500

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, 20, 5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
            nn.Conv2d(20, 50, 5), nn.Dropout2d(0.5), nn.MaxPool2d(2), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(50 * 5 * 5, self.out_features)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class LeNetClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 500):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Dropout(0.5), nn.Linear(in_features, num_classes))

    def forward(self, f):
        return self.net(f)


class SVHNEncoder(nn.Module):
    out_features = 3072

    def __init__(self, in_channels: int = 3):
        super().__init__()

        def block(cin, cout, pool):
            layers = [nn.Conv2d(cin, cout, 5, padding=2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return layers + ([nn.MaxPool2d(3, 2)] if pool else [])

        self.conv = nn.Sequential(*block(in_channels, 64, True), *block(64, 64, True), *block(64, 128, False))
        self.fc = nn.Linear(128 * 7 * 7, self.out_features)

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class SVHNClassifier(nn.Module):
    def __init__(self, num_classes: int = 10, in_features: int = 3072):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Dropout(0.5), nn.Linear(in_features, 2048), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(2048, num_classes),
        )

    def forward(self, f):
        return self.net(f)


class DigitNet(nn.Module):
    """A digit encoder ``F`` and classifier ``C`` as one network: ``forward(x)`` gives class
    logits ``[B, K]``, ``features(x)`` the encoder's embedding. What ``build_model("lenet")``
    and ``build_model("svhn_dann")`` return; a method that keeps F and C as two networks
    (source-only, DANN, I2I) takes ``.F`` and ``.C`` out of it."""

    task = "classification"

    def __init__(self, encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.F = encoder
        self.C = classifier

    def forward(self, x):
        return self.C(self.F(x))

    def features(self, x):
        return self.F(x)


def _check_digit_options(num_classes, in_channels) -> None:
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, not {num_classes!r}")
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, not {in_channels!r}")


@register_model("lenet", task="classification")
def lenet(num_classes: int = 10, in_channels: int = 1) -> DigitNet:
    """LeNet as ADDA uses it (Tzeng et al. 2017), for 32x32 digits."""
    _check_digit_options(num_classes, in_channels)
    f = LeNetEncoder(in_channels)  # F before C: the order in which they draw their initial weights
    return DigitNet(f, LeNetClassifier(num_classes, f.out_features))


@register_model("svhn_dann", task="classification")
def svhn_dann(num_classes: int = 10, in_channels: int = 3) -> DigitNet:
    """DANN's SVHN network (Ganin & Lempitsky 2015) with batch norm, for 32x32 digits."""
    _check_digit_options(num_classes, in_channels)
    f = SVHNEncoder(in_channels)
    return DigitNet(f, SVHNClassifier(num_classes, f.out_features))


# The methods' ``backbone`` choices (``--set backbone=``) and the registry names they build.
DIGIT_BACKBONES = {"lenet": "lenet", "svhn": "svhn_dann"}


def digit_model_name(backbone: str, domains: tuple[str, ...], channels: int) -> str:
    """The registered digit network for a method's ``backbone`` choice: lenet, svhn, or auto.

    auto: the wide SVHN network when a run involves SVHN (colour house numbers), else LeNet
    with as many input channels as the run has (MNIST-M is colour but MNIST-sized and
    MNIST-shaped, and the DANN paper used a LeNet-sized net for MNIST->MNIST-M). Without
    domain names, auto falls back to the channel count (svhn for colour).
    """
    if backbone == "auto":
        if domains:
            backbone = "svhn" if any(d.startswith("svhn") for d in domains) else "lenet"
        else:
            backbone = "lenet" if channels == 1 else "svhn"
    if backbone not in DIGIT_BACKBONES:
        raise ValueError(f"unknown digit backbone {backbone!r}; use one of: auto, {', '.join(DIGIT_BACKBONES)}")
    return DIGIT_BACKBONES[backbone]


class DTNEncoder(nn.Module):
    """DTN's f: "four convolutional layers, each with 64, 128, 256, 128 filters respectively,
    each followed by max pooling and ReLU"; input 32x32, output 128-d. The paper gives no
    kernel sizes: 3x3 convolutions (padding 1) with 2x2 pooling take 32 -> 4, and the last
    pooling is 4x4 so the output is 1x1x128. ``output="tanh"`` bounds the features (batch norm
    then tanh in place of the last ReLU; see ``uda_cli.methods.dtn``)."""

    out_features = 128

    def __init__(self, in_channels: int = 3, output: str = "relu"):
        super().__init__()

        def block(cin, cout, pool):
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.MaxPool2d(pool), nn.ReLU(inplace=True)]

        last = block(256, self.out_features, 4)
        if output == "tanh":  # bounded features: batch norm then tanh in place of the last ReLU
            last = [*last[:2], nn.BatchNorm2d(self.out_features), nn.Tanh()]
        elif output != "relu":
            raise ValueError(f"output must be relu or tanh, not {output!r}")
        self.net = nn.Sequential(*block(in_channels, 64, 2), *block(64, 128, 2), *block(128, 256, 2), *last)

    def forward(self, x):
        return self.net(x).flatten(1)  # [B, 128]


# ---- photos: ImageNet ResNet-50 ---------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_weights():
    from torchvision.models import ResNet50_Weights

    return ResNet50_Weights.IMAGENET1K_V1


def weights_path() -> Path:
    """Where torchvision keeps (and looks for) the ImageNet ResNet-50 weights."""
    url = imagenet_weights().url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _how_to_get(path: Path) -> str:
    return (
        f"download {imagenet_weights().url} (torchvision's ResNet50_Weights.IMAGENET1K_V1; on a machine with "
        "internet `python -c \"from torchvision.models import resnet50, ResNet50_Weights; "
        "resnet50(weights=ResNet50_Weights.IMAGENET1K_V1)\"` fetches it) to $TORCH_HOME/hub/checkpoints/"
        f"{path.name} (TORCH_HOME defaults to ~/.cache/torch), or train from scratch with --set pretrained=none"
    )


def _missing_message(path: Path) -> str:
    return f"ResNet-50 ImageNet weights not found at {path}; {_how_to_get(path)}"


def check_weights_file(path: Path) -> None:
    """The sha256 of ``path`` must start with the hex digits in its name (torchvision's
    ``<arch>-<sha256 prefix>.pth`` convention)."""
    m = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if not m:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    if not h.hexdigest().startswith(m.group(1)):
        raise ConfigError(
            f"{path} is damaged (its sha256 does not start with {m.group(1)}); delete it, then {_how_to_get(path)}"
        )


def resolve_resnet_init(pretrained: Any) -> str | Path:
    """``"imagenet"``, ``"none"`` or the Path of a ``.safetensors`` file, from a method's
    ``pretrained`` (``auto`` and True mean imagenet; False and None mean none). A file is
    checked as the segmentation networks check theirs (``resolve_pretrained``: it exists, it
    is safetensors, never a pickle)."""
    if pretrained is True or (isinstance(pretrained, str) and pretrained.lower() in ("auto", "imagenet")):
        return "imagenet"
    if pretrained is None or pretrained is False or (isinstance(pretrained, str) and pretrained.lower() == "none"):
        return "none"
    from uda_cli.models.segmentation import resolve_pretrained  # imports this module: imported here

    return resolve_pretrained(pretrained, "resnet50", imagenet=True)


def _resnet_state_from_file(path: Path) -> dict[str, torch.Tensor]:
    """A ResNet-50 state under torchvision's names from a safetensors file whose keys are
    torchvision's or carry one prefix (``net.``, ``F.net.``...); ``fc.*`` is dropped."""
    from uda_cli.models.segmentation import read_model_file

    state = read_model_file(path)[0]
    prefixes = sorted({k[: -len("conv1.weight")] for k in state if k.endswith("conv1.weight") and "layer" not in k})
    if len(prefixes) != 1:
        found = ", ".join(repr(p) for p in prefixes) or "none"
        raise CheckpointError(f"{path} does not hold one ResNet-50 (first-conv keys '<prefix>conv1.weight' found: "
                              f"{found}); pass a file of torchvision ResNet-50 weights")
    prefix = prefixes[0]
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and not k[len(prefix):].startswith("fc.")}


class ImageNetInput(nn.Module):
    """[-1, 1] images -> ImageNet normalisation: (x + 1) / 2, then (x - mean) / std."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return ((x + 1) * 0.5 - self.mean) / self.std


class ResNet50Encoder(nn.Module):
    """ResNet-50 up to global average pooling: [B, 3, H, W] in [-1, 1] -> [B, 2048].

    ``pretrained``: True / ``"imagenet"`` / ``"auto"`` (torchvision's ImageNet weights, from its
    cache only), False / ``"none"``, or a ``.safetensors`` file (:func:`resolve_resnet_init`)."""

    out_features = 2048

    def __init__(self, pretrained: Any = True):
        super().__init__()
        from torchvision.models import resnet50

        init = resolve_resnet_init(pretrained)
        state, source = None, ""
        if init == "imagenet":  # the file first: a missing one is said before any work is done
            weights = imagenet_weights()
            path = weights_path()
            if not path.is_file():
                raise ConfigError(_missing_message(path))
            check_weights_file(path)
            try:
                state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
            except Exception as e:  # an unreadable file: say so in one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ConfigError(f"could not load {path} ({first}); delete it, then {_how_to_get(path)}") from None
            source = "torchvision's ImageNet ResNet-50"
        elif isinstance(init, Path):
            state, source = _resnet_state_from_file(init), str(init)
        net = resnet50(weights=None)
        if state is not None:
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                what = "; ".join(filter(None, [f"missing {', '.join(missing[:3])}" if missing else "",
                                               f"unexpected {', '.join(unexpected[:3])}" if unexpected else ""]))
                raise CheckpointError(f"{source} does not fit ResNet-50: {what}; pass torchvision ResNet-50 weights")
        net.fc = nn.Identity()  # the 1000-way ImageNet head is replaced by the method's classifier
        self.input = ImageNetInput()
        self.net = net

    def forward(self, x):
        return self.net(self.input(x))

    def feature_map(self, x):
        """The last block's output before pooling: [B, 2048, H/32, W/32] (7x7 at 224x224)."""
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(self.input(x)))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))


class ResNet50FeatureMap(ResNet50Encoder):
    """ResNet-50 without its pooling: [B, 3, H, W] -> [B, 2048, H/32, W/32], I2I's Office
    encoder f (its latent z is this map, which the decoders draw back to the image)."""

    out_channels = 2048

    def forward(self, x):
        return self.feature_map(x)


class BottleneckClassifier(nn.Module):
    """The head DANN's Office-31 re-implementations put on ResNet-50: 2048 -> a 256-d bottleneck
    (linear, batch norm, ReLU: TLlib's ``dann.ImageClassifier``; CDAN's PyTorch code uses a bare
    linear bottleneck) -> a linear layer to the classes. ``features(f)`` is the bottleneck
    output, what DANN's domain classifier reads."""

    def __init__(self, num_classes: int, in_features: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.out_features = bottleneck
        self.bottleneck = nn.Sequential(
            nn.Linear(in_features, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(bottleneck, num_classes)

    def features(self, f):
        return self.bottleneck(f)

    def forward(self, f):
        return self.fc(self.bottleneck(f))


class PooledClassifier(BottleneckClassifier):
    """I2I's Office classifier h on the latent map: global average pooling, then the bottleneck
    classifier (ours: the paper does not give its Office h)."""

    def features(self, z):
        return self.bottleneck(z.mean((2, 3)) if z.dim() == 4 else z)

    def forward(self, z):
        return self.fc(self.features(z))


def resnet50_backbone(num_classes: int, pretrained: Any = True, bottleneck: int = 256) -> tuple[nn.Module, nn.Module]:
    """``(encoder F, classifier C)``: ImageNet ResNet-50 features and a bottleneck classifier.

    Methods give F a tenth of C's learning rate (``OptimSpec.lr_mult``: C at 10x)."""
    f = ResNet50Encoder(pretrained=pretrained)
    return f, BottleneckClassifier(num_classes, f.out_features, bottleneck)


# ---- which classification network a run builds -------------------------------------------------

PHOTO_PREFIXES = ("office31-",)  # domains whose runs take the ImageNet ResNet-50 (backbone=auto)


def photo_run(domains: tuple[str, ...]) -> bool:
    """Whether a run involves an Office-31 domain: its networks are the ResNet-50 ones."""
    return any(str(d).startswith(PHOTO_PREFIXES) for d in domains)


def classification_backbone(backbone: str, domains: tuple[str, ...], channels: int) -> str:
    """``"resnet50"`` for ``backbone=resnet50``, or ``auto`` on a run with an Office-31 domain;
    otherwise the registered digit network :func:`digit_model_name` picks."""
    if backbone == "resnet50" or (backbone == "auto" and photo_run(domains)):
        if channels != 3:
            raise ConfigError(f"the ResNet-50 takes colour images, and this run has {channels} channel; "
                              "use colour domains (or --set grayscale=false where a method has it)")
        return "resnet50"
    return digit_model_name(backbone, domains, channels)
