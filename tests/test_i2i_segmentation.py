"""I2I on segmentation domains: the defaults and optimizer groups, which network each loss
reaches (by gradients), the WGAN-GP terms by hand, the refusals, and a few CPU steps on tiny
GTA5/Cityscapes-layout files with a checkpoint round trip through uda evaluate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_i2i import _one_thread  # noqa: F401  (autouse: one torch thread per test)
from test_lsd import street, train_translator_on_street  # noqa: F401  (street: the tiny street files fixture)
from test_segmentation_run import SIZE, cli
from uda_cli.engine import checkpoint as ckpt
from uda_cli.methods.base import RunSpec
from uda_cli.methods.i2i import I2I, SEGMENTATION_DEFAULTS, gradient_penalty

K = 11


def _spec():
    return RunSpec(task="segmentation", classes=tuple(str(i) for i in range(K)), channels=3, image_size=(32, 32),
                   domains=("mnist-scenes-mini", "mnistm-scenes-mini"))


def _small(**cfg) -> I2I:
    torch.manual_seed(0)
    base = {**I2I.task_defaults("segmentation", _spec().domains), "g_width": 8, "d_width": 8}
    return I2I(I2I.Config(**{**base, **cfg}), _spec())


def _batch(n=2, seed=1, size_t=32):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (n, 32, 32), generator=g)
    y[:, :4] = 255
    return {"x_s": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "y_s": y,
            "x_t": torch.rand(n, 3, size_t, size_t, generator=g) * 2 - 1}


def _reach(m, loss):
    """Per network: "none" (no gradient reaches it), "zero" or "nonzero"."""
    out = {}
    for name, net in m.nets.items():
        ps = [p for p in net.parameters() if p.requires_grad]
        gs = [g for g in torch.autograd.grad(loss, ps, retain_graph=True, allow_unused=True) if g is not None]
        out[name] = "none" if not gs else ("nonzero" if any(g.abs().max() > 0 for g in gs) else "zero")
    return out


# ---- defaults, networks, groups -----------------------------------------------------------------


def test_defaults_follow_the_pair():
    street = I2I.task_defaults("segmentation", ("gta5", "cityscapes"))
    weights = {k: street[k] for k in ("lambda_c", "lambda_z", "lambda_tr", "lambda_id", "lambda_cyc", "lambda_trc")}
    # the GTA5 -> Cityscapes weights of the (secondary) summary, WGAN-GP critics, DeepLab's recipe
    assert weights == {"lambda_c": 1.0, "lambda_z": 0.0, "lambda_tr": 0.04, "lambda_id": 0.2, "lambda_cyc": 0.0,
                       "lambda_trc": 0.1}
    assert (street["tr_form"], street["augment"], street["grayscale"]) == ("wgan_gp", False, False)
    assert (street["optimizer"], street["lr"], street["batch_size"]) == ("sgd", 2.5e-4, 1)
    assert "model" not in street  # auto: deeplabv2_r101
    scenes = I2I.task_defaults("segmentation", _spec().domains)
    assert scenes["model"] == "deeplabv2_small" and (scenes["lr"], scenes["batch_size"], scenes["steps"]) == (1e-3, 16, 1500)
    assert (scenes["g_width"], scenes["g_blocks"], scenes["d_width"]) == (16, 1, 32)
    assert SEGMENTATION_DEFAULTS.items() <= scenes.items()
    assert "segmentation" in I2I.tasks and I2I.translates_images


def test_networks_groups_and_translation():
    m = _small()
    assert set(m.nets) == {"F", "g", "g_x", "g_y", "Q_tr_x", "Q_tr_y"}  # no Q_z: lambda_z is 0
    opt = m.optimizers()
    assert {k: v.nets for k, v in opt.items()} == {"F": ("F",), "G": ("g", "g_x", "g_y"), "D": ("Q_tr_x", "Q_tr_y")}
    assert (opt["F"].kind, opt["F"].lr) == ("adam", 1e-3)  # the scenes recipe
    assert (opt["G"].lr, opt["G"].betas, opt["D"].lr) == (2e-4, (0.5, 0.999), 2e-4)
    assert "Q_z" in _small(lambda_z=0.1).nets and "D" not in _small(lambda_tr=0.0).optimizers()
    assert "G" not in _small(lambda_tr=0.0, lambda_id=0.0).optimizers()
    m.eval()
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    y = m.translate(x)
    assert y.shape == x.shape and y.abs().max() <= 1
    assert m.predict(x).shape[:2] == (2, K)
    # translate is g_y(f(x)); the reconstruction g_x(f(x)) is another head on the same trunk
    z = m.nets["F"].embed(x)
    t = m.nets["g"](z, x.shape[-2:])
    assert torch.equal(y, m.nets["g_y"](t)) and not torch.equal(y, m.nets["g_x"](t))


# ---- which network each loss reaches ------------------------------------------------------------


def test_each_loss_reaches_the_networks_the_paper_routes_it_to():
    m = _small(lambda_z=0.1, lambda_cyc=0.1)
    b = _batch()
    fw = m.forward(b["x_s"], b["x_t"])
    every = {"F", "g", "g_x", "g_y", "Q_tr_x", "Q_tr_y", "Q_z"}

    def reaches(loss):
        return {k for k, v in _reach(m, loss).items() if v == "nonzero"}

    assert reaches(m.loss_c(fw, b["y_s"])) == {"F"}
    # L_trc: F through a second pass over the detached translation; never the decoders
    assert reaches(m.loss_trc(fw, b["y_s"])) == {"F"}
    assert reaches(m.loss_id(fw)) == {"F", "g", "g_x", "g_y"}
    assert reaches(m.loss_cyc(fw)) == {"F", "g", "g_x", "g_y"}
    # the decoders' side of L_tr goes through the critics (whose group does not step on it)
    assert reaches(m.loss_tr(fw)) == {"F", "g", "g_x", "g_y", "Q_tr_x", "Q_tr_y"}
    assert reaches(m.loss_z(fw)) == {"F", "Q_z"}
    # the critics' and Q_z's own losses: fakes and latents detached, so nothing upstream
    assert reaches(m.loss_tr_d(fw)) == {"Q_tr_x", "Q_tr_y"}
    assert reaches(m.loss_z_d(fw)) == {"Q_z"}
    assert every == set(m.nets)


def test_a_step_steps_the_critics_first_then_f_and_the_decoders_after_one_backward():
    m = _small()
    calls = []

    def recorder(model):
        return lambda name, loss: calls.append((name, {k for k, v in _reach(model, loss).items() if v == "nonzero"}))

    m._update = recorder(m)
    out = m.train_step(_batch(), 0)
    assert [c[0] for c in calls] == ["D", ("F", "G")]
    assert calls[0][1] == {"Q_tr_x", "Q_tr_y"}
    assert {"F", "g", "g_x", "g_y"} <= calls[1][1]
    assert set(out) == {"d/tr", "c/cls", "g/id", "g/tr", "c/trc", "g/total"}
    # the total is the weighted sum of the logged terms
    want = 1.0 * out["c/cls"] + 0.2 * out["g/id"] + 0.04 * out["g/tr"] + 0.1 * out["c/trc"]
    assert torch.allclose(out["g/total"], want, rtol=1e-5)
    # warm-up: the source classifier alone, F's group only
    calls.clear()
    m2 = _small(warmup_steps=2)
    m2._update = recorder(m2)
    m2.train_step(_batch(), 0)
    assert [c[0] for c in calls] == ["F"] and calls[0][1] == {"F"}


def test_class_terms_and_wgan_terms_by_hand():
    m = _small()
    m.eval()
    b = _batch()
    fw = m.forward(b["x_s"], b["x_t"])
    Fn = m.nets["F"]

    def seg_ce(logits, y):
        up = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
        return F.cross_entropy(up, y, ignore_index=255)

    assert torch.allclose(m.loss_c(fw, b["y_s"]), seg_ce(Fn(b["x_s"]), b["y_s"]), rtol=1e-5)
    x2y = m.translate(b["x_s"])
    assert torch.allclose(m.loss_trc(fw, b["y_s"]), seg_ce(Fn(x2y), b["y_s"]), rtol=1e-5)
    qx, qy = m.nets["Q_tr_x"], m.nets["Q_tr_y"]
    y2x = m.nets["g_x"](m.nets["g"](Fn.embed(b["x_t"]), (32, 32)))
    assert torch.allclose(m.loss_tr(fw), -qy(x2y).mean() - qx(y2x).mean(), rtol=1e-5)
    no_gp = _small(gp_weight=0.0)
    no_gp.nets.load_state_dict(m.nets.state_dict())
    no_gp.eval()
    fw2 = no_gp.forward(b["x_s"], b["x_t"])
    critic = qy(x2y).mean() - qy(b["x_t"]).mean() + qx(y2x).mean() - qx(b["x_s"]).mean()
    assert torch.allclose(no_gp.loss_tr_d(fw2), critic, rtol=1e-5)
    torch.manual_seed(5)
    with_gp = m.loss_tr_d(fw)
    torch.manual_seed(5)
    gp = gradient_penalty(qy, b["x_t"], x2y) + gradient_penalty(qx, b["x_s"], y2x)
    assert torch.allclose(with_gp, critic + 10.0 * gp, rtol=1e-4)


class _Linear(nn.Module):
    """A critic whose input gradient is known: sum(w * u) per image, so |grad| = |w|."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, u):
        return (u * self.w).flatten(1).sum(1)


