"""Decoders and discriminators for 32x32 digit images, in the sizes of I2I (Murez et al. 2018).

The paper gives only the layer counts for digits: decoders of 3 transposed convolutions whose
first layers the two domains share, an image discriminator of 3 convolutions and a feature
discriminator of 3 fully connected layers. Widths, kernels, normalisation and activations
below are ours (DCGAN-style): where a choice matters it says why.

``DecoderTrunk`` + ``DecoderHead`` make one decoder of three transposed convs (1x1 -> 8x8 ->
16x16 -> 32x32, the first written as a Linear) and a tanh, so outputs lie in [-1, 1] like the
images. The trunk is shared by g_x and g_y: the first two layers by default, or the first one
only (``shared_layers=1``), each domain then having its own last two.
"""

from __future__ import annotations

from torch import nn


class DecoderTrunk(nn.Module):
    """Latent vector [B, z_dim] -> feature map (the decoders' shared layers).

    ``shared_layers=2`` (default): [B, 64, 16, 16], the first two of the three transposed
    convolutions; ``shared_layers=1``: [B, width, 8, 8], the first one only, so each domain
    keeps two layers of its own. The first layer is a transposed convolution with an 8x8
    kernel over a 1x1 map, written as the ``Linear`` it equals (z_dim -> width*8*8): the same
    function and parameter count, but CPU convolution kernels are ~4x slower on that shape.
    """

    def __init__(self, z_dim: int, width: int = 128, shared_layers: int = 2):
        super().__init__()
        if shared_layers not in (1, 2):
            raise ValueError(f"shared_layers must be 1 or 2, not {shared_layers}")
        self.width = width
        self.out_channels = 64 if shared_layers == 2 else width
        self.fc = nn.Linear(z_dim, width * 8 * 8)  # = ConvTranspose2d(z_dim, width, 8) on 1x1: 1 -> 8
        layers = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if shared_layers == 2:
            layers += [nn.ConvTranspose2d(width, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]  # 8 -> 16
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.fc(z.flatten(1)).view(z.shape[0], self.width, 8, 8))


class DecoderHead(nn.Module):
    """A domain's own layers: the trunk's map -> image [B, C, 32, 32] in [-1, 1]. After a
    two-layer trunk (16x16 in) one transposed conv; after a one-layer trunk (8x8 in) two."""

    def __init__(self, channels: int, in_channels: int = 64, own_layers: int = 1):
        super().__init__()
        if own_layers not in (1, 2):
            raise ValueError(f"own_layers must be 1 or 2, not {own_layers}")
        layers = []
        if own_layers == 2:
            layers += [nn.ConvTranspose2d(in_channels, 64, 4, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]  # 8 -> 16
            in_channels = 64
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(in_channels, channels, 4, 2, 1), nn.Tanh())  # 16 -> 32

    def forward(self, h):
        return self.net(h)


class ImageDiscriminator(nn.Module):
    """3 convolutions, 32x32 image -> one logit. No batch norm: real and fake batches go
    through separately, and batch statistics of an all-fake batch would tell them apart."""

    def __init__(self, channels: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),  # 32 -> 16
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),  # 16 -> 8
            nn.Conv2d(2 * width, 1, 8),  # 8 -> 1
        )

    def forward(self, x):
        return self.net(x).flatten()


class FeatureDiscriminator(nn.Module):
    """3 fully connected layers, latent vector -> one logit (ADDA's 500-500-1 discriminator)."""

    def __init__(self, z_dim: int, width: int = 500):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, width), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(width, width), nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(width, 1),
        )

    def forward(self, z):
        return self.net(z.flatten(1)).flatten()
