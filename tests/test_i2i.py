"""I2I (Murez et al. 2018): training on tiny domains, checkpoints, the example configs, the
gradient routing the paper prescribes, and the loss terms on hand-made tensors."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
import torch
from torch import nn

from uda_cli.config import EvaluateOptions, TrainOptions, merge_train_options
from uda_cli.data.registry import DIGIT_CLASSES
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import load_method, train
from uda_cli.methods.base import RunSpec
from uda_cli.methods.i2i import I2I
from uda_cli.methods.registry import get_method

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "i2i").glob("*.toml"))
GEN_NETS = ("f", "h", "g", "g_x", "g_y")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def opts(tmp_path, **kw):
    base = dict(method="i2i", src="tiny-src", tgt="tiny-tgt", steps=3, batch_size=4, out=tmp_path / "run",
                device="cpu", save_every=100, eval_every=0, log_every=1)
    base.update(kw)
    return TrainOptions(**base)


def method(channels=1, **params) -> I2I:
    torch.manual_seed(0)
    return I2I(I2I.Config(**params), RunSpec("classification", DIGIT_CLASSES, channels, (32, 32)))


def grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def has_grad(module: nn.Module) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads(module))


def no_grad(module: nn.Module) -> bool:
    return all(g is None or not g.any() for g in grads(module))


def batch(c=1, b=4):
    torch.manual_seed(1)
    x = (torch.rand(b, c, 32, 32) * 2 - 1).requires_grad_(True)
    y = (torch.rand(b, c, 32, 32) * 2 - 1).requires_grad_(True)
    return x, y, torch.arange(b) % 10


# ---- training, checkpoints, channels ----------------------------------------------------------

def test_registered():
    assert get_method("i2i") is I2I and I2I.translates_images


def test_grey_run_is_finite_and_checkpoint_round_trips(tmp_path):
    r = train(opts(tmp_path), interactive=False)
    assert r.step == 3 and len(r.history) == 3
    keys = {"d/z", "d/tr", "c/cls", "g/z", "g/id", "g/tr", "g/cyc", "c/trc", "g/total"}
    for rec in r.history:
        assert keys <= rec.keys()
        assert all(math.isfinite(rec[k]) for k in keys)
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    m1, meta = load_method(w, torch.device("cpu"))
    m2, _ = load_method(w, torch.device("cpu"))
    assert meta["spec"]["channels"] == 1 and meta["config"]["lambda_z"] == 0.05
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    assert torch.equal(m1.predict(x), m2.predict(x))
    t = m1.translate(x)
    assert t.shape == x.shape and t.min() >= -1 and t.max() <= 1
    assert torch.equal(t, m2.translate(x))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu"))
    assert report["accuracy"] == r.final_eval["accuracy"]


def test_grayscale_decides_the_channels(tmp_path):
    assert I2I.input_channels(I2I.Config(), 1, 3) == 1  # the paper's grey SVHN; a colour target goes grey
    assert I2I.input_channels(I2I.Config(grayscale=False), 1, 3) == 3
    r = train(opts(tmp_path, tgt="tiny-rgb", steps=2, params={"grayscale": False, "backbone": "lenet"}),
              interactive=False)
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(tmp_path / "run"))
    assert meta["spec"]["channels"] == 3 and all(math.isfinite(v) for v in r.history[-1].values())


def test_all_zero_weights_are_refused():
    with pytest.raises(ValueError, match="every loss weight is 0"):
        I2I.Config(lambda_c=0, lambda_z=0, lambda_id=0, lambda_tr=0, lambda_cyc=0, lambda_trc=0)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates_and_runs(tmp_path, path):
    data = tomllib.loads(path.read_text())
    assert data["method"] == "i2i"
    cfg = I2I.Config(**data["params"])  # every [params] name is a real hyperparameter
    assert cfg.lambda_c + cfg.lambda_z + cfg.lambda_id + cfg.lambda_tr + cfg.lambda_cyc + cfg.lambda_trc > 0
    o = merge_train_options(path, dict(src="tiny-src", tgt="tiny-tgt", steps=2, batch_size=4, out=tmp_path / "run",
                                       device="cpu", eval_every=0, save_every=100, log_every=1), {})
    assert o.params == data["params"]
    r = train(o, interactive=False)
    assert r.step == 2
    rec = r.history[-1]
    assert all(math.isfinite(v) for v in rec.values())
    # a term is computed (and logged) exactly when its weight is non-zero
    for key, weight in {"c/cls": cfg.lambda_c, "g/z": cfg.lambda_z, "g/id": cfg.lambda_id, "g/tr": cfg.lambda_tr,
                        "g/cyc": cfg.lambda_cyc, "c/trc": cfg.lambda_trc}.items():
        assert (key in rec) == (weight > 0), key


def test_example_weights_match_the_paper():
    load = lambda name: tomllib.loads((EXAMPLES[0].parent / f"{name}.toml").read_text())["params"]  # noqa: E731
    d = I2I.Config()
    assert (d.lambda_c, d.lambda_z, d.lambda_id, d.lambda_tr, d.lambda_cyc, d.lambda_trc) == (1.0, 0.05, 0.1, 0.02, 0.1, 0.1)
    assert (d.lr, tuple(d.betas)) == (2e-4, (0.5, 0.999))
    o = load("office31")
    assert (o["lambda_z"], o["lambda_tr"], o["lambda_id"], o["lambda_cyc"], o["lambda_trc"]) == (0.1, 0.005, 0.2, 0.0, 0.1)
    dann = load("dann_like")
    assert [k for k in dann if k.startswith("lambda_") and dann[k]] == ["lambda_c", "lambda_z"]


# ---- optimizer groups and the step ----------------------------------------------------------

def test_groups_follow_the_weights():
    full = method().optimizers()
    assert set(full["G"].nets) == set(GEN_NETS) and set(full["D"].nets) == {"Q_z", "Q_tr_x", "Q_tr_y"}
    dann = method(lambda_id=0, lambda_tr=0, lambda_cyc=0, lambda_trc=0).optimizers()
    assert set(dann["G"].nets) == {"f", "h"} and dann["D"].nets == ("Q_z",)
    assert set(method(lambda_z=0, lambda_tr=0).optimizers()) == {"G"}  # no adversary: no D group
    assert set(method(share_encoder=False).optimizers()["G"].nets) == {"f_x", "f_y", "h", "g", "g_x", "g_y"}


def record_updates(m) -> list[str]:
    """Replace m's optimizer step with a backward pass that records which group it was for."""
    calls = []

    def update(name, loss):
        calls.append(name)
        loss.backward()

    m._update = update
    return calls


