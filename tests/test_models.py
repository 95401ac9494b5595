"""uda_cli/models/ by what a network is (classifiers, generators, discriminators): the names a
method's networks save under stay those of every checkpoint written before, the digit nets
come from the registry, and ``backbone=auto`` picks by one rule."""

from __future__ import annotations

import hashlib

import pytest
import torch

from uda_cli.data.registry import DIGIT_CLASSES
from uda_cli.methods.base import RunSpec
from uda_cli.methods.registry import get_method
from uda_cli.models.classifiers import DigitNet, LeNetEncoder, SVHNEncoder, digit_model_name
from uda_cli.models.registry import build_model, list_models

# sha256 (first 16 hex digits) of "name (shape)" lines, sorted, of each method's state_dict, as
# the networks were before models/ was reorganised (digits.py, dtn_nets.py, i2i_nets.py,
# pixelda_nets.py). A change here means checkpoints saved earlier no longer load.
KEYS = [
    ("source-only", {}, 1, ("mnist", "usps"), 8, "4561cda7fae2460e"),
    ("source-only", {}, 3, ("svhn", "mnist"), 27, "294c69a08c544daf"),
    ("source-only", {}, 3, (), 27, "294c69a08c544daf"),
    ("dann", {}, 1, ("mnist", "usps"), 14, "9aa7f2748b86a85e"),
    ("dann", {"d_input": "conv"}, 3, ("svhn", "mnistm"), 33, "233515493edff80a"),
    ("dann", {"backbone": "lenet"}, 3, ("mnist", "mnistm"), 14, "8bfb156dbadfd9e9"),
    ("i2i", {}, 1, ("svhn", "mnist"), 44, "8db5ecd545b2631b"),
    ("i2i", {"share_encoder": False}, 1, ("mnist", "usps"), 50, "11668bab2e41c63d"),
    ("i2i", {"grayscale": False}, 3, ("svhn", "mnistm"), 63, "cc80877c6a24dd94"),
    ("pixelda", {}, 3, ("mnist", "mnistm"), 128, "2e5e2319e9a82f7c"),
    ("pixelda", {"task_net": "lenet", "g_blocks": 2}, 1, ("mnist", "usps"), 72, "86b99c931c2dcd88"),
    ("dtn", {}, 1, ("svhn", "mnist"), 66, "104f77253b2940f6"),
    ("dtn", {"grey_output": False, "classifier": "auto"}, 3, ("svhn", "mnistm"), 85, "617bac6af233a589"),
]


def _build(method, cfg, channels, domains):
    cls = get_method(method)
    spec = RunSpec(task="classification", classes=DIGIT_CLASSES, channels=channels, image_size=(32, 32),
                   domains=domains)
    return cls(cls.Config(**cfg), spec)


@pytest.mark.parametrize("method,cfg,channels,domains,count,digest", KEYS)
def test_checkpoint_keys_are_those_saved_before_the_move(method, cfg, channels, domains, count, digest):
    sd = _build(method, cfg, channels, domains).nets.state_dict()
    text = "\n".join(f"{k} {tuple(v.shape)}" for k, v in sorted(sd.items()))
    assert (len(sd), hashlib.sha256(text.encode()).hexdigest()[:16]) == (count, digest)


def test_methods_take_their_digit_nets_from_the_registry_with_the_same_initial_weights():
    torch.manual_seed(0)
    net = build_model("svhn_dann", num_classes=10, in_channels=3)
    torch.manual_seed(0)
    m = _build("dann", {}, 3, ("svhn", "mnistm"))
    for name, part in (("F", net.F), ("C", net.C)):
        assert all(torch.equal(a, b) for a, b in zip(part.state_dict().values(), m.nets[name].state_dict().values()))
    torch.manual_seed(0)
    net = build_model("lenet", num_classes=10, in_channels=3)
    torch.manual_seed(0)
    t = _build("pixelda", {}, 3, ("mnist", "mnistm")).nets["T"]
    assert isinstance(t, DigitNet)  # PixelDA's T is the registry's network itself (keys T.F.*, T.C.*)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), t.state_dict().values()))


def test_auto_picks_the_svhn_net_when_svhn_is_involved_else_lenet():
    assert digit_model_name("auto", ("svhn", "mnist"), 1) == "svhn_dann"
    assert digit_model_name("auto", ("mnist", "svhn:extra"), 3) == "svhn_dann"
    assert digit_model_name("auto", ("mnist", "mnistm"), 3) == "lenet"  # MNIST-M: colour, MNIST-shaped
    assert digit_model_name("auto", (), 1) == "lenet" and digit_model_name("auto", (), 3) == "svhn_dann"
    assert digit_model_name("lenet", ("svhn", "mnist"), 3) == "lenet"
    assert digit_model_name("svhn", ("mnist", "usps"), 1) == "svhn_dann"
    with pytest.raises(ValueError, match="unknown digit backbone 'resnet'"):
        digit_model_name("resnet", (), 3)
    assert {digit_model_name(b, (), 1) for b in ("lenet", "svhn")} <= set(list_models("classification"))
    assert isinstance(_build("source-only", {}, 3, ("svhn", "mnist")).nets["F"], SVHNEncoder)
    assert isinstance(_build("source-only", {}, 3, ("mnist", "mnistm")).nets["F"], LeNetEncoder)
