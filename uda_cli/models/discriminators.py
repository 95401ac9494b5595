"""Discriminators: networks that tell domains, or real images from generated ones, apart.

- ``DomainClassifier``: DANN's D (Ganin & Lempitsky, ICML 2015) on encoder features.
- ``PixelDADiscriminator``: PixelDA's D (Bousmalis et al. CVPR 2017, Figure 2).
- ``DTNDiscriminator``: DTN's three-class D (Taigman, Polyak & Wolf, ICLR 2017, section 5.1).
- ``ImageDiscriminator``, ``FeatureDiscriminator``: I2I's Q_tr and Q_z (Murez et al. CVPR 2018).
- ``DropoutDomainClassifier``: DANN's D for Office-31 (on the 256-d bottleneck).
- ``PatchImageDiscriminator``, ``MapFeatureDiscriminator``: I2I's Office-31 Q_tr and Q_z.
- ``EntropyDiscriminator``: ADVENT's fully-convolutional D on entropy maps (Vu et al. CVPR 2019);
  TPLD reuses it.
- ``LSDDiscriminator``: LSD-seg's patch D (Sankaranarayanan et al. CVPR 2018), four domain
  classes per patch and an auxiliary per-pixel class head.

None of these is in the model registry: no method lets a user swap them with
``--set model=``, and they are not classifiers of the data's classes.

Module attribute names (``net``, ``features``, ``logit``) are the keys of saved checkpoints:
renaming one breaks every run saved before.
"""

from __future__ import annotations

import torch
from torch import nn

from uda_cli.models.generators import LSDResBlock, dcgan_init, init_normal

# ---- DANN -------------------------------------------------------------------------------------


class DomainClassifier(nn.Module):
    """DANN's D: ReLU - fc hidden - ReLU - fc hidden - ReLU - fc 2 on the (linear) encoder
    features (the leading ReLU is the one that starts C, since F's last layer is linear)."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(), nn.Linear(in_features, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2),
        )

    def forward(self, f):
        return self.net(f)


# ---- PixelDA ----------------------------------------------------------------------------------


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


class PixelDADiscriminator(nn.Module):
    """PixelDA's D(x): conv n64s1 + leaky ReLU(0.2), then stride-2 convs doubling the filters
    (n128s2, n256s2, n512s2 for 32x32) with batch norm and leaky ReLU until the map is 4x4,
    then one fully connected logit. In training mode every layer's input gets Gaussian noise
    and every conv block's output dropout (the image input's noise can be switched off); in
    eval mode both are identities.

    Details not drawn in the paper's figure (no batch norm on the first conv, N(0, 0.02)
    initialisation, the 4x4 stopping size) follow the authors' released TensorFlow code
    (tensorflow/models, research/domain_adaptation/pixel_domain_adaptation/pixelda_model.py).
    """

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


# ---- DTN --------------------------------------------------------------------------------------


class DTNDiscriminator(nn.Module):
    """DTN's D: "four batch-normalization, ReLU, convolution blocks, ending with 3 neurons":
    3x3 stride-2 convolutions with 128, 256, 512 filters, then a 4x4 convolution to the 3
    logits. The first block has no batch norm and ReLU on the raw image (a ReLU there would
    drop the dark half of an image in [-1, 1]). DCGAN initialisation (the paper is silent)."""

    def __init__(self, in_channels: int = 1, num_outputs: int = 3):
        super().__init__()

        def block(cin, cout):
            return [nn.BatchNorm2d(cin), nn.ReLU(True), nn.Conv2d(cin, cout, 3, 2, 1)]

        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 128, 3, 2, 1),  # 32 -> 16
            *block(128, 256),  # 8
            *block(256, 512),  # 4
            nn.BatchNorm2d(512), nn.ReLU(True), nn.Conv2d(512, num_outputs, 4),  # 1
        )
        dcgan_init(self)

    def forward(self, x):
        return self.net(x).flatten(1)


# ---- I2I --------------------------------------------------------------------------------------
# The paper gives only the layer counts for digits: an image discriminator of 3 convolutions and
# a feature discriminator of 3 fully connected layers. Widths, kernels and activations are ours.


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


# ---- Office-31 (DANN, I2I) --------------------------------------------------------------------


class DropoutDomainClassifier(nn.Module):
    """DANN's domain classifier for Office-31 on the 256-d bottleneck: fc 1024 - ReLU - dropout
    0.5 - fc 1024 - ReLU - dropout 0.5 - fc, as CDAN's PyTorch code builds it
    (``AdversarialNetwork(256, 1024)`` in thuml/CDAN pytorch/network.py) and the DANN paper
    describes its Office domain classifier (1024-1024, dropout). Two logits (domain 0 / 1) with
    cross-entropy instead of CDAN's one sigmoid output with BCE: the same loss."""

    def __init__(self, in_features: int = 256, hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, 2),
        )

    def forward(self, f):
        return self.net(f)


