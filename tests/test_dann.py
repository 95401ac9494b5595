"""DANN: the gradient reversal layer and the ramp by reference math, the reversal wired
between F and D, a few CPU steps, and a checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from uda_cli.config import EvaluateOptions, TrainOptions
from uda_cli.data.registry import DIGIT_CLASSES
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import load_method, train
from uda_cli.methods.base import RunSpec
from uda_cli.methods.dann import DANN, domain_loss, grad_reverse, grl_lambda


def opts(tmp_path, **kw):
    base = dict(method="dann", src="tiny-src", tgt="tiny-tgt", steps=4, batch_size=8, out=tmp_path / "run",
                device="cpu", save_every=100, eval_every=0, log_every=2)
    base.update(kw)
    return TrainOptions(**base)


def test_grad_reverse_is_identity_forward_and_negated_scaled_backward():
    x = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -4.0]], requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x.detach())
    w = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 10.0, 0.5]])
    (y * w).sum().backward()  # d/dx of sum(w * x) is w; reversed: -0.3 w
    assert torch.allclose(x.grad, torch.tensor([[-0.3, -0.6, -0.9], [0.3, -3.0, -0.15]]))
    x.grad = None
    (grad_reverse(x, 0.0) * w).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_lambda_ramp_matches_the_paper():
    assert grl_lambda(0.0) == 0.0
    assert grl_lambda(0.5) == pytest.approx(0.9866142981514305)  # 2 / (1 + e^-5) - 1
    assert grl_lambda(1.0) == pytest.approx(0.9999092042625951)  # 2 / (1 + e^-10) - 1
    assert grl_lambda(0.1) == pytest.approx(2 / (1 + math.exp(-1)) - 1)


def test_domain_loss_is_source_mean_plus_target_mean():
    # source logits [0, ln 3]: p(domain 0) = 1/4 -> CE ln 4; [0, 0]: ln 2 -> mean (ln 4 + ln 2) / 2
    ls = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    # target logit [0, ln 3]: p(domain 1) = 3/4 -> CE ln(4/3)
    lt = torch.tensor([[0.0, math.log(3.0)]])
    expected = (math.log(4) + math.log(2)) / 2 + math.log(4 / 3)
    assert domain_loss(ls, lt).item() == pytest.approx(expected, rel=1e-6)


def _method(backbone="lenet", channels=1, **cfg):
    spec = RunSpec(task="classification", classes=DIGIT_CLASSES, channels=channels, image_size=(32, 32))
    return DANN(DANN.Config(backbone=backbone, **cfg), spec)


def test_reversal_weight_follows_total_steps_else_cfg_steps():
    m = _method(steps=1000)
    assert m.reversal_weight(500) == pytest.approx(grl_lambda(0.5))
    m.total_steps = 100  # what the engine sets: the run's real length (--steps)
    assert m.reversal_weight(50) == pytest.approx(grl_lambda(0.5))
    assert m.reversal_weight(500) == pytest.approx(grl_lambda(1.0))  # p is capped at 1
    assert _method(lambda_max=0.1).reversal_weight(10_000) == pytest.approx(0.1 * grl_lambda(1.0))
    d = _method(steps=1000, ramp_delay=200)  # no reversal for 200 steps, then the ramp over the other 800
    assert d.reversal_weight(0) == d.reversal_weight(199) == d.reversal_weight(200) == 0.0
    assert d.reversal_weight(600) == pytest.approx(grl_lambda(0.5))
    assert d.reversal_weight(1000) == pytest.approx(grl_lambda(1.0))


@pytest.mark.parametrize("backbone,channels,d_input", [("lenet", 1, "features"), ("svhn", 3, "features"), ("svhn", 3, "conv")])
def test_feature_gradient_is_label_gradient_minus_lambda_domain_gradient(backbone, channels, d_input):
    """One train_step's gradient on F equals dL_y/dF - lambda dL_d/dF, and D gets +dL_d/dD."""
    torch.manual_seed(0)
    m = _method(backbone, channels, d_input=d_input)
    m.eval()  # no dropout and frozen batch-norm statistics: the two forward passes agree
    m.total_steps = 10
    step, lambd = 5, grl_lambda(0.5)
    g = torch.Generator().manual_seed(1)
    x_s, x_t = torch.rand(4, channels, 32, 32, generator=g) * 2 - 1, torch.rand(3, channels, 32, 32, generator=g) * 2 - 1
    y_s = torch.tensor([0, 3, 3, 9])
    f_params, d_params = list(m.nets["F"].parameters()), list(m.nets["D"].parameters())
    got = {}

    def fake_update(name, loss):
        assert name == "main"
        got["f"] = torch.autograd.grad(loss, f_params, retain_graph=True)
        got["d"] = torch.autograd.grad(loss, d_params)

    m._update = fake_update
    m.train_step({"x_s": x_s, "y_s": y_s, "x_t": x_t, "idx_t": torch.arange(3)}, step)

    # by hand, without any reversal layer; D reads the encoder's features, or its conv output
    enc = m.nets["F"]
    hs, ht = enc.conv(x_s).flatten(1), enc.conv(x_t).flatten(1)
    fs, ft = enc.fc(hs), enc.fc(ht)
    ds, dt = (hs, ht) if d_input == "conv" else (fs, ft)
    l_y = F.cross_entropy(m.nets["C"](fs), y_s)
    l_d = (F.cross_entropy(m.nets["D"](ds), torch.zeros(4, dtype=torch.long))
           + F.cross_entropy(m.nets["D"](dt), torch.ones(3, dtype=torch.long)))
    gy = torch.autograd.grad(l_y, f_params, retain_graph=True)
    gd = torch.autograd.grad(l_d, f_params, retain_graph=True, allow_unused=True)  # D on conv: F's fc unused
    gd = [torch.zeros_like(p) if g is None else g for p, g in zip(f_params, gd)]
    gdd = torch.autograd.grad(l_d, d_params)
    for a, b, c in zip(got["f"], gy, gd):
        assert torch.allclose(a, b - lambd * c, atol=1e-6, rtol=1e-4)
    for a, b in zip(got["d"], gdd):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    assert any(c.abs().max() > 1e-6 for c in gd)  # the domain term was not vanishing


