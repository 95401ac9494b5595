"""Segmentation networks, all with one interface.

- ``forward(x)``: images in [-1, 1] (``uda_cli.data.transforms.normalize``), ``[B, C, H, W]``
  -> logits ``[B, K, h, w]`` at the network's ``output_stride`` (h = H / output_stride up to
  rounding). Not upsampled: callers upsample to the label size, as the papers do.
- ``forward_multi(x)``: ``{"main": logits}``, plus ``"aux"`` where the network has a second
  head (``multi_level``); methods that use two levels (ADVENT) ask for this.
- ``features(x)``: the feature map the main classifier reads.
- ``param_groups(lr)``: optimizer groups, backbone at ``lr`` and classifier heads at 10x
  (DeepLab's recipe), each with ``name`` and ``lr_mult`` for schedules; frozen batch-norm
  parameters are in no group.
- ``train(mode)`` keeps batch norm in eval mode where the recipe freezes it (``freeze_bn``).

Each network maps [-1, 1] to what its weights expect inside ``forward`` (ImageNet mean/std RGB
for torchvision weights, the Caffe BGR mean for Caffe-converted ones), so callers never care.

Initialisation (``pretrained``): ``"imagenet"`` (torchvision's weight API; the file must be in
torchvision's cache, as for ``uda_cli.models.classifiers.ResNet50Encoder``: we never download
it), ``"none"``, or a ``.safetensors`` file holding the backbone (torchvision names) or the
whole model (our names, e.g. from :func:`save_model` or ``python -m uda_cli.models.convert``).
Pickled files are never loaded here; the converter is the one place that reads them.

Networks (``build_model`` names):

- ``deeplabv2_r101``: DeepLab-v2 (Chen et al., TPAMI 2017) as ADVENT (Vu et al., CVPR 2019),
  CBST/CRST (Zou et al., ECCV 2018 / ICCV 2019) and TPLD use it.
- ``fcn8s_vgg16``: FCN-8s (Long et al., CVPR 2015), LSD-seg's base network.
- ``deeplabv2_small``: a DeepLab-shaped network of ~0.33 M parameters for 64x64 digit scenes.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.models.classifiers import ImageNetInput
from uda_cli.models.registry import register_model

# The mean the Caffe ImageNet models subtract, BGR on 0-255 (ADVENT's IMG_MEAN).
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
INPUT_NORMS = ("imagenet", "caffe_bgr", "none")
MODEL_FILE_FORMAT = "uda-model/1"


class CaffeBGRInput(nn.Module):
    """[-1, 1] RGB -> what Caffe-converted weights expect: 0-255 BGR minus the BGR mean, no scaling."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x + 1).mul(127.5).flip(1) - self.mean


def input_module(norm: str) -> nn.Module:
    if norm == "imagenet":
        return ImageNetInput()
    if norm == "caffe_bgr":
        return CaffeBGRInput()
    if norm == "none":
        return nn.Identity()
    raise ConfigError(f"input_norm must be one of {', '.join(INPUT_NORMS)}, not {norm!r}")


class ASPPHead(nn.Module):
    """DeepLab-v2's classifier: parallel 3x3 convs ``in_channels -> num_classes`` with
    dilation = padding = each of ``dilations``, SUMMED (not concatenated as in DeepLab-v3).
    Weights ~ N(0, 0.01), biases on (zero), as in ADVENT's and CRST's code. All four branches
    are used (AdaptSegNet's head returns after the second: DAFormer's "dlv2red")."""

    def __init__(self, in_channels: int, num_classes: int, dilations=(6, 12, 18, 24), std: float = 0.01):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, 0.0, std)
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        out = self.branches[0](x)
        for conv in self.branches[1:]:
            out = out + conv(x)
        return out


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


