"""LSD-seg: D's four-class targets by reference math, each loss's value by hand and which
network each one reaches (by gradients), G's and D's shapes, the F/C split, and a few CPU
steps on tiny GTA5/Cityscapes-layout files with a checkpoint round trip through uda evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_segmentation_run import SIZE, _street, cli
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.trainer import load_method
from uda_cli.methods import lsd as lsd_mod
from uda_cli.methods.base import RunSpec
from uda_cli.methods.lsd import (LSD, SRC_FAKE, SRC_REAL, TGT_FAKE, TGT_REAL, class_ce, domain_ce, labels_at,
                                 recon_l1)
from uda_cli.models.discriminators import LSDDiscriminator
from uda_cli.models.generators import LSDGenerator
from uda_cli.models.segmentation import DeepLabV2Small, FCN8sVGG16

K = 11


def _spec():
    return RunSpec(task="segmentation", classes=tuple(str(i) for i in range(K)), channels=3, image_size=(32, 32),
                   domains=("mnist-scenes-mini", "mnistm-scenes-mini"))


def _small(**cfg):
    base = dict(model="deeplabv2_small", pretrained="none", g_width=8, g_blocks=1, d_width=8, d_blocks=1)
    return LSD(LSD.Config(**{**base, **cfg}), _spec())


def _batch(n=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n, size, size), generator=g)
    y[:, :4] = 255
    return {"x_s": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "y_s": y,
            "x_t": torch.rand(n, 3, size, size, generator=g) * 2 - 1}


# ---- the four classes --------------------------------------------------------------------------


def test_four_class_targets_by_hand():
    assert (SRC_REAL, SRC_FAKE, TGT_REAL, TGT_FAKE) == (0, 1, 2, 3)
    # within the domain for D and G, crossed for F
    assert lsd_mod.D_TARGETS == {("src", "real"): 0, ("src", "fake"): 1, ("tgt", "real"): 2, ("tgt", "fake"): 3}
    assert lsd_mod.G_TARGETS == {"src": 0, "tgt": 2} and lsd_mod.F_TARGETS == {"src": 2, "tgt": 0}
    # a hand-made D map: two patches, logits (a, b, c, d)
    logits = torch.tensor([[1.0, 2.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]]).T.reshape(1, 4, 1, 2)
    for label in range(4):
        want = [math.log(sum(math.exp(v) for v in logits[0, :, 0, j].tolist())) - logits[0, label, 0, j].item()
                for j in range(2)]
        assert domain_ce(logits, label).item() == pytest.approx(sum(want) / 2, rel=1e-6)
        assert domain_ce(logits, label, "sum").item() == pytest.approx(sum(want), rel=1e-6)  # / batch 1
    # batch 2, reduction sum: pixel sum / batch
    two = torch.cat([logits, logits])
    assert domain_ce(two, SRC_FAKE, "sum").item() == pytest.approx(domain_ce(logits, SRC_FAKE, "sum").item(), rel=1e-6)


def test_aux_labels_reduction_and_l1():
    y = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2], [255, 255, 2, 2]]])
    assert labels_at(y, (2, 2)).tolist() == [[[0, 1], [255, 2]]]
    logits = torch.zeros(1, 3, 2, 2)
    assert class_ce(logits, labels_at(y, (2, 2))).item() == pytest.approx(math.log(3))  # ignored pixel skipped
    assert class_ce(logits, labels_at(y, (2, 2)), "sum").item() == pytest.approx(3 * math.log(3))
    assert class_ce(logits, torch.full((1, 2, 2), 255)).item() == 0.0
    a, b = torch.ones(1, 3, 2, 2), -torch.ones(1, 3, 2, 2)
    assert recon_l1(a, b).item() == pytest.approx(1.0)  # white vs black: 1 in [0, 1] units


# ---- networks ----------------------------------------------------------------------------------


def test_generator_and_discriminator_shapes():
    d = LSDDiscriminator(19)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert (convs[0].in_channels, convs[0].out_channels, convs[0].kernel_size, convs[0].stride, convs[0].padding) == \
        (3, 128, (4, 4), (2, 2), (2, 2))
    assert len(convs) == 1 + 9 + 2 and sum(isinstance(m, nn.MaxPool2d) for m in d.modules()) == 2
    dom, aux = d(torch.rand(2, 3, 48, 96))
    assert dom.shape == (2, 4, 6, 12) and aux.shape == (2, 19, 6, 12)
    g = LSDGenerator([("fc7", 64, 32), ("pool4", 16, 16), ("pool3", 8, 8)], width=8, blocks=1)
    maps = {"fc7": torch.rand(1, 64, 2, 3), "pool4": torch.rand(1, 16, 3, 6), "pool3": torch.rand(1, 8, 6, 12)}
    out = g(maps, (48, 90))
    assert out.shape == (1, 3, 48, 90) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="powers of 2"):
        LSDGenerator([("a", 4, 8), ("b", 4, 16)])


def _thin_fcn8s():
    """FCN-8s with fc6/fc7 at 16 channels (the real 4096 take 20 s to initialise on a CPU)."""
    with torch.device("meta"):
        net = FCN8sVGG16(K)
    net.fc6, net.fc7, net.score_fr = nn.Conv2d(512, 16, 7, padding=3), nn.Conv2d(16, 16, 1), nn.Conv2d(16, K, 1)
    net.to_empty(device="cpu")
    net.input = type(net.input)()  # its mean/std buffers
    for p in net.parameters():
        nn.init.normal_(p, 0, 0.05)
    return net


def test_f_c_split_is_the_forward():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 96) * 2 - 1
    assert FCN8sVGG16.embed_layout(None) == [("fc7", 4096, 32), ("pool4", 512, 16), ("pool3", 256, 8)]
    for net in (DeepLabV2Small(K).eval(), _thin_fcn8s().eval()):
        maps = net.embed(x)
        assert [(k, v.shape[1], round(64 / v.shape[2])) for k, v in maps.items()] == \
            [(n, 16 if n == "fc7" else c, s) for n, c, s in net.embed_layout()]
        assert torch.allclose(net.classify(maps, x.shape[-2:]), net(x), atol=1e-6)


# ---- the step ----------------------------------------------------------------------------------


def _record(m):
    """The engine's update replaced: per group, the loss and, per network, whether its
    trainable parameters got a gradient ("none": no gradient at all; "zero"; "nonzero")."""
    got = {}

    def fake_update(name, loss):
        reach = {}
        for net_name, net in m.nets.items():
            ps = [p for p in net.parameters() if p.requires_grad]
            gs = [g for g in torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True) if g is not None]
            reach[net_name] = "none" if not gs else ("nonzero" if any(g.abs().max() > 0 for g in gs) else "zero")
        got[name] = (loss.detach(), reach)

    m._update = fake_update
    return got


def test_each_loss_by_hand_and_which_network_it_reaches():
    torch.manual_seed(0)
    m = _small(g_aux_weight=0.5)
    m.eval()  # no dropout: the hand forward below sees the same networks
    b = _batch()
    got = _record(m)
    losses = m.train_step(b, 0)
    assert list(got) == ["D", "G", "F"]
    assert set(losses) == {"d/domain", "d/aux", "g/adv", "g/rec", "g/aux", "c/seg", "f/adv", "f/aux"}
    # D's loss reaches D alone; G's loss G alone (F's maps detached, D frozen); F's loss F alone
    # (G and D frozen), its adversarial part flowing through both
    assert got["D"][1] == {"F": "none", "G": "none", "D": "nonzero"}
    assert got["G"][1] == {"F": "none", "G": "nonzero", "D": "none"}
    assert got["F"][1] == {"F": "nonzero", "G": "none", "D": "none"}

    Fn, G, D = m.nets["F"], m.nets["G"], m.nets["D"]
    xs, ys, xt = b["x_s"], b["y_s"], b["x_t"]
    gs, gt = G(Fn.embed(xs), xs.shape[-2:]), G(Fn.embed(xt), xt.shape[-2:])
    (ds_r, cs_r), (ds_f, cs_f), (dt_r, _), (dt_f, _) = D(xs), D(gs), D(xt), D(gt)
    yd = F.interpolate(ys[:, None].float(), size=ds_r.shape[-2:], mode="nearest")[:, 0].long()

    def ce(logits, cls):  # literal class indices: the reference, not the module's constants
        return F.cross_entropy(logits, torch.full((logits.shape[0], *logits.shape[2:]), cls))

    def aux(logits):
        return F.cross_entropy(logits, yd, ignore_index=255)

    d_dom = ce(ds_r, 0) + ce(ds_f, 1) + ce(dt_r, 2) + ce(dt_f, 3)
    assert torch.allclose(got["D"][0], d_dom + aux(cs_f), rtol=1e-5)  # aux on G(F(x_s)) by default
    g_rec = ((gs - xs).abs().mean() + (gt - xt).abs().mean()) / 2
    assert torch.allclose(got["G"][0], (ce(ds_f, 0) + ce(dt_f, 2)) + g_rec + 0.5 * aux(cs_f), rtol=1e-5)
    seg = F.cross_entropy(F.interpolate(Fn(xs), size=(32, 32), mode="bilinear", align_corners=True), ys,
                          ignore_index=255)
    f_adv = ce(ds_f, 2) + ce(dt_f, 0)  # crossed: source generation -> target-real, target's -> source-real
    assert torch.allclose(got["F"][0], seg + 0.1 * aux(cs_f) + 0.1 * f_adv, rtol=1e-5)
    for k, v in {"d/domain": d_dom, "g/adv": ce(ds_f, 0) + ce(dt_f, 2), "g/rec": g_rec, "c/seg": seg,
                 "f/adv": f_adv, "f/aux": aux(cs_f)}.items():
        assert torch.allclose(losses[k], v, rtol=1e-5), k

    # the code's variant: D's aux head on the real source image, summed CE
    m2 = _small(d_aux_input="real", reduction="sum")
    m2.nets.load_state_dict(m.nets.state_dict())
    m2.eval()
    got2 = _record(m2)
    m2.train_step(b, 0)
    n_d = ds_r.shape[-1] * ds_r.shape[-2]
    aux_sum = F.cross_entropy(cs_r, yd, ignore_index=255, reduction="sum") / 2
    assert torch.allclose(got2["D"][0], d_dom * n_d + aux_sum, rtol=1e-4)

    # F's adversarial and auxiliary terms move F: its gradient differs from the segmentation CE's
    m3 = _small(alpha=0.0, beta=0.0)
    m3.nets.load_state_dict(m.nets.state_dict())
    m3.eval()
    fp = [p for p in m.nets["F"].parameters() if p.requires_grad]
    g_full = torch.autograd.grad(_f_loss(m, b), fp)
    g_seg = torch.autograd.grad(_f_loss(m3, b), [p for p in m3.nets["F"].parameters() if p.requires_grad])
    assert any((a - c).abs().max() > 1e-7 for a, c in zip(g_full, g_seg))


def _f_loss(m, b):
    """F's loss of one step, as a graph (the update hook keeps it)."""
    kept = {}
    m._update = lambda name, loss: kept.__setitem__(name, loss)
    m.train_step(b, 0)
    return kept["F"]


