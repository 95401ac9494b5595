"""Convert the Caffe-converted DeepLab-v2 ResNet-101 checkpoints the papers start from
(pickled ``.pth``) into safetensors files that ``--set pretrained=FILE`` loads.

Known files:

- ``DeepLab_resnet_pretrained_imagenet.pth``: ADVENT's init (Vu et al., CVPR 2019), ImageNet
  ResNet-101 converted from Caffe, keys prefixed ``Scale.``, no classifier. No checksum is
  published for it.
- ``DeepLab_resnet_pretrained_init-f81d91e8.pth``: AdaptSegNet's init (Tsai et al., CVPR
  2018), ImageNet + COCO, with a ``layer5`` classifier for COCO's classes. By torch hub's
  convention the name carries the first 8 hex digits of its sha256, checked here.

This module is the only place in uda that unpickles anything, and it does so with
``torch.load(..., weights_only=True)`` (torch's restricted unpickler: tensors and plain
containers only). The output holds our ``deeplabv2_r101`` names (``backbone.conv1.weight``,
``backbone.layer1.0.conv1.weight``, ...) and metadata saying the stride is in the first 1x1
conv and the input is Caffe BGR, so ``build_model("deeplabv2_r101", pretrained=FILE)`` sets
``stride_in_1x1`` and ``input_norm="caffe_bgr"`` by itself.

The Caffe classifier (``layer5``; ``layer6`` in ADVENT's two-level nets, where ``layer5`` is
the 1024-channel aux head) is dropped unless ``keep_classifier=True``, and then only kept when
it is a four-branch ASPP of consistent shape; a classifier for other classes than the run's
would not load (its shape differs), which is why dropping is the default.

    python -m uda_cli.models.convert DeepLab_resnet_pretrained_imagenet.pth deeplab_imagenet.safetensors
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from uda_cli.errors import CheckpointError, ConfigError, UDAError

ARCHS = ("deeplabv2_r101",)
_BACKBONE_ROOTS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
_HEAD_ROOTS = ("layer5", "layer6")


@dataclass(frozen=True)
class KnownFile:
    what: str
    where: str
    sha256_prefix: str | None  # None: nothing published to check against


KNOWN_FILES = {
    "DeepLab_resnet_pretrained_imagenet.pth": KnownFile(
        "ADVENT's ImageNet ResNet-101 (Caffe-converted)", "linked from valeoai/ADVENT's README", None),
    "DeepLab_resnet_pretrained_init-f81d91e8.pth": KnownFile(
        "AdaptSegNet's ImageNet+COCO DeepLab-v2 init",
        "http://vllab.ucmerced.edu/ytsai/CVPR18/DeepLab_resnet_pretrained_init-f81d91e8.pth", "f81d91e8"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _expected_prefix(path: Path) -> str | None:
    known = KNOWN_FILES.get(path.name)
    if known is not None:
        return known.sha256_prefix
    m = re.search(r"-([a-f0-9]{8,})\.", path.name)  # torch hub's <name>-<sha256 prefix>.pth
    return m.group(1) if m else None


def _strip_prefix(key: str) -> str:
    """``Scale.layer1.0.conv1.weight`` / ``module.conv1.weight`` -> the Caffe DeepLab name."""
    parts = key.split(".")
    while len(parts) > 1 and parts[0] not in _BACKBONE_ROOTS + _HEAD_ROOTS:
        parts = parts[1:]
    return ".".join(parts)


def _unwrap(obj) -> dict[str, torch.Tensor]:
    for k in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError("the file holds no state dict of tensors; pass a DeepLab-v2 .pth state dict")
    return obj


def _aspp(state: dict[str, torch.Tensor], root: str) -> tuple[dict[str, torch.Tensor], str]:
    """The branches of Caffe head ``root`` as ASPPHead keys, or ({}, why it cannot be)."""
    keys = {k: v for k, v in state.items() if k.startswith(root + ".")}
    branches = {}
    for k, v in keys.items():
        m = re.fullmatch(rf"{root}\.conv2d_list\.(\d+)\.(weight|bias)", k)
        if not m:
            return {}, f"{k} is not an ASPP branch"
        branches[f"branches.{m.group(1)}.{m.group(2)}"] = v
    weights = [branches.get(f"branches.{i}.weight") for i in range(4)]
    biases = [branches.get(f"branches.{i}.bias") for i in range(4)]
    if len(branches) != 8 or any(w is None for w in weights) or any(b is None for b in biases):
        return {}, f"{root} is not four branches with weight and bias"
    k, c = weights[0].shape[:2]
    if any(tuple(w.shape) != (k, c, 3, 3) for w in weights) or any(tuple(b.shape) != (k,) for b in biases):
        return {}, f"{root}'s branches differ in shape"
    return branches, ""


def convert_pth(src: Path, dst: Path, arch: str = "deeplabv2_r101", keep_classifier: bool = False) -> dict:
    """Convert ``src`` (a pickled Caffe DeepLab-v2 state dict) to safetensors at ``dst``.

    Returns a summary: ``arch``, ``sha256`` of src, ``known`` (its description or None),
    ``tensors`` written, ``classifier`` (kept head names), ``num_classes`` (of a kept head or
    None), ``dropped`` (source keys left out) and ``metadata``.
    """
    from safetensors.torch import save_file

    from uda_cli.models.segmentation import MODEL_FILE_FORMAT, DeepLabV2ResNet

    src, dst = Path(src), Path(dst)
    if arch not in ARCHS:
        raise ConfigError(f"cannot convert to {arch!r}; known: {', '.join(ARCHS)}")
    if not src.is_file():
        raise ConfigError(f"{src} not found; pass the .pth file to convert")
    if dst.suffix != ".safetensors":
        raise ConfigError(f"{dst} must end in .safetensors")
    digest = _sha256(src)
    prefix = _expected_prefix(src)
    if prefix is not None and not digest.startswith(prefix):
        raise CheckpointError(f"{src} is damaged or another file (its sha256 does not start with {prefix}); download it again")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation, a non-tensor object refused by weights_only
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise CheckpointError(f"could not read {src} as a weights-only torch file ({why}); pass a DeepLab-v2 .pth state dict") from None
    state = {_strip_prefix(k): v for k, v in _unwrap(obj).items()}

    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in state.items():
        if k.split(".", 1)[0] in _BACKBONE_ROOTS:
            out[f"backbone.{k}"] = v
        elif k.split(".", 1)[0] not in _HEAD_ROOTS:
            dropped.append(k)

    kept, num_classes = [], None
    for root in _HEAD_ROOTS:
        if not any(k.startswith(root + ".") for k in state):
            continue
        branches, why = _aspp(state, root)
        in_channels = branches["branches.0.weight"].shape[1] if branches else None
        name = {2048: "classifier", 1024: "aux_classifier"}.get(in_channels)
        k = branches["branches.0.weight"].shape[0] if branches else None
        if keep_classifier and name and name not in kept and num_classes in (None, k):
            out.update({f"{name}.{b}": v for b, v in branches.items()})
            kept.append(name)
            num_classes = k
        else:
            dropped.extend(sorted(x for x in state if x.startswith(root + ".")))

    # Check names and shapes against the network itself, built on the meta device (no memory).
    with torch.device("meta"):
        model = DeepLabV2ResNet(num_classes or 19, multi_level="aux_classifier" in kept, stride_in_1x1=True,
                                input_norm="caffe_bgr")
    own = model.state_dict()
    expected = [k for k in own if k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    missing = [k for k in expected if k not in out]
    unexpected = [k for k in out if k not in own]
    shapes = [k for k in out if k in own and out[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        first = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                 else f"shape of {shapes[0]} {list(out[shapes[0]].shape)}, expected {list(own[shapes[0]].shape)}")
        raise CheckpointError(f"{src} is not a Caffe DeepLab-v2 ResNet-101 state dict ({first}); pass "
                              "DeepLab_resnet_pretrained_imagenet.pth or DeepLab_resnet_pretrained_init-f81d91e8.pth")

    known = KNOWN_FILES.get(src.name)
    meta = {
        "format": MODEL_FILE_FORMAT, "arch": arch, "stride_in_1x1": "true", "input_norm": "caffe_bgr",
        "source": src.name, "source_sha256": digest, "converted_by": "uda_cli.models.convert",
    }
    if num_classes is not None:
        meta["num_classes"] = str(num_classes)
        meta["multi_level"] = str("aux_classifier" in kept).lower()
    tensors = {k: v.detach().float().contiguous().clone() for k, v in out.items()}
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        tmp.replace(dst)
    except OSError as e:
        raise UDAError(f"could not write {dst}: {e.strerror or e}; pass a writable path") from None
    return {"arch": arch, "sha256": digest, "known": known.what if known else None, "tensors": len(tensors),
            "classifier": kept, "num_classes": num_classes, "dropped": dropped, "metadata": meta}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m uda_cli.models.convert", description=__doc__.split("\n\n", 1)[0])
    p.add_argument("src", type=Path, help="the pickled .pth file")
    p.add_argument("dst", type=Path, help="the .safetensors file to write")
    p.add_argument("--arch", default="deeplabv2_r101", choices=ARCHS)
    p.add_argument("--keep-classifier", action="store_true", help="keep the Caffe ASPP head (layer5/layer6)")
    args = p.parse_args(argv)
    try:
        info = convert_pth(args.src, args.dst, args.arch, keep_classifier=args.keep_classifier)
    except UDAError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    what = f" ({info['known']})" if info["known"] else ""
    head = f", classifier kept: {', '.join(info['classifier'])} ({info['num_classes']} classes)" if info["classifier"] else ""
    print(f"wrote {args.dst}: {info['tensors']} tensors from {args.src.name}{what}, sha256 {info['sha256'][:16]}..."
          f"{head}; dropped {len(info['dropped'])} keys. Use --set pretrained={args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