class SegmentationNet(nn.Module):
    """What every segmentation network here shares: the frozen-BN switch, the head/backbone
    split of ``param_groups``, ``forward_multi`` and loading a state from a file."""

    task = "segmentation"
    arch = ""
    output_stride = 1
    multi_level = False
    input_norm = "none"

    def __init__(self, freeze_bn: bool = False):
        super().__init__()
        self.freeze_bn = bool(freeze_bn)

    # ---- what a network implements ------------------------------------------------------
    def head_modules(self) -> list[nn.Module]:
        """The classifier heads (10x lr)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_multi(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"main": self(x)}

    # ---- the F / C split (LSD-seg: F embeds, C classifies, G decodes F's maps) -----------
    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """F: the feature maps the classifier reads, coarsest first, as ``embed_layout`` names
        them; ``classify(embed(x), x.shape[-2:])`` is ``forward(x)``."""
        return {"features": self.features(x)}

    def classify(self, maps: dict[str, torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """C: logits from ``embed``'s maps (``size``: the input's [H, W], for networks whose
        output is at the input size). The main head alone."""
        return self.classifier(maps["features"])

    def embed_layout(self) -> list[tuple[str, int, int]]:
        """``(name, channels, stride)`` of each map ``embed`` returns, coarsest first."""
        raise NotImplementedError

    def from_backbone_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A backbone state under torchvision's names -> this model's names."""
        return state

    # ---- shared -------------------------------------------------------------------------
    def _freeze_bn_params(self) -> None:
        if self.freeze_bn:
            for m in self.modules():
                if _is_bn(m):
                    for p in m.parameters(recurse=False):
                        p.requires_grad_(False)

    def train(self, mode: bool = True):
        """Train mode, except that frozen batch norm stays in eval mode (running statistics
        used and never updated): CRST's ``model.eval()`` recipe."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if _is_bn(m):
                    m.eval()
        return self

    def param_groups(self, lr: float, head_mult: float = 10.0) -> list[dict[str, Any]]:
        """``[backbone at lr, heads at head_mult * lr]`` for ``torch.optim``; frozen batch-norm
        parameters (and any with requires_grad off) are left out."""
        frozen = set()
        if self.freeze_bn:
            frozen = {id(p) for m in self.modules() if _is_bn(m) for p in m.parameters(recurse=False)}
        head = [p for h in self.head_modules() for p in h.parameters() if p.requires_grad]
        in_head = {id(p) for p in head}
        backbone = [p for p in self.parameters()
                    if p.requires_grad and id(p) not in in_head and id(p) not in frozen]
        return [
            {"params": backbone, "lr": lr, "lr_mult": 1.0, "name": "backbone"},
            {"params": head, "lr": lr * head_mult, "lr_mult": float(head_mult), "name": "head"},
        ]

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a whole-model or backbone state; anything that does not fit is one
        CheckpointError line naming the first missing, unexpected or misshapen keys.
        A head absent from the file keeps its fresh initialisation (a backbone init)."""
        state = _pick_model_keys(self, state)
        own = self.state_dict()
        heads = [n for n, m in self.named_children() if any(m is h for h in self.head_modules())]
        absent_heads = [h for h in heads if not any(k.startswith(h + ".") for k in state)]
        expected = [k for k in own if not k.endswith("num_batches_tracked")
                    and not any(k.startswith(h + ".") for h in absent_heads)]
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in own]
        shapes = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} here"
                  for k in state if k in own and state[k].shape != own[k].shape]
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3})" if len(missing) > 3 else ""))
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:3])}"
                             + (f" (+{len(unexpected) - 3})" if len(unexpected) > 3 else ""))
            if shapes:
                parts.append(f"shape {shapes[0]}" + (f" (+{len(shapes) - 1})" if len(shapes) > 1 else ""))
            raise CheckpointError(f"{source} does not fit {self.arch or type(self).__name__}: {'; '.join(parts)}; "
                                  "pass weights written for this model (convert .pth files with python -m uda_cli.models.convert)")
        self.load_state_dict(state, strict=False)

    def file_metadata(self) -> dict[str, str]:
        """String metadata :func:`save_model` writes, enough to rebuild the same layout."""
        return {"format": MODEL_FILE_FORMAT, "arch": self.arch, "input_norm": self.input_norm}


