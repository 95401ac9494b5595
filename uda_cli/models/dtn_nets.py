"""The networks of DTN's digit experiment (Taigman, Polyak & Wolf, ICLR 2017, section 5.1).

- ``DTNEncoder`` (f): "four convolutional layers, each with 64, 128, 256, 128 filters
  respectively, each followed by max pooling and ReLU"; input 32x32, output 128-d. The
  paper gives no kernel sizes: 3x3 convolutions (padding 1) with 2x2 pooling take 32 -> 4,
  and the last pooling is 4x4 so the output is 1x1x128.
- ``DTNDecoder`` (g): "four blocks of deconvolution, batch-normalization, and ReLU, with a
  hyperbolic tangent terminal", 128-d -> 32x32: 4x4 transposed convolutions with 512, 256,
  128 filters, then the image (no batch norm on the output block, as DCGAN).
- ``DTNDiscriminator`` (D): "four batch-normalization, ReLU, convolution blocks, ending with
  3 neurons": 3x3 stride-2 convolutions with 128, 256, 512 filters, then a 4x4 convolution
  to the 3 logits. The first block has no batch norm and ReLU on the raw image (a ReLU there
  would drop the dark half of an image in [-1, 1]).

g and D start from the DCGAN initialisation (N(0, 0.02) weights); the paper is silent.
"""

from __future__ import annotations

from torch import nn


class DTNEncoder(nn.Module):
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


class DTNDecoder(nn.Module):
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


class DTNDiscriminator(nn.Module):
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


def dcgan_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