def test_defaults_and_groups():
    cfg = LSD.Config()
    assert (cfg.optimizer, cfg.lr, cfg.betas, cfg.batch_size, cfg.steps) == ("adam", 1e-5, (0.9, 0.999), 1, 100_000)
    assert (cfg.gd_lr, cfg.gd_betas, cfg.alpha, cfg.beta, cfg.l1_weight) == (2e-4, (0.7, 0.999), 0.1, 0.1, 1.0)
    assert (cfg.g_adv_weight, cfg.g_aux_weight, cfg.d_aux_input, cfg.reduction) == (1.0, 0.0, "generated", "mean")
    assert LSD.task_defaults("segmentation", ("gta5", "cityscapes")) == {"model": "fcn8s_vgg16"}
    small = LSD.task_defaults("segmentation", ("mnist-scenes-mini", "mnistm-scenes-mini"))
    assert small["model"] == "deeplabv2_small" and (small["lr"], small["batch_size"], small["steps"]) == (1e-3, 16, 1500)
    opt = _small().optimizers()
    assert {k: v.nets for k, v in opt.items()} == {"F": ("F",), "G": ("G",), "D": ("D",)}
    assert (opt["G"].lr, opt["G"].betas, opt["D"].lr, opt["F"].lr) == (2e-4, (0.7, 0.999), 2e-4, 1e-5)
    assert LSD.translates_images and "classification" not in LSD.tasks
    m = _small()
    m.eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = m.translate(x)
    assert y.shape == x.shape and y.abs().max() <= 1