def test_defaults_are_the_papers():
    cfg = DANN.Config()
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.lr_schedule, cfg.gamma) == ("sgd", 0.01, 0.9, "inv", 10.0)
    assert cfg.batch_size == 64  # half of the paper's 128-image batch per domain
    assert isinstance(_method("lenet").nets["D"].net[1], torch.nn.Linear)
    assert _method("lenet").nets["D"].net[1].out_features == 500
    assert _method("svhn", 3).nets["D"].net[1].in_features == 3072
    # d_input=conv: D reads the conv output (128 x 7 x 7 on the SVHN net, 50 x 5 x 5 on LeNet)
    assert _method("svhn", 3, d_input="conv").nets["D"].net[1].in_features == 128 * 7 * 7
    assert _method("lenet", d_input="conv").nets["D"].net[1].in_features == 50 * 5 * 5


@pytest.mark.parametrize("src", ["tiny-src", "tiny-rgb"])
def test_runs_and_round_trips_a_checkpoint(tmp_path, src):
    r = train(opts(tmp_path, src=src), interactive=False)
    assert r.step == 4 and r.history
    for rec in r.history:
        for k in ("c/cls", "d/adv", "grl/lambda", "lr/main"):
            assert math.isfinite(rec[k]), (k, rec)
    # the inv schedule ran: lr below mu_0 after a few steps
    assert r.history[-1]["lr/main"] < 0.01
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    m1, _ = load_method(w, torch.device("cpu"))
    m2, meta = load_method(w, torch.device("cpu"))
    assert set(m1.nets) == {"F", "C", "D"} and meta["method"] == "dann"
    x = torch.rand(5, m1.spec.channels, 32, 32) * 2 - 1
    assert torch.equal(m1.predict(x), m2.predict(x))
    assert m1.features(x).shape[0] == 5
    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu"))
    assert report["accuracy"] == r.final_eval["accuracy"]


def test_ramp_follows_the_steps_option_not_the_config(tmp_path):
    # --steps 10 with cfg.steps 10,000: the last step (index 9) must be at p = 0.9
    r = train(opts(tmp_path, steps=10, log_every=1), interactive=False)
    assert r.history[-1]["grl/lambda"] == pytest.approx(grl_lambda(0.9), rel=1e-5)


@pytest.mark.parametrize("f_batches,expect", [("mixed", "mixed"), ("separate", "separate"), ("auto", "separate")])
def test_f_batches_decides_what_fs_batch_norm_normalises_together(f_batches, expect):
    """In training mode F's batch norm uses the batch's statistics: "mixed" runs source and
    target as one batch, "separate" as two, and D sees exactly those features. "auto" (the
    default) is "separate" on the SVHN net, which has batch norm."""
    torch.manual_seed(0)
    m = _method("svhn", 3, f_batches=f_batches)
    m.train()
    m.total_steps = 10
    x_s, x_t = torch.rand(4, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 + 1  # two domains apart
    seen = {}
    m.nets["D"].register_forward_hook(lambda mod, inp, out: seen.setdefault("d_in", inp[0].detach()))
    m._update = lambda name, loss: None
    m.train_step({"x_s": x_s, "y_s": torch.tensor([0, 1, 2, 3]), "x_t": x_t, "idx_t": torch.arange(3)}, 5)
    enc = m.nets["F"]
    with torch.no_grad():
        mixed, separate = enc(torch.cat([x_s, x_t])), torch.cat([enc(x_s), enc(x_t)])
    want, other = (mixed, separate) if expect == "mixed" else (separate, mixed)
    assert torch.allclose(seen["d_in"], want, atol=1e-5)
    assert not torch.allclose(seen["d_in"], other, atol=1e-3)


def test_f_batches_auto_is_mixed_on_lenet_which_has_no_batch_norm():
    assert DANN.Config().f_batches == "auto"
    assert not _method("lenet").separate_batches and _method("lenet", f_batches="separate").separate_batches
    assert _method("svhn", 3).separate_batches and not _method("svhn", 3, f_batches="mixed").separate_batches
