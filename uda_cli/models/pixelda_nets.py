"""The generator and discriminator of PixelDA (Bousmalis et al. CVPR 2017, Figure 2).

``PixelDAGenerator`` G(x, z): the 10-d noise z goes through a fully connected layer (batch
norm, ReLU) to one image-sized plane that is concatenated with x as an extra input channel;
then conv n64s1 + ReLU, ``blocks`` residual blocks (conv-BN-ReLU-conv-BN, identity skip)
and a 1x1 conv to the output channels with tanh. All convs are 3x3, stride 1, so G keeps
the image size.

``PixelDADiscriminator`` D(x): conv n64s1 + leaky ReLU(0.2), then stride-2 convs doubling
the filters (n128s2, n256s2, n512s2 for 32x32) with batch norm and leaky ReLU until the
map is 4x4, then one fully connected logit. In training mode every layer's input gets
Gaussian noise and every conv block's output dropout (the image input's noise can be
switched off); in eval mode both are identities.

Layer details not drawn in the figure (batch norm on the noise projection, the 1x1 output
conv, no batch norm on D's first conv, N(0, 0.02) initialisation, the 4x4 stopping size)
follow the authors' released TensorFlow code (tensorflow/models,
research/domain_adaptation/pixel_domain_adaptation/pixelda_model.py).

``TaskNet`` joins an encoder and a classifier into one network T so that T's encoder can
give ``features``.
"""

from __future__ import annotations

import torch
from torch import nn


class GaussianNoise(nn.Module):
    """x + N(0, std^2) in training mode, x in eval mode (draws from torch's global generator)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}"


class ResidualBlock(nn.Module):
    def __init__(self, filters: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(filters, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3, padding=1), nn.BatchNorm2d(filters),
        )

    def forward(self, x):
        return x + self.body(x)


class PixelDAGenerator(nn.Module):
    def __init__(self, channels: int, image_size: tuple[int, int], noise_dim: int = 10, filters: int = 64,
                 blocks: int = 6):
        super().__init__()
        self.noise_dim = noise_dim
        self.image_size = tuple(image_size)
        h, w = self.image_size
        self.noise_fc = nn.Sequential(nn.Linear(noise_dim, h * w), nn.BatchNorm1d(h * w), nn.ReLU(inplace=True))
        self.net = nn.Sequential(
            nn.Conv2d(channels + 1, filters, 3, padding=1), nn.ReLU(inplace=True),
            *[ResidualBlock(filters) for _ in range(blocks)],
            nn.Conv2d(filters, channels, 1), nn.Tanh(),
        )
        init_normal(self)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        plane = self.noise_fc(z).view(x.shape[0], 1, *self.image_size).to(x.dtype)
        return self.net(torch.cat([x, plane], 1))


class PixelDADiscriminator(nn.Module):
    def __init__(self, channels: int, image_size: tuple[int, int], filters: int = 64, noise_std: float = 0.2,
                 image_noise: bool = True, dropout: float = 0.1, leak: float = 0.2, min_size: int = 4):
        super().__init__()
        layers: list[nn.Module] = [GaussianNoise(noise_std if image_noise else 0.0),
                                   nn.Conv2d(channels, filters, 3, padding=1), nn.LeakyReLU(leak, inplace=True),
                                   nn.Dropout(dropout), GaussianNoise(noise_std)]
        h, w = image_size
        cin, cout = filters, filters
        while max(h, w) > min_size:
            cout *= 2
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(leak, inplace=True), nn.Dropout(dropout), GaussianNoise(noise_std)]
            cin, h, w = cout, (h + 1) // 2, (w + 1) // 2
        self.features = nn.Sequential(*layers)
        self.logit = nn.Linear(cin * h * w, 1)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One real/fake logit per image, shape [B]."""
        return self.logit(self.features(x).flatten(1)).squeeze(1)


class TaskNet(nn.Module):
    """T = C(F(x)): a digit encoder F and classifier C (``uda_cli.models.digits``)."""

    def __init__(self, encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.F = encoder
        self.C = classifier

    def forward(self, x):
        return self.C(self.F(x))


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """Conv and linear weights ~ N(0, std), biases 0 (the authors' code, after DCGAN)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
