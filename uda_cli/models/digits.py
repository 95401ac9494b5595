"""Encoders and classifiers for 32x32 digit images.

``LeNetEncoder``/``LeNetClassifier`` follow ADDA (Tzeng et al. 2017), the usual digits
backbone: conv(20, 5x5) - pool - ReLU - conv(50, 5x5) - dropout - pool - ReLU - fc 500.
ADDA feeds 28x28 images; every digit here is 32x32, so the fc layer sees 50x5x5 inputs
instead of 50x4x4.

``SVHNEncoder``/``SVHNClassifier`` are the wider colour-digit network of DANN (Ganin &
Lempitsky 2015, SVHN architecture): conv 64-64-128 (5x5) with 3x3/2 max-pooling, then fc
3072 - 2048 - classes. We add batch norm after each conv (as most public re-implementations
do) because without it the network trains slowly at the digit learning rates.
"""

from __future__ import annotations

from torch import nn


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


def digit_backbone(kind: str, channels: int, num_classes: int, domains: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module]:
    """``(encoder F, classifier C)``; ``kind`` is lenet, svhn, or auto.

    auto: the wide SVHN network when a run involves SVHN (colour house numbers), else LeNet
    with as many input channels as the run has (MNIST-M is colour but MNIST-sized and
    MNIST-shaped, and the DANN paper used a LeNet-sized net for MNIST->MNIST-M). Without
    domain names, auto falls back to the channel count (svhn for colour).
    """
    if kind == "auto":
        if domains:
            kind = "svhn" if any(d.startswith("svhn") for d in domains) else "lenet"
        else:
            kind = "lenet" if channels == 1 else "svhn"
    if kind == "lenet":
        f = LeNetEncoder(channels)
        return f, LeNetClassifier(num_classes, f.out_features)
    if kind == "svhn":
        f = SVHNEncoder(channels)
        return f, SVHNClassifier(num_classes, f.out_features)
    raise ValueError(f"unknown digit backbone {kind!r}")