class PatchImageDiscriminator(nn.Module):
    """I2I's Office Q_tr: 4 stride-2 convolutions (4x4, padding 1; 3 -> 64 -> 128 -> 256 -> 1),
    leaky ReLU 0.2 between, no normalisation (as the digit Q_tr): a 224x224 image -> 14x14
    patch logits, returned flat ``[B * 14 * 14]`` (every patch is one real/fake decision). The
    layer count is the paper's (examples/i2i/office31.toml); widths and kernels are ours."""

    def __init__(self, channels: int = 3, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * width, 1, 4, 2, 1),
        )

    def forward(self, x):
        return self.net(x).flatten()


class MapFeatureDiscriminator(nn.Module):
    """I2I's Office Q_z on the latent map: three 1x1 convolutions (in -> 500 -> 500 -> 1, leaky
    ReLU 0.2 between; the digit Q_z's widths) and global average pooling: one logit per image.
    The form (1x1 convs, pooling) is the paper's (examples/i2i/office31.toml); widths are ours."""

    def __init__(self, in_channels: int = 2048, width: int = 500):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, z):
        return self.net(z).mean((2, 3)).flatten()


# ---- ADVENT -----------------------------------------------------------------------------------


class EntropyDiscriminator(nn.Module):
    """ADVENT's D (Vu et al., "ADVENT: Adversarial Entropy Minimization for Domain Adaptation
    in Semantic Segmentation", CVPR 2019; ``get_fc_discriminator`` in valeoai/ADVENT), written
    generic: any ``[B, in_channels, H, W]`` map (ADVENT: the K-channel weighted
    self-information map) -> ``[B, 1, H/32, W/32]`` logits, one per patch.

    Five 4x4 convolutions, stride 2, padding 1: in_channels -> ndf -> 2 ndf -> 4 ndf -> 8 ndf
    -> 1, leaky ReLU 0.2 after the first four, no normalisation, no sigmoid (train it with
    BCE-with-logits). PyTorch's default initialisation, as ADVENT's.
    """

    def __init__(self, in_channels: int, ndf: int = 64):
        super().__init__()
        widths = (in_channels, ndf, 2 * ndf, 4 * ndf, 8 * ndf)
        layers: list[nn.Module] = []
        for cin, cout in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv2d(8 * ndf, 1, 4, stride=2, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- LSD-seg -----------------------------------------------------------------------------------


class LSDDiscriminator(nn.Module):
    """LSD-seg's D (``_netD`` in swamiviv/LSD-seg): an image ``[B, C, H, W]`` in [-1, 1] ->
    ``(domain logits [B, 4, h, w], class logits [B, num_classes, h, w])``, h ~ H/8.

    A 4x4 stride-2 conv (padding 2) to ``width`` (128 in the code), instance norm, leaky ReLU
    0.2; three groups of ``blocks`` (3) residual blocks (:class:`LSDResBlock`: instance norm,
    leaky ReLU, dropout 0.5) with a 2x2 max-pool between groups; two 3x3 heads: ``domain``, the
    4-way patch classifier (source-real, source-fake, target-real, target-fake: the order of
    ``uda_cli.methods.lsd``'s constants, the code's), and ``aux``, the ACGAN-style per-pixel
    classifier of the ``num_classes`` classes (K, no extra "fake" class, as the code). Convs ~
    N(0, 0.02), biases 0 (the code's init).
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 128, blocks: int = 3,
                 dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 2), nn.InstanceNorm2d(width),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for g in range(3):
            if g:
                layers.append(nn.MaxPool2d(2, 2))
            layers += [LSDResBlock(width, leaky=True, bias=True, dropout=dropout) for _ in range(blocks)]
        self.features = nn.Sequential(*layers)
        self.domain = nn.Conv2d(width, 4, 3, padding=1)
        self.aux = nn.Conv2d(width, num_classes, 3, padding=1)
        init_normal(self)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.domain(h), self.aux(h)