def test_step_updates_discriminators_first_and_weights_the_terms():
    m = method(augment=False)
    calls = record_updates(m)
    x, y, labels = batch()
    out = m.train_step({"x_s": x.detach(), "x_t": y.detach(), "y_s": labels}, 0)
    assert calls == ["D", "G"]
    c = m.cfg
    weighted = (c.lambda_c * out["c/cls"] + c.lambda_z * out["g/z"] + c.lambda_id * out["g/id"]
                + c.lambda_tr * out["g/tr"] + c.lambda_cyc * out["g/cyc"] + c.lambda_trc * out["c/trc"])
    assert torch.allclose(out["g/total"], weighted)
    assert not any(v.requires_grad for v in out.values())


@pytest.mark.parametrize("shared", [1, 2])
def test_decoders_share_as_many_layers_as_asked(shared):
    m = method(decoder_shared_layers=shared)
    convs = lambda n: sum(isinstance(l, (nn.Linear, nn.ConvTranspose2d)) for l in m.nets[n].modules())  # noqa: E731
    assert convs("g") == shared and convs("g_x") == convs("g_y") == 3 - shared
    z = torch.randn(4, m.nets["f"].out_features)
    x, y = m.g_x(z), m.g_y(z)
    assert x.shape == y.shape == (4, 1, 32, 32) and x.abs().max() <= 1 and not torch.equal(x, y)


def test_decoder_parts_refuse_a_layer_count_they_do_not_build():
    from uda_cli.models.generators import DecoderHead, DecoderTrunk

    with pytest.raises(ValueError, match="shared_layers must be 1 or 2, not 3"):
        DecoderTrunk(16, shared_layers=3)
    with pytest.raises(ValueError, match="own_layers must be 1 or 2, not 0"):
        DecoderHead(1, own_layers=0)


