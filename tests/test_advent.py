"""ADVENT: the entropy map by reference math, the entropy discriminator's layers and shapes,
which network each loss reaches (and which one each update changes, through the real
engine), the multi-level wiring, a few CPU steps of both variants on the embedded digit
scenes, a checkpoint round trip and uda evaluate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda_cli.config import EvaluateOptions, TrainOptions
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import load_method, train
from uda_cli.errors import ConfigError
from uda_cli.methods import advent as advent_mod
from uda_cli.methods.advent import SMALL_LAMBDAS, Advent, entropy_map
from uda_cli.methods.base import RunSpec
from uda_cli.methods.source_only import segmentation_loss
from uda_cli.models.discriminators import EntropyDiscriminator
from uda_cli.models.segmentation import DeepLabV2ResNet

K = 11  # the digit scenes: ten digits and the background


# ---- the entropy map -------------------------------------------------------------------------


def test_entropy_map_uniform_is_one_and_one_hot_is_zero():
    e = entropy_map(torch.zeros(2, K, 3, 4))  # equal logits: uniform p
    assert e.shape == (2, K, 3, 4)
    assert torch.allclose(e, torch.full_like(e, 1 / K))  # each class carries (1/K) log K / log K
    assert torch.allclose(e.sum(1), torch.ones(2, 3, 4))
    one_hot = F.one_hot(torch.tensor([[3, 0], [10, 7]]), K).permute(2, 0, 1).unsqueeze(0).float()
    assert torch.equal(entropy_map(one_hot, probs=True), torch.zeros(1, K, 2, 2))
    # very confident logits: p underflows to 0 where it is not the argmax, still finite and ~0
    sharp = torch.full((1, K, 1, 1), -1e4)
    sharp[0, 2] = 1e4
    assert entropy_map(sharp).abs().max() < 1e-6


def test_entropy_map_by_hand_and_equal_to_advents_log2_form():
    p = torch.tensor([0.5, 0.25, 0.25]).view(1, 3, 1, 1)
    # -0.5 ln 0.5 = 0.25 * 2 ln 2 = -0.25 ln 0.25 = ln 2 / 2: the three terms are equal, / ln 3
    want = torch.full((1, 3, 1, 1), math.log(2) / 2 / math.log(3))
    assert torch.allclose(entropy_map(p, probs=True), want, atol=1e-7)
    assert torch.allclose(entropy_map(p.log()), want, atol=1e-7)  # log p as logits: the same softmax
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 5, 6, generator=g) * 3
    q = logits.softmax(1)
    advent_form = -q * torch.log2(q + 1e-30) / math.log2(19)  # ADVENT's prob_2_entropy
    assert torch.allclose(entropy_map(logits), advent_form, atol=1e-6)
    with pytest.raises(ValueError, match="at least 2 classes"):
        entropy_map(torch.zeros(1, 1, 2, 2))


# ---- the discriminator -----------------------------------------------------------------------


def test_entropy_discriminator_is_advents_five_convs():
    d = EntropyDiscriminator(19)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(19, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    relus = [m for m in d.modules() if isinstance(m, nn.LeakyReLU)]
    assert len(relus) == 4 and all(r.negative_slope == 0.2 for r in relus)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.Sigmoid))
                   for m in d.modules())
    assert isinstance(d.net[-1], nn.Conv2d)  # logits out
    assert d(torch.rand(2, 19, 64, 64)).shape == (2, 1, 2, 2)
    assert d(torch.rand(1, 19, 96, 160)).shape == (1, 1, 3, 5)
    assert [c.out_channels for c in EntropyDiscriminator(3, ndf=8).modules() if isinstance(c, nn.Conv2d)] == \
        [8, 16, 32, 64, 1]


# ---- the method, by hand ---------------------------------------------------------------------


def _spec():
    return RunSpec(task="segmentation", classes=tuple(str(i) for i in range(K)), channels=3, image_size=(64, 64),
                   domains=("mnist-scenes-mini", "mnistm-scenes-mini"))


def _small(**cfg):
    return Advent(Advent.Config(model="deeplabv2_small", pretrained="none", **cfg), _spec())


def _batch(n=2, size=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n, size, size), generator=g)
    y[:, :4] = 255  # some ignored pixels
    return {"x_s": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "y_s": y,
            "x_t": torch.rand(n, 3, size, size, generator=g) * 2 - 1}


def test_defaults_are_advents():
    cfg = Advent.Config()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_schedule) == ("sgd", 2.5e-4, 0.9, 5e-4, "poly")
    assert (cfg.batch_size, cfg.steps, cfg.variant, cfg.multi_level) == (1, 120_000, "advent", "auto")
    assert (cfg.lambda_seg, cfg.lambda_seg_aux, cfg.lambda_adv, cfg.lambda_adv_aux) == (1.0, 0.1, 0.001, 0.0002)
    assert (cfg.lambda_ent, cfg.lambda_ent_aux, cfg.d_lr, cfg.d_betas, cfg.ndf) == (0.001, 0.0002, 1e-4, (0.9, 0.99), 64)
    small = Advent.task_defaults("segmentation", ("mnist-scenes-mini", "mnistm-scenes-mini"))
    assert small["model"] == "deeplabv2_small" and (small["optimizer"], small["lr"], small["batch_size"],
                                                     small["steps"]) == ("adam", 1e-3, 16, 1_500)
    assert {k: small[k] for k in SMALL_LAMBDAS} == SMALL_LAMBDAS
    m = _small()
    opt = m.optimizers()
    assert set(opt) == {"F", "D"} and opt["F"].nets == ("F",) and opt["D"].nets == ("D",)
    assert (opt["D"].kind, opt["D"].lr, opt["D"].betas, opt["D"].weight_decay) == ("adam", 1e-4, (0.9, 0.99), 0.0)
    assert opt["D"].schedule == opt["F"].schedule == "poly"
    assert set(_small(variant="minent").nets) == {"F"} and set(_small(variant="minent").optimizers()) == {"F"}


def test_multi_level_falls_back_where_the_network_has_no_aux_head_and_refuses_when_asked():
    assert not _small().multi_level and set(_small().nets) == {"F", "D"}
    with pytest.raises(ConfigError, match="deeplabv2_small has no aux head"):
        _small(multi_level=True)
    assert set(_small(multi_level=False).nets) == {"F", "D"}


def _record(m):
    """Replace the engine's update: for each group, the loss and its gradients on F and on D."""
    got = {}
    f_params = [p for p in m.nets["F"].parameters() if p.requires_grad]
    d_params = [p for n, net in m.nets.items() if n != "F" for p in net.parameters()]

    def fake_update(name, loss):
        gf = torch.autograd.grad(loss, f_params, retain_graph=True, allow_unused=True)
        gd = torch.autograd.grad(loss, d_params, allow_unused=True) if d_params else ()
        got[name] = (loss.detach(), gf, gd)

    m._update = fake_update
    return got