def test_gradient_penalty_by_hand_and_across_sizes():
    w = torch.full((1, 3, 4, 4), 0.5)  # |w| = 0.5 * sqrt(48)
    q = _Linear(w)
    real, fake = torch.rand(3, 3, 4, 4), torch.rand(3, 3, 4, 4)
    want = (0.5 * 48 ** 0.5 - 1) ** 2
    assert gradient_penalty(q, real, fake).item() == pytest.approx(want, rel=1e-5)
    # a fake of another size (GTA5 vs Cityscapes) is resized to the real's for the interpolates
    assert gradient_penalty(q, real, torch.rand(2, 3, 8, 8)).item() == pytest.approx(want, rel=1e-5)
    # the penalty trains the critic: its gradient on w points to |w| = 1
    gp = gradient_penalty(q, real, fake)
    (gw,) = torch.autograd.grad(gp, q.w)
    assert (gw > 0).all()  # |w| > 1 here, so the penalty shrinks w


def test_domains_of_different_sizes_train():
    m = _small()
    m._update = lambda name, loss: None
    out = m.train_step(_batch(size_t=48), 0)
    assert all(torch.isfinite(v) for v in out.values())


# ---- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting, words", [
    ({"augment": True}, "augment=true"), ({"grayscale": True}, "grayscale=true"),
    ({"share_encoder": False}, "share_encoder=false"), ({"backbone": "lenet"}, "backbone=lenet")])