def test_warmup_trains_the_source_classifier_alone_then_the_whole_objective():
    m = method(augment=False, warmup_steps=2)
    calls = record_updates(m)
    x, y, labels = batch()
    b = {"x_s": x.detach(), "x_t": y.detach(), "y_s": labels}
    out = m.train_step(b, 1)
    assert calls == ["G"] and set(out) == {"c/cls", "g/total"}
    assert has_grad(m.nets["f"]) and has_grad(m.nets["h"])
    assert all(no_grad(m.nets[n]) for n in ("g", "g_x", "g_y", "Q_z", "Q_tr_x", "Q_tr_y"))
    calls.clear()
    out = m.train_step(b, 2)
    assert calls == ["D", "G"] and {"g/z", "g/tr", "c/trc"} <= set(out)


# ---- gradient routing (the paper's implementation details) ----------------------------------------------------

def test_lz_reaches_only_the_target_encoder_path():
    m = method()
    x, y, _ = batch()
    m.loss_z(m.forward(x, y)).backward()
    assert x.grad is None  # no L_z gradient along the source path f_x(x) ...
    assert y.grad is not None and y.grad.abs().sum() > 0  # ... only along f_y(y)
    assert has_grad(m.nets["f"])

    m = method(share_encoder=False)
    x, y, _ = batch()
    m.loss_z(m.forward(x, y)).backward()
    assert no_grad(m.nets["f_x"]) and has_grad(m.nets["f_y"])


def test_qz_loss_trains_only_qz():
    m = method()
    x, y, _ = batch()
    m.loss_z_d(m.forward(x, y)).backward()
    assert x.grad is None and y.grad is None and no_grad(m.nets["f"]) and has_grad(m.nets["Q_z"])


def test_ltrc_reaches_f_y_and_h_but_not_the_decoder():
    m = method(share_encoder=False)
    x, y, labels = batch()
    m.loss_trc(m.forward(x, y), labels).backward()
    assert has_grad(m.nets["f_y"]) and has_grad(m.nets["h"])
    for name in ("g", "g_y", "g_x", "f_x"):  # g_y is trunk g + head g_y; f_x lies upstream of it
        assert no_grad(m.nets[name]), name
    assert x.grad is None

    # the same harness does see the decoder's gradient from a loss that should reach it
    m = method(share_encoder=False)
    x, y, labels = batch()
    m.loss_cyc(m.forward(x, y)).backward()
    assert has_grad(m.nets["g"]) and has_grad(m.nets["g_y"]) and has_grad(m.nets["f_x"])


def test_ltrc_reaches_the_decoder_and_f_x_only_with_trc_to_decoder():
    m = method(share_encoder=False, trc_to_decoder=True)
    x, y, labels = batch()
    m.loss_trc(m.forward(x, y), labels).backward()
    assert all(has_grad(m.nets[n]) for n in ("f_y", "h", "g", "g_y", "f_x"))
    assert no_grad(m.nets["g_x"])  # not on the path x -> f_x -> g -> g_y -> f_y -> h


def test_ltrc_with_shared_encoder_trains_it_only_through_the_translation():
    m = method()
    x, y, labels = batch()
    m.loss_trc(m.forward(x, y), labels).backward()
    assert has_grad(m.nets["f"]) and has_grad(m.nets["h"])
    assert no_grad(m.nets["g"]) and no_grad(m.nets["g_y"]) and x.grad is None


def test_translation_discriminator_loss_trains_only_the_discriminators():
    m = method()
    x, y, _ = batch()
    m.loss_tr_d(m.forward(x, y)).backward()
    assert all(no_grad(m.nets[n]) for n in GEN_NETS)
    assert has_grad(m.nets["Q_tr_x"]) and has_grad(m.nets["Q_tr_y"])


# ---- the loss terms on hand-made tensors --------------------------------------------------------

class Sum(nn.Module):
    """A fixed 'discriminator': the logit is the sum of the input's entries per sample."""

    def forward(self, v):
        return v.flatten(1).sum(1)


