"""ResNet-50 backbone with ImageNet initialisation, for Office-31 and other photo domains.

The weights come through torchvision's weight API (``ResNet50_Weights.IMAGENET1K_V1``, the
original torchvision ImageNet weights most UDA papers start from). torchvision keeps them in
``$TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth`` (``TORCH_HOME`` defaults to
``~/.cache/torch``). We never download them ourselves: when the file is missing, building the
network stops with one line saying how to fetch it; tests and from-scratch runs pass
``pretrained=False``.

Two departures from calling ``resnet50(weights=...)`` directly, both about the file on disk:
the file's sha256 must start with the 8 hex digits in its name (torch checks that only while
downloading), and it is loaded with ``weights_only=True`` (torch's restricted unpickler, which
builds tensors and plain containers only; the default would run arbitrary pickle code).

Images reach every network here as float in [-1, 1] (``uda_cli.data.transforms.normalize``);
the encoder maps them to the ImageNet mean/std normalisation the weights were trained with.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from torch import nn

from uda_cli.errors import UDAError

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
        "on a machine with internet run `python -c \"from torchvision.models import resnet50, ResNet50_Weights; "
        "resnet50(weights=ResNet50_Weights.IMAGENET1K_V1)\"` and copy "
        f"{path.name} into $TORCH_HOME/hub/checkpoints/ here (TORCH_HOME defaults to ~/.cache/torch), "
        "or train from scratch with pretrained=false"
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
        raise UDAError(
            f"{path} is damaged (its sha256 does not start with {m.group(1)}); delete it, then {_how_to_get(path)}"
        )


class ImageNetInput(nn.Module):
    """[-1, 1] images -> ImageNet normalisation: (x + 1) / 2, then (x - mean) / std."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return ((x + 1) * 0.5 - self.mean) / self.std


class ResNet50Encoder(nn.Module):
    """ResNet-50 up to global average pooling: [B, 3, H, W] in [-1, 1] -> [B, 2048]."""

    out_features = 2048

    def __init__(self, pretrained: bool = True):
        super().__init__()
        from torchvision.models import resnet50

        state = None
        if pretrained:  # the file first: a missing one is said before any work is done
            weights = imagenet_weights()
            path = weights_path()
            if not path.is_file():
                raise UDAError(_missing_message(path))
            check_weights_file(path)
            try:
                state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
            except Exception as e:  # an unreadable file: say so in one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UDAError(f"could not load {path} ({first}); delete it and fetch it again") from None
        net = resnet50(weights=None)
        if state is not None:
            net.load_state_dict(state)
        net.fc = nn.Identity()  # the 1000-way ImageNet head is replaced by the method's classifier
        self.input = ImageNetInput()
        self.net = net

    def forward(self, x):
        return self.net(self.input(x))


class BottleneckClassifier(nn.Module):
    """The head most Office-31 methods put on ResNet-50 (DANN's, in TLlib and CDAN):
    2048 -> bottleneck (linear, batch norm, ReLU, dropout 0.5) -> classes."""

    def __init__(self, num_classes: int, in_features: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.bottleneck = nn.Sequential(
            nn.Linear(in_features, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(inplace=True), nn.Dropout(0.5)
        )
        self.fc = nn.Linear(bottleneck, num_classes)

    def forward(self, f):
        return self.fc(self.bottleneck(f))


def resnet50_backbone(num_classes: int, pretrained: bool = True, bottleneck: int = 256) -> tuple[nn.Module, nn.Module]:
    """``(encoder F, classifier C)``: ImageNet ResNet-50 features and a bottleneck classifier.

    Methods usually give F a tenth of C's learning rate when F is pretrained (``lr_mult``).
    """
    f = ResNet50Encoder(pretrained=pretrained)
    return f, BottleneckClassifier(num_classes, f.out_features, bottleneck)
