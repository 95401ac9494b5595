"""PixelDA: tiny CPU runs, checkpoint round trip, and reference math for its losses."""

from __future__ import annotations

import math
import signal
import tomllib
from pathlib import Path

import pytest
import torch

from uda_cli.config import EvaluateOptions, TrainOptions, merge_train_options, method_config
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import build_optimizers, load_method, train
from uda_cli.methods.base import RunSpec
from uda_cli.methods.pixelda import PixelDA, foreground_mask, masked_pmse
from uda_cli.models.discriminators import GaussianNoise, PixelDADiscriminator
from _checks import assert_same_weights

# Small networks keep the CPU runs fast; the architecture is the same.
SMALL = {"g_filters": 8, "g_blocks": 1, "d_filters": 8, "task_net": "lenet"}


def opts(tmp_path, **kw):
    base = dict(method="pixelda", src="tiny-src", tgt="tiny-rgb", steps=6, batch_size=4, out=tmp_path / "run",
                device="cpu", save_every=3, eval_every=0, log_every=2, params=dict(SMALL))
    base.update(kw)
    return TrainOptions(**base)


def small_method(channels=3, **params):
    cfg = method_config("pixelda", {**SMALL, **params})
    return PixelDA(cfg, RunSpec("classification", tuple("0123456789"), channels, (32, 32)))


def batch(channels=3, b=4):
    g = torch.Generator().manual_seed(0)
    return {"x_s": torch.rand(b, channels, 32, 32, generator=g) * 2 - 1,
            "y_s": torch.randint(0, 10, (b,), generator=g),
            "x_t": torch.rand(b, channels, 32, 32, generator=g) * 2 - 1,
            "idx_t": torch.arange(b)}


# ---- defaults -------------------------------------------------------------------------------

def test_defaults_are_the_papers():
    cfg = PixelDA.Config()
    assert (cfg.lr, cfg.betas[0], cfg.batch_size, cfg.weight_decay) == (1e-3, 0.5, 32, 1e-5)
    assert (cfg.lr_schedule, cfg.lr_step_every, cfg.lr_gamma) == ("step", 20_000, 0.95)
    assert (cfg.alpha, cfg.beta, cfg.g_adv_weight, cfg.g_task_weight, cfg.gamma, cfg.noise_dim) == (
        0.1356, 1.0, 0.0113, 0.0101, 0.0, 10)
    assert cfg.grad_clip == 5.0
    assert (cfg.g_blocks, cfg.g_filters) == (6, 64)
    m = PixelDA(cfg, RunSpec("classification", tuple("0123456789"), 3, (32, 32)))
    convs = [mod for mod in m.nets["D"].modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512] and convs[0].stride == (1, 1)
    assert type(m.nets["T"].F).__name__ == "SVHNEncoder"  # colour run -> the SVHN network
    assert PixelDA.input_channels(cfg, 1, 3) == 3  # MNIST -> MNIST-M runs in colour
    assert set(m.optimizers()) == {"D", "T", "G"}


# ---- reference math -------------------------------------------------------------------------

def test_pmse_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    g = torch.zeros_like(x)
    # d = [1, 2, 3, 4], k = 4: 30/4 - 10^2/16 = 1.25 (the variance of d)
    assert masked_pmse(x, g).item() == pytest.approx(1.25)
    assert masked_pmse(x, g, torch.ones(1, 1, 2, 2)).item() == pytest.approx(1.25)
    # the mask removes the 4: d o m = [1, 2, 3, 0], k = 3: 14/3 - 6^2/9 = 2/3
    m = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 2)
    assert masked_pmse(x, g, m).item() == pytest.approx(2 / 3)
    # whatever G does on the masked-out pixel does not count
    g2 = torch.tensor([0.0, 0.0, 0.0, -9.0]).view(1, 1, 2, 2)
    assert masked_pmse(x, g2, m).item() == pytest.approx(2 / 3)
    # plain MSE over the same masked values would be 14/3: PMSE is not MSE
    assert masked_pmse(x, g, m).item() != pytest.approx(14 / 3)


def test_pmse_is_invariant_to_a_constant_shift_of_the_masked_difference():
    x = torch.tensor([0.5, -0.25, 1.0, 0.0, 0.75, -1.0]).view(1, 1, 2, 3)
    g = torch.tensor([0.1, 0.2, -0.3, 0.4, 0.0, 0.9]).view(1, 1, 2, 3)
    m = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0]).view(1, 1, 2, 3)
    # by hand: masked d = [0.4, -0.45, -0.4, 0.75], mean 0.075, variance
    d = [0.4, -0.45, -0.4, 0.75]
    mean = sum(d) / 4
    var = sum((v - mean) ** 2 for v in d) / 4
    assert masked_pmse(x, g, m).item() == pytest.approx(var, abs=1e-6)
    shifted = g + 0.37 * m  # the same constant on every masked pixel
    assert masked_pmse(x, shifted, m).item() == pytest.approx(var, abs=1e-6)
    # ... whereas a shift that is not constant over the mask changes it
    assert masked_pmse(x, g + torch.tensor([0.37, 0, 0, 0, 0, 0]).view(1, 1, 2, 3), m).item() != pytest.approx(var)