def nlsig(a):  # -log sigmoid(a)
    return math.log(1 + math.exp(-a))


def test_adversarial_terms_by_hand():
    m = method()
    m.nets["Q_z"], m.nets["Q_tr_x"], m.nets["Q_tr_y"] = Sum(), Sum(), Sum()
    fw = m.forward(torch.zeros(2, 1, 1, 1), torch.zeros(1, 1, 1, 1))
    fw.z_x = torch.tensor([[1.0, 0.0], [0.5, 1.5]])  # logits 1, 2
    fw.z_y = torch.tensor([[-1.0, 0.0]])  # logit -1
    # Q_z: source is "real" (1), target "fake" (0); the encoders push only the target to "real"
    expect_d = (nlsig(1) + nlsig(2)) / 2 + (-math.log(1 - 1 / (1 + math.exp(1))))
    assert m.loss_z_d(fw).item() == pytest.approx(expect_d, rel=1e-6)
    assert m.loss_z(fw).item() == pytest.approx(nlsig(-1), rel=1e-6)

    fw.x = torch.full((2, 1, 1, 1), 0.5)  # Q_tr_x(x) logits 0.5
    fw.y = torch.full((1, 1, 1, 1), -0.25)  # Q_tr_y(y) logit -0.25
    fw.x2y = torch.tensor([0.3, -0.7]).view(2, 1, 1, 1)  # Q_tr_y(fake) logits 0.3, -0.7
    fw.y2x = torch.full((1, 1, 1, 1), 2.0)  # Q_tr_x(fake) logit 2
    nl1msig = lambda a: -math.log(1 - 1 / (1 + math.exp(-a)))  # noqa: E731  -log(1 - sigmoid(a))
    expect_tr_d = nlsig(-0.25) + (nl1msig(0.3) + nl1msig(-0.7)) / 2 + nlsig(0.5) + nl1msig(2.0)
    assert m.loss_tr_d(fw).item() == pytest.approx(expect_tr_d, rel=1e-6)
    expect_tr = (nlsig(0.3) + nlsig(-0.7)) / 2 + nlsig(2.0)
    assert m.loss_tr(fw).item() == pytest.approx(expect_tr, rel=1e-6)
    # The paper's form: the decoders minimise E log(1 - Q(fake)).
    m.cfg = m.cfg.model_copy(update={"tr_form": "minimax"})
    expect_minimax = -(nl1msig(0.3) + nl1msig(-0.7)) / 2 - nl1msig(2.0)
    assert m.loss_tr(fw).item() == pytest.approx(expect_minimax, rel=1e-6)


def test_reconstruction_and_cycle_are_l1_by_hand():
    m = method()
    fw = m.forward(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    fw.x_rec = torch.tensor([1.0, -1.0, 0.5, 0.0]).view(1, 1, 2, 2)  # |.| mean 0.625
    fw.y_rec = torch.tensor([1.0, 1.0, 3.0, 0.0]).view(1, 1, 2, 2)  # |. - 1| mean 0.75
    assert m.loss_id(fw).item() == pytest.approx(0.625 + 0.75)
    fw.x_cyc = torch.full((1, 1, 2, 2), -0.2)  # 0.2
    fw.y_cyc = torch.tensor([1.0, 1.0, 1.0, 2.0]).view(1, 1, 2, 2)  # 0.25
    assert m.loss_cyc(fw).item() == pytest.approx(0.2 + 0.25)


def test_classification_terms_by_hand():
    m = method()
    m.nets["f"], m.nets["h"] = nn.Flatten(), nn.Identity()  # z = the image's 3 pixels = the logits
    fw = m.forward(torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1), torch.zeros(1, 3, 1, 1))
    fw.x2y = torch.tensor([2.0, 0.0, 0.0]).view(1, 3, 1, 1)
    label = torch.tensor([0])
    # L_c reads the source image's logits (0, 1, 0); L_trc the translated image's (2, 0, 0)
    assert m.loss_c(fw, label).item() == pytest.approx(-math.log(1 / (2 + math.e)), rel=1e-6)
    assert m.loss_trc(fw, label).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 2)), rel=1e-6)
