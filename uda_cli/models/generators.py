"""Generators and decoders: networks whose output is an image.

- ``PixelDAGenerator``: PixelDA's G(x, z) (Bousmalis et al. CVPR 2017, Figure 2).
- ``DTNDecoder``: DTN's g (Taigman, Polyak & Wolf, ICLR 2017, section 5.1), 128-d -> 32x32.
- ``DecoderTrunk`` + ``DecoderHead``: I2I's decoders (Murez et al. CVPR 2018) for 32x32
  digits, the trunk shared by g_x and g_y.
- ``MapDecoderTrunk`` + ``MapDecoderHead``: I2I's Office-31 decoders, five stride-2
  transposed convolutions from the ResNet-50 feature map (7x7 at 224x224) back to the image.

Also the weight initialisations of the GAN papers (``dcgan_init``, ``init_normal``), which the
discriminators use too. None of these is in the model registry: no method lets a user swap
them with ``--set model=``, and they are not classifiers.

Module attribute names (``net``, ``noise_fc``, ``fc``...) are the keys of saved checkpoints:
renaming one breaks every run saved before.
"""

from __future__ import annotations

import torch
from torch import nn

# ---- initialisation ---------------------------------------------------------------------------


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's initialisation: conv weights ~ N(0, 0.02), batch-norm scales ~ N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """Conv and linear weights ~ N(0, std), biases 0 (PixelDA's authors' code, after DCGAN)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---- PixelDA ----------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with an identity skip (3x3 convs, size kept)."""

    def __init__(self, filters: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(filters, filters, 3, padding=1), nn.BatchNorm2d(filters), nn.ReLU(inplace=True),
            nn.Conv2d(filters, filters, 3, padding=1), nn.BatchNorm2d(filters),
        )

    def forward(self, x):
        return x + self.body(x)


class PixelDAGenerator(nn.Module):
    """PixelDA's G(x, z): the 10-d noise z goes through a fully connected layer (batch norm,
    ReLU) to one image-sized plane that is concatenated with x as an extra input channel; then
    conv n64s1 + ReLU, ``blocks`` residual blocks and a 1x1 conv to the output channels with
    tanh. All convs are 3x3, stride 1, so G keeps the image size.

    Details not drawn in the paper's figure (batch norm on the noise projection, the 1x1 output
    conv, N(0, 0.02) initialisation) follow the authors' released TensorFlow code
    (tensorflow/models, research/domain_adaptation/pixel_domain_adaptation/pixelda_model.py).
    """

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


# ---- DTN --------------------------------------------------------------------------------------