def test_pmse_channels_batch_and_empty_mask():
    # 3 channels, 1x2 image; the mask keeps pixel 0 in every channel: d there = [1, 2, 6], k = 3
    x = torch.tensor([[1.0, 5.0], [2.0, -3.0], [6.0, 0.5]]).view(1, 3, 1, 2)
    m = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert masked_pmse(x, torch.zeros_like(x), m).item() == pytest.approx(41 / 3 - 81 / 9)
    # batch mean of per-image values; an empty mask contributes 0
    a = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    b = torch.tensor([7.0, 7.0, 7.0, 7.0]).view(1, 1, 2, 2)
    xs, gs = torch.cat([a, b]), torch.zeros(2, 1, 2, 2)
    ms = torch.stack([torch.ones(1, 2, 2), torch.zeros(1, 2, 2)])
    assert masked_pmse(xs, gs, ms).item() == pytest.approx((1.25 + 0.0) / 2)


def test_foreground_mask_marks_the_bright_digit():
    x = torch.tensor([-1.0, 0.9, 0.2, -0.1]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)  # grey repeated to RGB
    assert foreground_mask(x).view(-1).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert foreground_mask(x, 0.5).view(-1).tolist() == [0.0, 1.0, 0.0, 0.0]
    assert foreground_mask(x).shape == (1, 1, 2, 2)


def test_content_loss_uses_the_foreground_mask():
    m = small_method(1, gamma=1.0)
    x = torch.tensor([-1.0, 1.0, 1.0, -1.0]).view(1, 1, 2, 2)
    fake = torch.tensor([0.3, 0.5, 0.5, -0.7]).view(1, 1, 2, 2)  # digit pixels shifted by -0.5, background repainted
    assert m.content_loss(x, fake).item() == pytest.approx(0.0, abs=1e-7)
    m.cfg.content_mask = "none"
    d = [-1.3, 0.5, 0.5, -0.3]
    mean = sum(d) / 4
    assert m.content_loss(x, fake).item() == pytest.approx(sum((v - mean) ** 2 for v in d) / 4, abs=1e-6)


def test_gaussian_noise_only_in_training_mode():
    torch.manual_seed(0)
    noise = GaussianNoise(0.2)
    x = torch.zeros(200_000)
    y = noise.train()(x)
    assert y.std().item() == pytest.approx(0.2, rel=0.02) and y.mean().abs().item() < 0.005
    assert torch.equal(noise.eval()(x), x)


def test_discriminator_noise_only_in_training_mode():
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    d = PixelDADiscriminator(3, (32, 32), filters=8, noise_std=0.2, dropout=0.0)
    d.train()
    assert not torch.equal(d(x), d(x))  # noise (dropout is off): two passes differ
    d_quiet = PixelDADiscriminator(3, (32, 32), filters=8, noise_std=0.0, dropout=0.0)
    d_quiet.load_state_dict(d.state_dict())
    d_quiet.train()
    assert torch.equal(d_quiet(x), d_quiet(x))  # ... and only the noise made them differ
    d.eval()
    out = d(x)
    assert torch.equal(out, d(x)) and out.shape == (4,)
    d_quiet.load_state_dict(d.state_dict())  # same weights and batch-norm statistics
    d_quiet.eval()
    assert torch.equal(out, d_quiet(x))  # eval mode: no noise at all
    # the image itself gets noise too (first layer), unless switched off
    assert isinstance(d.features[0], GaussianNoise) and d.features[0].std == 0.2
    assert PixelDADiscriminator(3, (32, 32), filters=8, image_noise=False).features[0].std == 0.0


def _snapshot(net):
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_d_step_leaves_g_alone_and_g_step_leaves_d_and_t_alone():
    torch.manual_seed(0)
    m = small_method(3, gamma=0.5)
    m.train()
    specs, optims, _, _ = build_optimizers(m, 10)
    seen = []

    def update(name, loss):  # the engine's update, recording every network after each call
        optims[name].zero_grad(set_to_none=True)
        loss.backward()
        optims[name].step()
        seen.append((name, {n: _snapshot(m.nets[n]) for n in ("G", "D", "T")},
                     {n: [p.grad is None for p in m.nets[n].parameters()] for n in ("G",)}))

    m._update = update
    before = {n: _snapshot(m.nets[n]) for n in ("G", "D", "T")}
    losses = m.train_step(batch(3), 0)
    assert [s[0] for s in seen] == ["D", "T", "G"]
    (_, after_d, g_grads_d), (_, after_t, g_grads_t), (_, after_g, _) = seen
    # D step: D moves, G and T do not, and no gradient even reached G (its input was detached)
    assert not _same(before["D"], after_d["D"])
    assert _same(before["G"], after_d["G"]) and _same(before["T"], after_d["T"]) and all(g_grads_d["G"])
    # T step: T moves, G and D do not, no gradient reached G
    assert not _same(before["T"], after_t["T"])
    assert _same(before["G"], after_t["G"]) and _same(after_d["D"], after_t["D"]) and all(g_grads_t["G"])
    # G step: G moves, D and T keep the weights they had after their own step
    assert not _same(before["G"], after_g["G"])
    assert _same(after_t["D"], after_g["D"]) and _same(after_t["T"], after_g["T"])
    assert set(losses) == {"d/adv", "t/cls_s", "t/cls_g", "g/adv", "g/task", "g/content"}
    assert all(torch.isfinite(v) and not v.requires_grad for v in losses.values())