def test_segmentation_refuses_classification_settings(setting, words):
    with pytest.raises(Exception) as e:
        _small(**setting)
    assert words in str(e.value) and "drop that --set" in str(e.value) and "\n" not in str(e.value)


# ---- through the CLI ----------------------------------------------------------------------------


def test_trains_on_street_files_and_round_trips_a_checkpoint(street, tmp_path, capsys):
    m1, meta = train_translator_on_street("i2i", street, tmp_path / "run", capsys)
    assert meta["method"] == "i2i" and set(m1.nets) == {"F", "g", "g_x", "g_y", "Q_tr_x", "Q_tr_y"}
    assert m1.cfg.tr_form == "wgan_gp" and m1.cfg.lambda_tr == 0.04


def test_init_from_a_source_only_run_starts_f(street, tmp_path, capsys):
    common = ["--src", "gta5", "--tgt", "cityscapes", "--data-root", str(street), "--set", "model=deeplabv2_small",
              "--set", "pretrained=none", *SIZE, "--crop", "64x32", "--batch-size", "1", "--device", "cpu",
              "--eval-every", "0", "--workers", "0", "--log-format", "text"]
    with pytest.warns(UserWarning):
        code, _, err = cli(["train", "--method", "source-only", *common, "--steps", "1", "--out", str(tmp_path / "so")],
                           capsys)
    assert code == 0, err
    with pytest.warns(UserWarning):
        code, _, err = cli(["train", "--method", "i2i", *common, "--set", "g_width=8", "--set", "d_width=8",
                            "--set", "g_blocks=1", "--steps", "1", "--save-every", "1", "--init", str(tmp_path / "so"),
                            "--out", str(tmp_path / "i2i")], capsys)
    assert code == 0, err
    so = ckpt.read_tensors(ckpt.resolve_checkpoint(tmp_path / "so"))
    first = ckpt.read_tensors(tmp_path / "i2i" / "checkpoints" / "step-00000001.safetensors")
    # one step of Adam moves F from the source-only weights by about lr, not from a fresh init
    key = next(k for k in so if k.startswith("F.") and k.endswith("weight") and so[k].dim() == 4)
    assert (first[key] - so[key]).abs().max() < 5e-3


def test_model_setting_is_refused_on_classification_runs(tmp_path, capsys):
    code, _, err = cli(["train", "--method", "i2i", "--src", "mnist2000", "--tgt", "usps1800", "--steps", "1",
                        "--set", "model=deeplabv2_small", "--out", str(tmp_path / "r")], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "segmentation runs" in err, err