def test_each_loss_is_advents_and_reaches_the_network_it_should():
    torch.manual_seed(0)
    m = _small(lambda_adv=0.3)  # large, so the adversarial part of F's gradient is visible
    m.eval()  # batch norm from running statistics: the hand forward below sees the same F
    b = _batch()
    got = _record(m)
    losses = m.train_step(b, 0)
    assert set(losses) == {"c/seg", "f/adv", "d/adv"} and list(got) == ["F", "D"]

    Fn, D = m.nets["F"], m.nets["D"]
    up = lambda x: F.interpolate(Fn(x), size=x.shape[-2:], mode="bilinear", align_corners=True)  # noqa: E731
    ls, lt = up(b["x_s"]), up(b["x_t"])
    ce = segmentation_loss(ls, b["y_s"])
    dt = D(entropy_map(lt))
    adv = F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt))
    ds, dt2 = D(entropy_map(ls.detach())), D(entropy_map(lt.detach()))
    ld = (F.binary_cross_entropy_with_logits(ds, torch.zeros_like(ds))
          + F.binary_cross_entropy_with_logits(dt2, torch.ones_like(dt2))) / 2
    assert torch.allclose(got["F"][0], ce + 0.3 * adv, rtol=1e-5)
    assert torch.allclose(got["D"][0], ld, rtol=1e-5)
    assert torch.allclose(losses["c/seg"], ce) and torch.allclose(losses["f/adv"], adv) and torch.allclose(losses["d/adv"], ld)

    # F's loss reaches F (through D for the adversarial part); D's loss never reaches F (detached maps)
    _, gf, _ = got["F"]
    assert all(g is not None for g in gf)
    g_ce = torch.autograd.grad(ce, [p for p in Fn.parameters() if p.requires_grad], retain_graph=True)
    assert any((a - c).abs().max() > 1e-6 for a, c in zip(gf, g_ce))  # the adversarial term moved F
    _, gf_d, gd_d = got["D"]
    assert all(g is None for g in gf_d) and all(g is not None for g in gd_d)


def test_minent_is_ce_plus_weighted_mean_normalised_entropy():
    torch.manual_seed(0)
    m = _small(variant="minent", lambda_ent=0.5)
    m.eval()
    b = _batch()
    got = _record(m)
    losses = m.train_step(b, 0)
    assert set(losses) == {"c/seg", "f/ent"} and list(got) == ["F"]
    Fn = m.nets["F"]
    up = lambda x: F.interpolate(Fn(x), size=x.shape[-2:], mode="bilinear", align_corners=True)  # noqa: E731
    p = up(b["x_t"]).softmax(1)
    ent = -(p * torch.log2(p + 1e-30)).sum() / (p.shape[0] * p.shape[2] * p.shape[3] * math.log2(K))  # ADVENT's
    assert torch.allclose(losses["f/ent"], ent, rtol=1e-5)
    assert torch.allclose(got["F"][0], segmentation_loss(up(b["x_s"]), b["y_s"]) + 0.5 * ent, rtol=1e-5)


