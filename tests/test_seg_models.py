"""Segmentation networks, the model registry and the Caffe .pth converter (uda_cli/models/).

ResNet-101 is built twice in this file (the shared fixture and the converter round trip),
VGG-16 once; everything else uses small inputs or the small networks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.models import registry
from uda_cli.models.convert import convert_pth, main as convert_main
from uda_cli.models.registry import build_model, list_models, model_entry, register_model
from uda_cli.models.segmentation import (
    CAFFE_BGR_MEAN, ASPPHead, CaffeBGRInput, DeepLabV2ResNet, save_model,
)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def bn_layers(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


# ---- deeplabv2_r101 (one instance, shared) ------------------------------------------------


@pytest.fixture(scope="module")
def r101():
    torch.manual_seed(0)
    model = build_model("deeplabv2_r101", num_classes=5, pretrained="none", multi_level=True)
    before = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    x = torch.rand(2, 3, 64, 96) * 2 - 1
    with torch.no_grad():
        out = model.forward_multi(x)
    return model, out, before


def test_r101_shapes_stride_and_layout(r101):
    model, out, _ = r101
    assert model.output_stride == 8 and model.task == "segmentation"
    assert out["main"].shape == (2, 5, 8, 12) and out["aux"].shape == (2, 5, 8, 12)
    b = model.backbone
    # DeepLab-v2: every block of layer3/layer4 dilated 2/4 (torchvision leaves block 0 at 1/2)
    assert all(blk.conv2.dilation == (2, 2) and blk.conv2.padding == (2, 2) for blk in b.layer3)
    assert all(blk.conv2.dilation == (4, 4) and blk.conv2.padding == (4, 4) for blk in b.layer4)
    assert b.layer2[0].conv2.stride == (2, 2) and b.layer2[0].conv1.stride == (1, 1)  # torchvision v1.5
    assert [len(layer) for layer in (b.layer1, b.layer2, b.layer3, b.layer4)] == [3, 4, 23, 3]
    # ~42.6 M backbone + two ASPP heads
    n_head = sum(p.numel() for p in model.classifier.parameters())
    assert n_head == 4 * (2048 * 5 * 9 + 5)
    assert 42_000_000 < sum(p.numel() for p in model.backbone.parameters()) < 43_000_000


def test_r101_frozen_bn_in_train_mode(r101):
    model, _, before = r101
    assert model.training
    assert all(not m.training for m in bn_layers(model))
    after = {k: v for k, v in model.state_dict().items() if "running_" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad for m in bn_layers(model) for p in m.parameters())


def test_r101_param_groups(r101):
    model, _, _ = r101
    groups = model.param_groups(2.5e-4)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == 2.5e-4 and groups[1]["lr"] == pytest.approx(2.5e-3)
    assert [g["lr_mult"] for g in groups] == [1.0, 10.0]
    head = {id(p) for p in [*model.classifier.parameters(), *model.aux_classifier.parameters()]}
    assert {id(p) for p in groups[1]["params"]} == head
    bn = {id(p) for m in bn_layers(model) for p in m.parameters()}
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and not bn & set(ids)
    convs = [m.weight for m in model.backbone.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in convs}
    torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9)  # torch accepts the groups as they are


def test_stride_in_1x1_is_the_caffe_layout():
    # a one-block-per-stage ResNet shows the layout without building ResNet-101 again
    m = DeepLabV2ResNet(num_classes=3, blocks=(1, 1, 1, 1), stride_in_1x1=True, input_norm="caffe_bgr").eval()
    assert m.backbone.layer2[0].conv1.stride == (2, 2) and m.backbone.layer2[0].conv2.stride == (1, 1)
    assert m.backbone.maxpool.ceil_mode
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 64, 96)).shape == (1, 3, 9, 13)  # ceil-mode pooling: 64 -> 32 -> 17 -> 9
    assert isinstance(m.input, CaffeBGRInput)


def test_caffe_input_is_bgr_minus_mean():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1)  # R = 0, G = 127.5, B = 255
    y = CaffeBGRInput()(x).flatten().tolist()
    assert y == pytest.approx([255 - CAFFE_BGR_MEAN[0], 127.5 - CAFFE_BGR_MEAN[1], 0 - CAFFE_BGR_MEAN[2]])


def test_aspp_sums_four_dilated_branches():
    head = ASPPHead(1, 1)
    x = torch.arange(1.0, 31 * 31 + 1).view(1, 1, 31, 31)
    with torch.no_grad():
        for i, conv in enumerate(head.branches):  # each branch: its top-left tap only, bias i
            conv.weight.zero_()
            conv.weight[0, 0, 0, 0] = 1.0
            conv.bias.fill_(float(i))
        y = head(x)[0, 0]
    for r, c in [(0, 0), (6, 6), (13, 20), (24, 24), (30, 30), (17, 5)]:
        want = 0.0 + 1 + 2 + 3
        for d in (6, 12, 18, 24):  # top-left tap of a dilation-d kernel reads (r - d, c - d)
            if r - d >= 0 and c - d >= 0:
                want += x[0, 0, r - d, c - d].item()
        assert y[r, c].item() == want


# ---- fcn8s_vgg16 --------------------------------------------------------------------------


def test_fcn8s_shapes_groups_and_vgg_names():
    torch.manual_seed(0)
    m = build_model("fcn8s_vgg16", num_classes=4, pretrained="none").eval()
    assert m.output_stride == 1
    x = torch.rand(1, 3, 64, 80) * 2 - 1
    with torch.no_grad():
        maps = m.feature_maps(x)
        assert m(x).shape == (1, 4, 64, 80)
    assert maps["pool3"].shape == (1, 256, 8, 10) and maps["pool4"].shape == (1, 512, 4, 5)
    assert maps["fc7"].shape == (1, 4096, 2, 2)
    groups = m.param_groups(1e-5)
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for s in (m.score_fr, m.score_pool4, m.score_pool3) for p in s.parameters()}
    # torchvision's vgg16 names (fc6/fc7 as linear layers, the 1000-way head) load into it
    sd = m.state_dict()
    tv = {k.replace("backbone.", "features.", 1): v for k, v in sd.items() if k.startswith("backbone.")}
    fc6 = torch.randn(4096, 512 * 7 * 7) * 0.01
    tv.update({"classifier.0.weight": fc6, "classifier.0.bias": sd["fc6.bias"],
               "classifier.3.weight": sd["fc7.weight"].flatten(1), "classifier.3.bias": sd["fc7.bias"],
               "classifier.6.weight": torch.zeros(1000, 4096), "classifier.6.bias": torch.zeros(1000)})
    m.load_state(tv, "test")
    assert torch.equal(m.fc6.weight, fc6.view(4096, 512, 7, 7))


# ---- deeplabv2_small ----------------------------------------------------------------------


def test_small_shapes_size_and_trainable_bn():
    m = build_model("deeplabv2_small")
    assert sum(p.numel() for p in m.parameters()) < 400_000
    assert m.output_stride == 4
    assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 11, 16, 16)
    assert m.features(torch.zeros(2, 3, 64, 64)).shape == (2, 96, 16, 16)
    grey = build_model("deeplabv2_small", num_classes=3, in_channels=1)
    assert grey(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 16, 16)
    m.train()
    assert all(b.training for b in bn_layers(m))
    groups = m.param_groups(1e-3)
    assert groups[1]["lr"] == pytest.approx(1e-2)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())


def test_small_learns_a_toy_scene():
    torch.manual_seed(0)
    m = build_model("deeplabv2_small", num_classes=3, in_channels=1)
    x = torch.full((8, 1, 64, 64), -1.0)
    y = torch.zeros(8, 64, 64, dtype=torch.long)
    for i in range(8):  # a bright square (class 1) or bar (class 2) in a corner
        r, c = 32 * (i % 2), 32 * (i // 2 % 2)
        if i % 3:
            x[i, 0, r + 8:r + 24, c + 8:c + 24] = 1.0
            y[i, r + 8:r + 24, c + 8:c + 24] = 1
        else:
            x[i, 0, r + 4:r + 28, c + 14:c + 18] = 1.0
            y[i, r + 4:r + 28, c + 14:c + 18] = 2
    opt = torch.optim.Adam(m.param_groups(1e-3))
    losses = []
    for _ in range(30):
        logits = F.interpolate(m(x), size=(64, 64), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---- the registry -------------------------------------------------------------------------


def test_registry_lists_tasks_and_builds_digit_nets():
    assert {"deeplabv2_r101", "fcn8s_vgg16", "deeplabv2_small", "lenet", "svhn_dann"} <= set(list_models())
    assert list_models("classification") == ["lenet", "svhn_dann"]
    assert list_models("segmentation") == ["deeplabv2_r101", "deeplabv2_small", "fcn8s_vgg16"]
    assert model_entry("deeplabv2_r101").task == "segmentation"
    assert "pretrained" in model_entry("deeplabv2_r101").options
    lenet = build_model("lenet", num_classes=10).eval()
    assert lenet(torch.zeros(2, 1, 32, 32)).shape == (2, 10) and lenet.features(torch.zeros(2, 1, 32, 32)).shape == (2, 500)
    svhn = build_model("svhn_dann").eval()
    assert svhn(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_registry_twice_typo_and_unknown_option():
    @register_model("_test_net", task="classification")
    def net():
        return nn.Identity()

    try:
        with pytest.raises(ValueError, match="registered twice"):
            register_model("_test_net", task="classification")(net)
    finally:
        registry._MODELS.pop("_test_net")
    with pytest.raises(ConfigError) as e:
        build_model("deeplabv2_r10")
    assert "did you mean 'deeplabv2_r101'" in one_line(e) and "fcn8s_vgg16" in str(e.value)
    with pytest.raises(ConfigError) as e:
        build_model("deeplabv2_small", num_clases=3)
    assert "did you mean 'num_classes'" in one_line(e)
    with pytest.raises(ConfigError):
        list_models("detection")


# ---- initialisation -----------------------------------------------------------------------


def test_imagenet_weights_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name, file in (("deeplabv2_r101", "resnet101-63fe2227.pth"), ("fcn8s_vgg16", "vgg16-397923af.pth")):
        with pytest.raises(ConfigError) as e:
            build_model(name)
        msg = one_line(e)
        assert f"$TORCH_HOME/hub/checkpoints/{file}" in msg and str(tmp_path / "hub" / "checkpoints" / file) in msg
        assert "--set pretrained=none" in msg
    damaged = tmp_path / "hub" / "checkpoints" / "resnet101-63fe2227.pth"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not weights")
    with pytest.raises(ConfigError, match="damaged"):
        build_model("deeplabv2_r101")


def test_pretrained_values_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="python -m uda_cli.models.convert") as e:
        build_model("deeplabv2_r101", pretrained=str(tmp_path / "x.pth"))
    one_line(e)
    with pytest.raises(ConfigError, match="not found"):
        build_model("deeplabv2_small", pretrained=str(tmp_path / "x.safetensors"))
    with pytest.raises(ConfigError, match="no ImageNet weights"):
        build_model("deeplabv2_small", pretrained="imagenet")
    with pytest.raises(ConfigError, match="imagenet, none or a .safetensors"):
        build_model("deeplabv2_small", pretrained="coco")
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("deeplabv2_small", num_classes=0)


def test_safetensors_round_trip_and_mismatches(tmp_path):
    torch.manual_seed(0)
    m = build_model("deeplabv2_small", num_classes=5)
    m.train()
    m(torch.randn(4, 3, 64, 64))  # move the BN running statistics off their defaults
    m.eval()
    path = tmp_path / "small.safetensors"
    save_model(m, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["arch"] == "deeplabv2_small"
    m2 = build_model("deeplabv2_small", num_classes=5, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))

    # a uda run checkpoint's "<group>.<key>" names, and a backbone-only file (fresh head)
    sd = m.state_dict()
    save_file({f"F.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "run.safetensors"))
    m3 = build_model("deeplabv2_small", num_classes=5, pretrained=str(tmp_path / "run.safetensors"))
    assert torch.equal(m3.classifier.branches[2].weight, m.classifier.branches[2].weight)
    save_file({k: v for k, v in sd.items() if k.startswith("backbone.")}, str(tmp_path / "bb.safetensors"))
    m4 = build_model("deeplabv2_small", num_classes=7, pretrained=str(tmp_path / "bb.safetensors"))
    assert torch.equal(m4.backbone[0][0].weight, m.backbone[0][0].weight)

    with pytest.raises(CheckpointError) as e:  # 5 classes in the file, 3 asked
        build_model("deeplabv2_small", num_classes=3, pretrained=str(path))
    assert "shape classifier.branches.0.bias [5] in the file, [3] here" in one_line(e)
    partial = {k: v for k, v in sd.items() if k != "backbone.0.0.weight"}
    partial["backbone.9.weight"] = torch.zeros(1)
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError) as e:
        build_model("deeplabv2_small", num_classes=5, pretrained=str(tmp_path / "partial.safetensors"))
    msg = one_line(e)
    assert "missing backbone.0.0.weight" in msg and "unexpected backbone.9.weight" in msg
    with pytest.raises(CheckpointError, match="holds a deeplabv2_small, not a deeplabv2_r101"):
        build_model("deeplabv2_r101", pretrained=str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        build_model("deeplabv2_small", pretrained=str(tmp_path / "junk.safetensors"))


def test_backbone_state_under_torchvision_names():
    m = DeepLabV2ResNet(num_classes=3, blocks=(1, 1, 1, 1), input_norm="imagenet")
    tv = {k[len("backbone."):]: torch.randn_like(v) if v.is_floating_point() else v
          for k, v in m.state_dict().items() if k.startswith("backbone.")}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    head = m.classifier.branches[0].weight.clone()
    m.load_state(tv, "torchvision")
    assert torch.equal(m.backbone.layer4[0].conv3.weight, tv["layer4.0.conv3.weight"])
    assert torch.equal(m.classifier.branches[0].weight, head)


# ---- the converter ------------------------------------------------------------------------


class _NotAWeight:
    pass


def _fake_caffe_pth(path, num_classes=21):
    """A Caffe DeepLab-v2 state dict under ADVENT's names (``Scale.`` prefix, ``layer5`` head):
    the full ResNet-101 key set, every tensor a zero-stride view so the file stays tiny."""
    with torch.device("meta"):
        ref = DeepLabV2ResNet(num_classes=1, stride_in_1x1=True)
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("backbone.") and not k.endswith("num_batches_tracked"):
            state["Scale." + k[len("backbone."):]] = torch.full((1,), 0.5).expand(v.shape)
    torch.manual_seed(0)
    state["Scale.conv1.weight"] = torch.randn(64, 3, 7, 7)
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.full((1,), float(i)).expand(num_classes, 2048, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.full((num_classes,), float(i))
    torch.save(state, path)
    return state


def test_convert_fake_caffe_checkpoint(tmp_path, capsys):
    src = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    state = _fake_caffe_pth(src)
    assert src.stat().st_size < 2_000_000

    dst = tmp_path / "init.safetensors"
    assert convert_main([str(src), str(dst), "--keep-classifier"]) == 0
    assert "wrote" in capsys.readouterr().out
    with safe_open(str(dst), framework="pt") as f:
        meta = f.metadata()
        assert meta["stride_in_1x1"] == "true" and meta["input_norm"] == "caffe_bgr" and meta["num_classes"] == "21"
        assert "backbone.layer3.22.bn3.running_var" in set(f.keys())

    model = build_model("deeplabv2_r101", num_classes=21, pretrained=str(dst))  # ResNet-101, second and last
    assert model.stride_in_1x1 and model.backbone.layer2[0].conv1.stride == (2, 2)
    assert isinstance(model.input, CaffeBGRInput)
    assert torch.equal(model.backbone.conv1.weight, state["Scale.conv1.weight"])
    assert torch.equal(model.classifier.branches[3].bias, torch.full((21,), 3.0))
    assert model.backbone.layer4[2].bn3.running_mean.eq(0.5).all()
    with pytest.raises(CheckpointError, match="shape classifier.branches.0.weight"):
        model.load_state({**model.state_dict(), "classifier.branches.0.weight": torch.zeros(19, 2048, 3, 3)}, "x")


def test_convert_drops_the_head_and_checks_files(tmp_path):
    src = tmp_path / "DeepLab_resnet_pretrained_imagenet.pth"
    _fake_caffe_pth(src)
    info = convert_pth(src, tmp_path / "bb.safetensors")
    assert info["classifier"] == [] and info["num_classes"] is None
    assert info["dropped"] == [f"layer5.conv2d_list.{i}.{w}" for i in range(4) for w in ("bias", "weight")]
    assert info["known"].startswith("ADVENT") and info["metadata"]["stride_in_1x1"] == "true"
    with torch.device("meta"):
        n_backbone = sum(k.startswith("backbone.") and not k.endswith("num_batches_tracked")
                         for k in DeepLabV2ResNet(num_classes=1).state_dict())
    assert info["tensors"] == n_backbone

    bad = tmp_path / "DeepLab_resnet_pretrained_init-f81d91e8.pth"  # the name promises a sha256 prefix
    bad.write_bytes(src.read_bytes())
    with pytest.raises(CheckpointError, match="sha256 does not start with f81d91e8") as e:
        convert_pth(bad, tmp_path / "x.safetensors")
    one_line(e)
    odd = tmp_path / "odd.pth"
    torch.save({"conv1.weight": _NotAWeight()}, odd)
    with pytest.raises(CheckpointError, match="could not read"):
        convert_pth(odd, tmp_path / "x.safetensors")
    small = tmp_path / "small.pth"
    torch.save({"Scale.conv1.weight": torch.zeros(64, 3, 7, 7)}, small)
    with pytest.raises(CheckpointError, match="not a Caffe DeepLab-v2 ResNet-101 state dict"):
        convert_pth(small, tmp_path / "x.safetensors")
    assert convert_main([str(tmp_path / "missing.pth"), str(tmp_path / "x.safetensors")]) == 2