def _pick_model_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own keys: as they are (whole model), the single network of a uda run
    checkpoint whose keys fit (``"<group>.<key>"``), or a backbone under torchvision's names."""
    children = {n for n, _ in model.named_children()}
    if state and {k.split(".", 1)[0] for k in state} <= children:
        return state
    fits = []
    for group in sorted({k.split(".", 1)[0] for k in state if "." in k}):
        sub = {k[len(group) + 1:]: v for k, v in state.items() if k.startswith(group + ".")}
        if {k.split(".", 1)[0] for k in sub} <= children and "backbone" in {k.split(".", 1)[0] for k in sub}:
            fits.append(sub)
    if len(fits) == 1:
        return fits[0]
    return model.from_backbone_state(state)


# ---- initialisation -----------------------------------------------------------------------


def resolve_pretrained(pretrained: Any, arch: str, imagenet: bool) -> str | Path:
    """``"imagenet"``, ``"none"`` or the Path of a ``.safetensors`` file that exists."""
    if pretrained is None or pretrained is False:
        return "none"
    if pretrained is True:
        pretrained = "imagenet"
    if isinstance(pretrained, str) and pretrained.lower() in ("none", "imagenet"):
        value = pretrained.lower()
        if value == "imagenet" and not imagenet:
            raise ConfigError(f"{arch} has no ImageNet weights; use --set pretrained=none or a .safetensors file")
        return value
    if not isinstance(pretrained, (str, Path)):
        raise ConfigError(f"pretrained must be imagenet, none or a .safetensors file, not {pretrained!r}")
    path = Path(pretrained).expanduser()
    if path.suffix in (".pth", ".pt", ".pkl", ".tar", ".bin"):
        raise ConfigError(f"{path} is a pickled file, which uda never loads; convert it with "
                          f"`python -m uda_cli.models.convert {path} OUT.safetensors` and pass OUT.safetensors")
    if path.suffix != ".safetensors":
        raise ConfigError(f"pretrained must be imagenet, none or a .safetensors file, not {str(pretrained)!r}")
    if not path.is_file():
        raise ConfigError(f"pretrained file {path} not found; pass an existing .safetensors file or --set pretrained=none")
    return path


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file; a bad file is one CheckpointError line."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({why}); pass another file") from None


def read_model_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        why = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({why}); pass another file") from None