class DTNDecoder(nn.Module):
    """DTN's g: "four blocks of deconvolution, batch-normalization, and ReLU, with a hyperbolic
    tangent terminal", 128-d -> 32x32: 4x4 transposed convolutions with 512, 256, 128 filters,
    then the image (no batch norm on the output block, as DCGAN). DCGAN initialisation (the
    paper is silent)."""

    def __init__(self, out_channels: int = 1, in_features: int = 128):
        super().__init__()

        def block(cin, cout, stride, pad):
            return [nn.ConvTranspose2d(cin, cout, 4, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]

        self.net = nn.Sequential(
            *block(in_features, 512, 1, 0),  # 1 -> 4
            *block(512, 256, 2, 1),  # 8
            *block(256, 128, 2, 1),  # 16
            nn.ConvTranspose2d(128, out_channels, 4, 2, 1), nn.Tanh(),  # 32
        )
        dcgan_init(self)

    def forward(self, z):
        return self.net(z[:, :, None, None])


# ---- I2I --------------------------------------------------------------------------------------
# The paper gives only the layer counts for digits: decoders of 3 transposed convolutions whose
# first layers the two domains share. Widths, kernels, normalisation and activations are ours
# (DCGAN-style). A trunk and a head make one decoder of three transposed convs (1x1 -> 8x8 ->
# 16x16 -> 32x32, the first written as a Linear) and a tanh, so outputs lie in [-1, 1] like the
# images. The trunk is shared by g_x and g_y: the first two layers by default, or the first one
# only (``shared_layers=1``), each domain then having its own last two.


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


# ---- I2I on Office-31 -------------------------------------------------------------------------
# The paper's Office decoders (as examples/i2i/office31.toml records them): 5 stride-2 transposed
# convolutions from the encoder's feature map, 7x7 -> 14 -> 28 -> 56 -> 112 -> 224 for a
# 224x224 ResNet-50 input (x32, its output stride). Kernels (4x4, padding 1), widths
# (2048 -> 256 -> 128 -> 64 -> 32 -> image), batch norm + ReLU between and tanh at the end are
# ours, in the digit decoders' DCGAN style; so is the split: g_x and g_y share the first
# ``shared_layers`` (the digit Config's ``decoder_shared_layers``, 2 by default) and each has
# the rest. The widths keep a decode (~2.9 GFLOPs per 224x224 image) below a ResNet-50 forward.

MAP_DECODER_WIDTHS = (256, 128, 64, 32)


def _up(cin: int, cout: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(cin, cout, 4, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MapDecoderTrunk(nn.Module):
    """The shared first ``shared_layers`` (1 to 4) of the five: [B, in_channels, h, w] ->
    [B, out_channels, h * 2^shared_layers, w * 2^shared_layers]."""

    def __init__(self, in_channels: int = 2048, shared_layers: int = 2, widths=MAP_DECODER_WIDTHS):
        super().__init__()
        if not 1 <= shared_layers <= len(widths):
            raise ValueError(f"shared_layers must be 1 to {len(widths)}, not {shared_layers}")
        layers, cin = [], in_channels
        for cout in widths[:shared_layers]:
            layers += _up(cin, cout)
            cin = cout
        self.out_channels = cin
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class MapDecoderHead(nn.Module):
    """A domain's own layers after a ``shared_layers`` trunk: the rest of the five transposed
    convolutions, the last to the image's channels with tanh ([-1, 1], like the images)."""

    def __init__(self, channels: int, shared_layers: int = 2, widths=MAP_DECODER_WIDTHS):
        super().__init__()
        layers, cin = [], widths[shared_layers - 1]
        for cout in widths[shared_layers:]:
            layers += _up(cin, cout)
            cin = cout
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(cin, channels, 4, 2, 1), nn.Tanh())

    def forward(self, h):
        return self.net(h)


# ---- LSD-seg ----------------------------------------------------------------------------------


class LSDResBlock(nn.Module):
    """LSD-seg's residual block (swamiviv/LSD-seg ``ResnetBlock`` with instance norm):
    ``x + dropout(act(IN(conv3x3(x))))``, ReLU in G, leaky ReLU 0.2 (with conv biases) in D.
    The dropout (0.5) is G's only source of randomness: LSD-seg's G has no noise input."""

    def __init__(self, channels: int, leaky: bool = False, bias: bool = False, dropout: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1, bias=bias)
        self.norm = nn.InstanceNorm2d(channels)
        self.act = nn.LeakyReLU(0.2, inplace=True) if leaky else nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return x + self.drop(self.act(self.norm(self.conv(x))))


def _in_relu(conv: nn.Module, channels: int) -> list[nn.Module]:
    return [conv, nn.InstanceNorm2d(channels), nn.ReLU(inplace=True)]


class LSDGenerator(nn.Module):
    """LSD-seg's G (Sankaranarayanan et al., CVPR 2018; ``_netG`` in swamiviv/LSD-seg), written
    for any segmentation network's F: it decodes F's feature maps (``layout``: ``(name,
    channels, stride)`` coarsest first, e.g. FCN-8s's fc7 /32, pool4 /16, pool3 /8; DeepLab's
    one map /8 or /4) back to an image at the input size.

    A 3x3 stem (width 4 ``width``) with ``blocks`` residual blocks, then one stage per factor
    of 2 down to stride 1: a stride-2 4x4 transposed conv, instance norm, ReLU; where F has a
    map at that stride, it is concatenated (U-Net-like, as LSD-seg joins pool4 and pool3) and a
    3x3 conv fuses it; then ``blocks`` residual blocks with dropout 0.5 (:class:`LSDResBlock`).
    Widths: 4 ``width`` down to the last two stages' 2 ``width`` and ``width``. A 3x3 conv to
    ``out_channels`` and tanh: the loaders' [-1, 1] range. Each stage's output is resized
    (bilinear) to the skip map's size, and the last one to ``size``, so any input size works.

    ``out_channels=None`` leaves the last conv and tanh out: ``forward`` then returns the
    last stage's ``[B, out_width, H, W]`` map, a decoder trunk that domain heads
    (:class:`ImageHead`) finish (I2I's shared first decoder layers).

    Departures from ``_netG``: tanh in [-1, 1] (the code: sigmoid in [0, 1], its unnormalised
    images); 4x4 stride-2 transposed convs everywhere (the code: a 7x7 stride-1 one on fc7, 3x3
    and 5x5 stride-2 ones and a final 8x8 one with padding 100, tuned to its padded FCN-8s);
    a fuse conv after each concatenation; widths 256/256/.../128/64 rather than
    256/512/256/128/64.
    """

    def __init__(self, layout, out_channels: int | None = 3, width: int = 64, blocks: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        layout = [(str(n), int(c), int(s)) for n, c, s in layout]
        strides = [s for _, _, s in layout]
        if not layout or any(s < 1 or s & (s - 1) for s in strides) or strides != sorted(set(strides), reverse=True) \
                or strides[0] < 2:
            raise ValueError(f"layout strides must be distinct powers of 2, coarsest (at least 2) first: {layout}")
        self.names = [n for n, _, _ in layout]
        n_up = strides[0].bit_length() - 1
        stem_w = 4 * width
        self.stem = nn.Sequential(*_in_relu(nn.Conv2d(layout[0][1], stem_w, 3, 1, 1, bias=False), stem_w),
                                  *[LSDResBlock(stem_w, dropout=dropout) for _ in range(blocks)])
        skips = {s: (n, c) for n, c, s in layout[1:]}
        self.skip_at: dict[int, str] = {}
        ups, fuses, stages = [], {}, []
        cin, stride = stem_w, strides[0]
        for i in range(n_up):
            stride //= 2
            cout = width * 2 ** max(0, min(2, n_up - 1 - i))
            ups.append(nn.Sequential(*_in_relu(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), cout)))
            if stride in skips:
                name, ch = skips[stride]
                self.skip_at[i] = name
                fuses[str(i)] = nn.Sequential(*_in_relu(nn.Conv2d(cout + ch, cout, 3, 1, 1, bias=False), cout))
            stages.append(nn.Sequential(*[LSDResBlock(cout, dropout=dropout) for _ in range(blocks)]))
            cin = cout
        self.ups = nn.ModuleList(ups)
        self.fuse = nn.ModuleDict(fuses)
        self.stages = nn.ModuleList(stages)
        self.out_width = cin
        self.out = nn.Identity() if out_channels is None else nn.Sequential(nn.Conv2d(cin, out_channels, 3, 1, 1),
                                                                            nn.Tanh())
        init_normal(self)

    def forward(self, maps: dict[str, torch.Tensor], size) -> torch.Tensor:
        h = self.stem(maps[self.names[0]])
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            h = up(h)
            want = maps[self.skip_at[i]].shape[-2:] if i in self.skip_at else (tuple(size) if i == last else None)
            if want is not None and h.shape[-2:] != want:
                h = nn.functional.interpolate(h, size=want, mode="bilinear", align_corners=False)
            if i in self.skip_at:
                h = self.fuse[str(i)](torch.cat([h, maps[self.skip_at[i]]], 1))
            h = self.stages[i](h)
        return self.out(h)


class ImageHead(nn.Module):
    """A domain's own last decoder layers after a shared :class:`LSDGenerator` trunk (built
    with ``out_channels=None``): ``blocks`` residual blocks at full resolution, a 3x3 conv to
    the image's channels and tanh ([-1, 1], the loaders' range). Ours: I2I's segmentation
    decoders share "their first layers" (the paper's words) and this is where they part."""

    def __init__(self, in_channels: int, out_channels: int = 3, blocks: int = 1, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(*[LSDResBlock(in_channels, dropout=dropout) for _ in range(blocks)],
                                 nn.Conv2d(in_channels, out_channels, 3, 1, 1), nn.Tanh())
        init_normal(self)

    def forward(self, h):
        return self.net(h)