# ---- through the CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def street(tmp_path_factory):
    return _street(tmp_path_factory.mktemp("street"))


THIN_STREET_NETS = ("model=deeplabv2_small", "pretrained=none", "g_width=8", "d_width=8", "g_blocks=1")


def train_translator_on_street(method: str, street, run, capsys, *sets: str):
    """``uda train --method METHOD`` 3 steps on the tiny street files with thin networks
    (``THIN_STREET_NETS`` + ``sets``), then its checkpoint loaded twice: the same predictions and
    translations from both, and ``uda evaluate`` on it. Returns the loaded method and metadata."""
    args = ["train", "--method", method, "--src", "gta5", "--tgt", "cityscapes", "--data-root", str(street),
            *[a for v in (*THIN_STREET_NETS, *sets) for a in ("--set", v)], *SIZE, "--crop", "64x32",
            "--batch-size", "1", "--steps", "3", "--device", "cpu", "--eval-every", "0", "--workers", "0",
            "--log-format", "text", "--out", str(run)]
    with pytest.warns(UserWarning, match="labels differ in size"):
        code, out, err = cli(args, capsys)
    assert code == 0, err
    assert "target mIoU (cityscapes:val)" in out
    w = ckpt.resolve_checkpoint(run)
    m1, meta = load_method(w, torch.device("cpu"))
    m2, _ = load_method(w, torch.device("cpu"))
    x = torch.rand(1, 3, 48, 96) * 2 - 1
    m1.eval(), m2.eval()
    assert torch.equal(m1.predict(x), m2.predict(x)) and torch.equal(m1.translate(x), m2.translate(x))
    code, out, err = cli(["evaluate", str(run), "--domain", "cityscapes:val", "--workers", "0", "--device", "cpu"],
                         capsys)
    assert code == 0 and "mIoU" in out, err
    return m1, meta


def test_trains_on_street_files_and_round_trips_a_checkpoint(street, tmp_path, capsys):
    run = tmp_path / "run"
    m1, meta = train_translator_on_street("lsd", street, run, capsys, "d_blocks=1")
    assert meta["method"] == "lsd" and set(m1.nets) == {"F", "G", "D"} and m1.cfg.model == "deeplabv2_small"
    # adapt-images exports the translated source (tests/test_adapt_segmentation.py checks the files)
    code, _, err = cli(["adapt-images", str(run), "--data-root", str(street), "--out", str(tmp_path / "x")], capsys)
    assert code == 0 and len(list((tmp_path / "x" / "images").glob("*.png"))) == 5, err


def test_classification_domains_are_refused_in_one_line(tmp_path, capsys):
    code, _, err = cli(["train", "--method", "lsd", "--src", "mnist2000", "--tgt", "usps1800", "--steps", "1",
                        "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and "segmentation" in err and len(err.strip().splitlines()) == 1, err