def test_multi_level_gives_the_aux_head_its_own_losses_and_discriminator(monkeypatch):
    # a 4-block DeepLab-v2 (the ResNet-101 layout at one block a stage) keeps this CPU test short
    monkeypatch.setattr(advent_mod, "build_segmentation_net",
                        lambda cfg, spec, **kw: DeepLabV2ResNet(spec.num_classes, blocks=(1, 1, 1, 1), **kw))
    torch.manual_seed(0)
    m = Advent(Advent.Config(model="deeplabv2_r101", pretrained="none"), _spec())
    assert m.multi_level and set(m.nets) == {"F", "D", "D_aux"} and m.nets["F"].multi_level
    assert m.optimizers()["D"].nets == ("D", "D_aux")
    m.eval()
    b = _batch(n=1, size=40)
    got = _record(m)
    losses = m.train_step(b, 0)
    assert set(losses) == {"c/seg", "c/seg_aux", "f/adv", "f/adv_aux", "d/adv", "d/adv_aux"}
    Fn = m.nets["F"]
    out = {k: F.interpolate(v, size=(40, 40), mode="bilinear", align_corners=True)
           for k, v in Fn.forward_multi(b["x_t"]).items()}
    adv_aux = F.binary_cross_entropy_with_logits(m.nets["D_aux"](entropy_map(out["aux"])),
                                                 torch.zeros(1, 1, 1, 1))
    assert torch.allclose(losses["f/adv_aux"], adv_aux)
    want_f = losses["c/seg"] + 0.1 * losses["c/seg_aux"] + 0.001 * losses["f/adv"] + 0.0002 * losses["f/adv_aux"]
    assert torch.allclose(got["F"][0], want_f, rtol=1e-5)
    assert torch.allclose(got["D"][0], losses["d/adv"] + losses["d/adv_aux"], rtol=1e-5)
    m.eval()
    assert torch.equal(m.predict(b["x_t"]), Fn(b["x_t"]))  # the main head alone

    minent = Advent(Advent.Config(model="deeplabv2_r101", pretrained="none", variant="minent"), _spec())
    minent.eval()
    got = _record(minent)
    losses = minent.train_step(b, 0)
    assert set(losses) == {"c/seg", "c/seg_aux", "f/ent", "f/ent_aux"}
    assert torch.allclose(got["F"][0], losses["c/seg"] + 0.1 * losses["c/seg_aux"] + 0.001 * losses["f/ent"]
                          + 0.0002 * losses["f/ent_aux"], rtol=1e-5)


# ---- through the engine ----------------------------------------------------------------------


def opts(tmp_path, **kw):
    base = dict(method="advent", src="mnist-scenes-mini", tgt="mnistm-scenes-mini", steps=3, batch_size=2,
                workers=0, out=tmp_path / "run", device="cpu", save_every=100, eval_every=0, log_every=1)
    base.update(kw)
    return TrainOptions(**base)


def test_each_update_changes_only_its_own_network(tmp_path, monkeypatch):
    changed = []

    def watched(self, name, loss):
        before = {k: v.detach().clone() for k, v in self.nets.state_dict().items()}
        self._update(name, loss)
        after = self.nets.state_dict()
        changed.append((name, {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}))

    monkeypatch.setattr(Advent, "update", watched)
    train(opts(tmp_path, steps=2), interactive=False)
    assert changed == [("F", {"F"}), ("D", {"D"})] * 2


@pytest.mark.parametrize("variant,keys", [("advent", ("c/seg", "f/adv", "d/adv", "lr/F", "lr/D")),
                                          ("minent", ("c/seg", "f/ent", "lr/F"))])
def test_runs_and_round_trips_a_checkpoint_and_evaluates(tmp_path, variant, keys):
    r = train(opts(tmp_path, params={"variant": variant}), interactive=False)
    assert r.step == 3 and len(r.history) == 3
    for rec in r.history:
        for k in keys:
            assert math.isfinite(rec[k]), (k, rec)
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    m1, meta = load_method(w, torch.device("cpu"))
    m2, _ = load_method(w, torch.device("cpu"))
    assert meta["method"] == "advent" and set(m1.nets) == ({"F", "D"} if variant == "advent" else {"F"})
    assert m1.cfg.variant == variant and m1.cfg.model == "deeplabv2_small"
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    p = m1.predict(x)
    assert p.shape == (2, K, 16, 16) and torch.equal(p, m2.predict(x))
    assert m1.features(x).shape[:2] == (2, 96)
    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu", workers=0))
    assert report["miou"] == pytest.approx(r.final_eval["miou"])


def test_classification_domains_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="handles segmentation domains, not classification"):
        train(opts(tmp_path, src="tiny-src", tgt="tiny-tgt"), interactive=False)