def test_translate_shapes_range_and_noise():
    m = small_method(3).eval()
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    z = torch.rand(5, 10) * 2 - 1
    with torch.no_grad():
        a, b = m.translate(x, z), m.translate(x, z)
        c = m.translate(x, -z)
        r = m.translate(x)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= 1 and r.shape == x.shape
    z_drawn = m.sample_noise(1000, x)
    assert z_drawn.shape == (1000, 10) and z_drawn.min() >= -1 and z_drawn.max() <= 1
    assert z_drawn.min() < -0.9 and z_drawn.max() > 0.9  # uniform on [-1, 1], not [0, 1]
    assert m.features(x).shape == (5, 500) and m.predict(x).shape == (5, 10)


# ---- tiny runs --------------------------------------------------------------------------------

def _finite_history(r, with_content=False):
    keys = {"d/adv", "t/cls_s", "t/cls_g", "g/adv", "g/task"} | ({"g/content"} if with_content else set())
    assert r.history and all(keys <= set(h) for h in r.history)
    assert all(math.isfinite(h[k]) for h in r.history for k in keys)
    assert all({"lr/D", "lr/T", "lr/G"} <= set(h) for h in r.history)


@pytest.mark.parametrize("src,tgt,channels", [("tiny-src", "tiny-tgt", 1), ("tiny-src", "tiny-rgb", 3)])
def test_tiny_run_and_checkpoint_roundtrip(tmp_path, src, tgt, channels):
    torch.set_num_threads(1)
    r = train(opts(tmp_path, src=src, tgt=tgt, params={**SMALL, "gamma": 0.1}), interactive=False)
    assert r.step == 6 and r.interrupted_by is None
    _finite_history(r, with_content=True)
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    m1, meta = load_method(w, torch.device("cpu"))
    m2, _ = load_method(w, torch.device("cpu"))
    assert meta["method"] == "pixelda" and meta["spec"]["channels"] == channels
    x = torch.rand(3, channels, 32, 32) * 2 - 1
    assert torch.equal(m1.predict(x), m2.predict(x))
    z = torch.rand(3, 10) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m1.translate(x, z), m2.translate(x, z))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu"))
    assert report["accuracy"] == r.final_eval["accuracy"]


def test_interrupt_then_resume_equals_uninterrupted(tmp_path):
    """The noise z, D's noise and dropout come from the checkpointed RNG: resume is exact."""
    torch.set_num_threads(1)
    n = 3
    full = train(opts(tmp_path, out=tmp_path / "full", steps=2 * n, save_every=100), interactive=False)

    def interrupt(step):
        if step == n:
            signal.raise_signal(signal.SIGINT)

    part = train(opts(tmp_path, out=tmp_path / "part", steps=2 * n, save_every=100), callbacks=(interrupt,),
                 interactive=False)
    assert part.interrupted_by == signal.SIGINT and part.step == n
    resumed = train(opts(tmp_path, out=tmp_path / "part", steps=2 * n, save_every=100, resume="auto"),
                    interactive=False)
    assert resumed.step == 2 * n
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert resumed.final_eval["accuracy"] == full.final_eval["accuracy"]


# ---- example configs --------------------------------------------------------------------------

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "pixelda").glob("*.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates_and_runs(tmp_path, path):
    """Each file's [params] are real hyperparameters and it trains (small networks on tiny data
    via --set, as a user would shrink it); L_c is computed and logged exactly when its gamma is on."""
    data = tomllib.loads(path.read_text())
    assert data["method"] == "pixelda"
    cfg = PixelDA.Config(**data["params"])
    o = merge_train_options(path, dict(src="tiny-src", tgt="tiny-tgt", steps=2, batch_size=4, out=tmp_path / "run",
                                       device="cpu", eval_every=0, save_every=100, log_every=1), dict(SMALL))
    assert o.params == {**data["params"], **SMALL}
    r = train(o, interactive=False)
    assert r.step == 2 and all(math.isfinite(v) for v in r.history[-1].values())
    assert ("g/content" in r.history[-1]) == (cfg.gamma > 0)


def test_mnistm_example_is_the_default_and_usps_differs_only_by_gs_task_weight():
    load = lambda name: tomllib.loads((EXAMPLES[0].parent / f"{name}.toml").read_text())["params"]  # noqa: E731
    d = PixelDA.Config()
    assert PixelDA.Config(**load("mnist_mnistm")) == d
    usps = PixelDA.Config(**load("mnist_usps"))
    changed = {k for k in PixelDA.Config.model_fields if getattr(usps, k) != getattr(d, k)}
    assert changed == {"g_task_weight"} and usps.g_task_weight == 0.1 and usps.gamma == 0