def save_model(model: SegmentationNet, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s whole state as safetensors, with the metadata that rebuilds its layout
    (``arch``, ``input_norm``, ``stride_in_1x1``); ``pretrained=path`` loads it back."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {**model.file_metadata(), **(metadata or {})}
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def _sha256_prefix_ok(path: Path) -> tuple[bool, str]:
    m = re.search(r"-([a-f0-9]{8,})\.", path.name)
    if not m:
        return True, ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest().startswith(m.group(1)), m.group(1)


def imagenet_state(weights, arch: str) -> dict[str, torch.Tensor]:
    """The ImageNet state of torchvision ``weights`` from torchvision's cache
    (``$TORCH_HOME/hub/checkpoints/<file>``), loaded with ``weights_only=True``."""
    name = os.path.basename(weights.url)
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not path.is_file():
        raise ConfigError(
            f"{arch}: ImageNet weights not found; download {weights.url} to $TORCH_HOME/hub/checkpoints/{name} "
            f"(here: {path}), or train from scratch with --set pretrained=none"
        )
    ok, prefix = _sha256_prefix_ok(path)
    if not ok:
        raise ConfigError(f"{path} is damaged (its sha256 does not start with {prefix}); delete it and download "
                          f"{weights.url} again, or use --set pretrained=none")
    try:
        return weights.get_state_dict(progress=False, check_hash=True, weights_only=True, map_location="cpu")
    except Exception as e:  # an unreadable file: say so in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError(f"could not load {path} ({first}); delete it and download {weights.url} again") from None


def _check_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, not {num_classes!r}")
    return num_classes


def _flag(meta: dict[str, str], key: str) -> bool | None:
    v = meta.get(key)
    return None if v is None else v.lower() == "true"


# ---- DeepLab-v2 on ResNet -----------------------------------------------------------------


class DeepLabV2ResNet(SegmentationNet):
    """DeepLab-v2 (Chen et al., TPAMI 2017) on a dilated ResNet, as ADVENT/CRST/TPLD use it.

    Built on torchvision's ``ResNet(Bottleneck, blocks, replace_stride_with_dilation=[False,
    True, True])`` (``resnet101`` for blocks (3, 4, 23, 3)): layer3/layer4 dilated 2/4, output
    stride 8. Head: :class:`ASPPHead` on layer4 (2048 channels), dilations 6/12/18/24 summed.
    ``multi_level``: ADVENT's second ASPP head on layer3 (1024 channels), ``forward_multi``'s
    ``"aux"``. Batch norm frozen by default (running statistics and affine), as CRST runs it.

    Departures, each on purpose:
    - Every block of layer3/layer4 is dilated 2/4 as in DeepLab-v2 (ADVENT's ``_make_layer``);
      torchvision dilates the first block of each by the previous rate (1, 2). Same weights.
    - ``stride_in_1x1=False`` (default) keeps torchvision's "v1.5" layout: the stride is on
      the 3x3 conv, max-pool floors. ``True`` gives the Caffe DeepLab layout the converted
      checkpoints were trained in: stride on the first 1x1 conv, ``ceil_mode`` max-pool (so an
      input of 64 gives 9 rows, not 8). Building from a converted file turns it on by itself.
      CRST loads torchvision weights into the Caffe layout; ``stride_in_1x1=True`` with
      ``pretrained="imagenet"`` reproduces that.
    - ADVENT trains with ``model.train()``, so its BN (affine frozen) still updates running
      statistics from batches of one; we freeze them as CRST does (``freeze_bn=False`` makes
      BN fully trainable instead).
    - From scratch (``pretrained="none"``) the backbone has torchvision's initialisation.
    """

    output_stride = 8

    def __init__(self, num_classes: int = 19, blocks=(3, 4, 23, 3), multi_level: bool = False,
                 stride_in_1x1: bool = False, input_norm: str = "imagenet", freeze_bn: bool = True):
        super().__init__(freeze_bn=freeze_bn)
        from torchvision.models.resnet import Bottleneck, ResNet

        self.arch = "deeplabv2_r101" if tuple(blocks) == (3, 4, 23, 3) else f"deeplabv2_resnet{'-'.join(map(str, blocks))}"
        self.num_classes = num_classes
        self.multi_level = bool(multi_level)
        self.stride_in_1x1 = bool(stride_in_1x1)
        self.input_norm = input_norm
        self.input = input_module(input_norm)
        net = ResNet(Bottleneck, list(blocks), replace_stride_with_dilation=[False, True, True])
        del net.avgpool, net.fc  # the ImageNet head; the ASPP heads replace it
        for layer, d in ((net.layer3, 2), (net.layer4, 4)):
            layer[0].conv2.dilation, layer[0].conv2.padding = (d, d), (d, d)
        if self.stride_in_1x1:
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                block = layer[0]
                if block.conv2.stride != (1, 1):
                    block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
            net.maxpool.ceil_mode = True
        self.backbone = net
        self.classifier = ASPPHead(2048, num_classes)
        if self.multi_level:
            self.aux_classifier = ASPPHead(1024, num_classes)
        self._freeze_bn_params()

    def head_modules(self):
        return [self.classifier] + ([self.aux_classifier] if self.multi_level else [])

    def _trunk(self, x):
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(self.input(x)))))
        c3 = b.layer3(b.layer2(b.layer1(x)))
        return c3, b.layer4(c3)

    def features(self, x):
        return self._trunk(x)[1]

    def forward(self, x):
        return self.classifier(self.features(x))

    def embed_layout(self):
        return [("features", 2048, self.output_stride)]

    def forward_multi(self, x):
        c3, c4 = self._trunk(x)
        out = {"main": self.classifier(c4)}
        if self.multi_level:
            out["aux"] = self.aux_classifier(c3)
        return out

    def from_backbone_state(self, state):
        # torchvision's resnet names (conv1, bn1, layer1..4, fc): the fc layer is ImageNet's head
        return {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")}

    def file_metadata(self):
        return {**super().file_metadata(), "stride_in_1x1": str(self.stride_in_1x1).lower(),
                "multi_level": str(self.multi_level).lower(), "num_classes": str(self.num_classes)}


@register_model("deeplabv2_r101", task="segmentation")
def deeplabv2_r101(num_classes: int = 19, pretrained: Any = "imagenet", multi_level: bool = False,
                   stride_in_1x1: bool | None = None, input_norm: str | None = None,
                   freeze_bn: bool = True) -> DeepLabV2ResNet:
    """DeepLab-v2 ResNet-101, output stride 8, ASPP 6/12/18/24 summed, frozen BN (ADVENT, CRST).

    ``stride_in_1x1`` and ``input_norm`` default to what a ``pretrained`` file's metadata says
    (a converted Caffe checkpoint: True, caffe_bgr), else False and imagenet.
    """
    return _build_deeplab((3, 4, 23, 3), num_classes, pretrained, multi_level, stride_in_1x1, input_norm, freeze_bn)


def _build_deeplab(blocks, num_classes, pretrained, multi_level, stride_in_1x1, input_norm, freeze_bn):
    arch = "deeplabv2_r101" if tuple(blocks) == (3, 4, 23, 3) else "deeplabv2"
    _check_classes(num_classes)
    init = resolve_pretrained(pretrained, arch, imagenet=True)
    meta = read_model_metadata(init) if isinstance(init, Path) else {}
    if meta.get("arch") and meta["arch"] != arch:
        raise CheckpointError(f"{init} holds a {meta['arch']}, not a {arch}; pass --set model={meta['arch']} or another file")
    if stride_in_1x1 is None:
        stride_in_1x1 = bool(_flag(meta, "stride_in_1x1"))
    if input_norm is None:
        input_norm = meta.get("input_norm", "imagenet")
    state = None
    if init == "imagenet":  # the file first: a missing one is said before any work is done
        from torchvision.models import ResNet101_Weights

        state = imagenet_state(ResNet101_Weights.IMAGENET1K_V1, arch)
    model = DeepLabV2ResNet(num_classes, blocks, multi_level, stride_in_1x1, input_norm, freeze_bn)
    if state is not None:
        model.load_state(state, "torchvision's ImageNet ResNet-101")
    elif isinstance(init, Path):
        model.load_state(read_model_file(init)[0], str(init))
    return model


# ---- FCN-8s on VGG-16 ---------------------------------------------------------------------


class FCN8sVGG16(SegmentationNet):
    """FCN-8s (Long, Shelhamer & Darrell, CVPR 2015) on torchvision's VGG-16, LSD-seg's F.

    fc6/fc7 become convs (7x7 4096, 1x1 4096, ReLU, dropout 0.5; ImageNet's fc weights
    reshaped), 1x1 score layers on fc7, pool4 and pool3 (zero-initialised, as in FCN), and
    the skips: score_fr x2 + score_pool4, x2 + score_pool3, x8 to the input size.
    ``feature_maps(x)`` gives LSD-seg's generator inputs (pool3, pool4, fc7).

    Departures, each on purpose:
    - No pad-100 trick and no crops: torchvision's VGG pads every conv by 1 and fc6 is padded
      by 3, so pool3/pool4/fc7 are at 1/8, 1/16, 1/32 of the input and the skips line up; each
      upsampling is bilinear (``F.interpolate``, not learned) to the skip's exact size, so any
      input size works.
    - The output is at the input resolution (``output_stride = 1``), as FCN-8s defines it.
    - torchvision's ImageNet VGG-16 (RGB, mean/std) instead of LSD-seg's Caffe VGG-16 (BGR).
    - ``param_groups`` gives the score layers 10x lr (DeepLab's convention, for one interface);
      LSD-seg uses one lr with 2x on biases.
    """

    output_stride = 1
    input_norm = "imagenet"
    _POOL3, _POOL4 = 16, 23  # indices of the 3rd and 4th max-pool in torchvision's vgg16().features

    def __init__(self, num_classes: int = 19):
        super().__init__(freeze_bn=False)
        from torchvision.models import vgg16

        self.arch = "fcn8s_vgg16"
        self.num_classes = num_classes
        self.input = ImageNetInput()
        self.backbone = vgg16(weights=None).features
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop = nn.Dropout2d(0.5)
        self.score_fr = nn.Conv2d(4096, num_classes, 1)
        self.score_pool4 = nn.Conv2d(512, num_classes, 1)
        self.score_pool3 = nn.Conv2d(256, num_classes, 1)
        for conv in (self.score_fr, self.score_pool4, self.score_pool3):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def head_modules(self):
        return [self.score_fr, self.score_pool4, self.score_pool3]

    def feature_maps(self, x) -> dict[str, torch.Tensor]:
        """``{"pool3": [B,256,H/8,W/8], "pool4": [B,512,H/16,W/16], "fc7": [B,4096,H/32,W/32]}``."""
        x = self.input(x)
        out = {}
        for i, layer in enumerate(self.backbone):
            x = layer(x)
            if i == self._POOL3:
                out["pool3"] = x
            elif i == self._POOL4:
                out["pool4"] = x
        h = self.drop(F.relu(self.fc6(x), inplace=True))
        out["fc7"] = self.drop(F.relu(self.fc7(h), inplace=True))
        return out

    def features(self, x):
        return self.feature_maps(x)["fc7"]

    def embed(self, x):
        maps = self.feature_maps(x)
        return {k: maps[k] for k in ("fc7", "pool4", "pool3")}

    def embed_layout(self):
        return [("fc7", 4096, 32), ("pool4", 512, 16), ("pool3", 256, 8)]

    def classify(self, maps, size):
        s = self.score_fr(maps["fc7"])
        s = _up(s, maps["pool4"]) + self.score_pool4(maps["pool4"])
        s = _up(s, maps["pool3"]) + self.score_pool3(maps["pool3"])
        return F.interpolate(s, size=tuple(size), mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.classify(self.feature_maps(x), x.shape[-2:])

    def from_backbone_state(self, state):
        # torchvision's vgg16 names: features.N -> backbone.N; classifier.0/3 (fc6/fc7 as
        # linear layers) reshaped to convs; classifier.6 is ImageNet's 1000-way head
        out = {}
        for k, v in state.items():
            if k.startswith("features."):
                out["backbone." + k[len("features."):]] = v
            elif k.startswith("classifier.0."):
                out["fc6." + k.rsplit(".", 1)[1]] = v.reshape(4096, 512, 7, 7) if v.dim() == 2 else v
            elif k.startswith("classifier.3."):
                out["fc7." + k.rsplit(".", 1)[1]] = v.reshape(4096, 4096, 1, 1) if v.dim() == 2 else v
            elif not k.startswith("classifier.6."):
                out[k] = v  # reported as unexpected
        return out


def _up(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(s, size=like.shape[-2:], mode="bilinear", align_corners=False)


@register_model("fcn8s_vgg16", task="segmentation")
def fcn8s_vgg16(num_classes: int = 19, pretrained: Any = "imagenet") -> FCN8sVGG16:
    """FCN-8s on VGG-16 (Long et al. 2015; LSD-seg's base net), logits at the input size."""
    _check_classes(num_classes)
    init = resolve_pretrained(pretrained, "fcn8s_vgg16", imagenet=True)
    meta = read_model_metadata(init) if isinstance(init, Path) else {}
    if meta.get("arch") and meta["arch"] != "fcn8s_vgg16":
        raise CheckpointError(f"{init} holds a {meta['arch']}, not a fcn8s_vgg16; pass --set model={meta['arch']} or another file")
    state = None
    if init == "imagenet":
        from torchvision.models import VGG16_Weights

        state = imagenet_state(VGG16_Weights.IMAGENET1K_V1, "fcn8s_vgg16")
    model = FCN8sVGG16(num_classes)
    if state is not None:
        model.load_state(state, "torchvision's ImageNet VGG-16")
    elif isinstance(init, Path):
        model.load_state(read_model_file(init)[0], str(init))
    return model


# ---- a small DeepLab for digit scenes -----------------------------------------------------


def _cbr(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class DeepLabV2Small(SegmentationNet):
    """A DeepLab-v2-shaped network for 64x64 digit scenes and CPU tests (ours, not a paper's).

    3x3 conv-BN-ReLU blocks: width w at stride 2, 2w at stride 4, then a dilated stage at
    stride 4 (3w channels, dilations 1, 2, 4), and DeepLab-v2's summed head with dilations
    1/2/3/4 (6/12/18/24 scaled to a 16x16 map). Output stride 4: a 32-pixel digit covers 8x8
    logits. ~0.33 M parameters at w = 32. Batch norm trains (it is not a pretrained backbone)
    and the input is taken as it comes, in [-1, 1].
    """

    output_stride = 4

    def __init__(self, num_classes: int = 11, in_channels: int = 3, width: int = 32):
        super().__init__(freeze_bn=False)
        w = width
        self.arch = "deeplabv2_small"
        self.num_classes = num_classes
        self.input = nn.Identity()
        self.backbone = nn.Sequential(
            _cbr(in_channels, w, stride=2), _cbr(w, w),
            _cbr(w, 2 * w, stride=2), _cbr(2 * w, 2 * w),
            _cbr(2 * w, 3 * w), _cbr(3 * w, 3 * w, dilation=2), _cbr(3 * w, 3 * w, dilation=4),
        )
        self.classifier = ASPPHead(3 * w, num_classes, dilations=(1, 2, 3, 4))

    def head_modules(self):
        return [self.classifier]

    def features(self, x):
        return self.backbone(self.input(x))

    def embed_layout(self):
        return [("features", self.classifier.branches[0].in_channels, self.output_stride)]

    def forward(self, x):
        return self.classifier(self.features(x))

    def file_metadata(self):
        return {**super().file_metadata(), "num_classes": str(self.num_classes)}


@register_model("deeplabv2_small", task="segmentation")
def deeplabv2_small(num_classes: int = 11, pretrained: Any = "none", in_channels: int = 3,
                    width: int = 32) -> DeepLabV2Small:
    """A ~0.33 M-parameter DeepLab-shaped net for 64x64 digit scenes, output stride 4."""
    _check_classes(num_classes)
    if in_channels not in (1, 3):
        raise ConfigError(f"in_channels must be 1 or 3, not {in_channels!r}")
    if isinstance(width, bool) or not isinstance(width, int) or not 4 <= width <= 256:
        raise ConfigError(f"width must be an integer in [4, 256], not {width!r}")
    init = resolve_pretrained(pretrained, "deeplabv2_small", imagenet=False)
    if isinstance(init, Path):
        meta = read_model_metadata(init)
        if meta.get("arch") and meta["arch"] != "deeplabv2_small":
            raise CheckpointError(f"{init} holds a {meta['arch']}, not a deeplabv2_small; "
                                  f"pass --set model={meta['arch']} or another file")
    model = DeepLabV2Small(num_classes, in_channels, width)
    if isinstance(init, Path):
        model.load_state(read_model_file(init)[0], str(init))
    return model
