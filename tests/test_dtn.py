"""DTN: its losses by reference math, the two phases (f frozen after pretraining), a few CPU
steps, a checkpoint round trip and exact resume across the phase switch."""

from __future__ import annotations

import math
import signal

import pytest
import torch

from uda_cli.config import EvaluateOptions, TrainOptions
from uda_cli.data.registry import DIGIT_CLASSES
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import load_method, train
from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.methods.base import RunSpec
from uda_cli.methods.dtn import DTN, const_loss, d_loss, gang_loss, tid_loss, tv_loss
from _checks import assert_same_weights


def opts(tmp_path, **kw):
    params = {"pretrain_steps": 2, **kw.pop("params", {})}
    base = dict(method="dtn", src="tiny-src", tgt="tiny-tgt", steps=4, batch_size=4, out=tmp_path / "run",
                device="cpu", save_every=100, eval_every=0, log_every=1, params=params)
    base.update(kw)
    return TrainOptions(**base)


# ---- reference math -------------------------------------------------------------------------

Z = torch.tensor([[0.0, 1.0, 3.0],
                  [2.0, 2.0, 2.0],
                  [0.0, 0.0, 5.0]])


def test_tv_with_b1_on_a_hand_made_image():
    # (i, j) = (0, 0): dx = 1, dy = 2 -> sqrt 5;  (0, 1): dx = 2, dy = 1 -> sqrt 5
    # (1, 0): dx = 0, dy = -2 -> 2;              (1, 1): dx = 0, dy = -2 -> 2
    expected = 2 * math.sqrt(5) + 4
    assert tv_loss(Z[None, None], 1.0).item() == pytest.approx(expected, rel=1e-6)
    # B = 2: plain sum of squares 5 + 5 + 4 + 4
    assert tv_loss(Z[None, None], 2.0).item() == pytest.approx(18.0)
    # mean over images, sum over channels: a blank second image halves it, a second
    # channel equal to the first doubles it
    two = torch.stack([Z[None], torch.zeros(1, 3, 3)])
    assert tv_loss(two, 1.0).item() == pytest.approx(expected / 2, rel=1e-6)
    assert tv_loss(torch.stack([Z, Z])[None], 1.0).item() == pytest.approx(2 * expected, rel=1e-6)


def test_tv_gradient_is_finite_on_flat_images():
    z = torch.zeros(2, 1, 4, 4, requires_grad=True)
    tv_loss(z, 1.0).backward()
    assert torch.isfinite(z.grad).all()


def test_const_and_tid_are_mean_squared_errors():
    f_x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    f_gx = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert const_loss(f_x, f_gx).item() == pytest.approx((0 + 4 + 9 + 0) / 4)
    x_t = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    g_xt = torch.tensor([[[[0.0, -1.0], [-0.5, 1.0]]]])
    assert tid_loss(x_t, g_xt).item() == pytest.approx((1 + 0 + 1 + 1) / 4)


def test_three_way_adversarial_losses():
    ln2, ln3 = math.log(2.0), math.log(3.0)
    # logits [0, 0, ln 2]: softmax (1/4, 1/4, 1/2)
    row = torch.tensor([[0.0, 0.0, ln2]])
    # D wants class 1 for G(x_s) (-ln 1/4), class 2 for G(x_t) (-ln 1/4), class 3 for x_t (-ln 1/2)
    assert d_loss(row, row, row).item() == pytest.approx(math.log(4) + math.log(4) + ln2, rel=1e-6)
    # G wants class 3 for both: -ln 1/2 twice
    assert gang_loss(row, row).item() == pytest.approx(2 * ln2, rel=1e-6)
    # uniform logits: every term is ln 3; means over the batch
    u = torch.zeros(5, 3)
    assert d_loss(u, u[:2], u[:3]).item() == pytest.approx(3 * ln3, rel=1e-6)


# ---- networks and channels ------------------------------------------------------------------

def _method(channels, **cfg):
    spec = RunSpec(task="classification", classes=DIGIT_CLASSES, channels=channels, image_size=(32, 32))
    return DTN(DTN.Config(**cfg), spec)


def test_shapes_and_grey_output_channels():
    m = _method(3).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert m.nets["f"](x).shape == (2, 128)
    y = m.translate(x)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 0], y[:, 2])  # grey, repeated
    assert m.nets["D"](x).shape == (2, 3) and m.predict(x).shape == (2, 10)
    colour = _method(3, grey_output=False).eval().translate(x)
    assert colour.shape == x.shape and not torch.equal(colour[:, 0], colour[:, 1])


def test_colour_target_needs_colour_output():
    with pytest.raises(ConfigError, match="grey_output=false"):
        DTN.input_channels(DTN.Config(), 1, 3)
    assert DTN.input_channels(DTN.Config(grey_output=False), 1, 3) == 3
    assert DTN.input_channels(DTN.Config(), 3, 1) == 3  # SVHN -> MNIST: MNIST repeated to RGB


# ---- training ---------------------------------------------------------------------------------

def _check_round_trip(run_dir, result):
    w = ckpt.resolve_checkpoint(run_dir)
    m1, _ = load_method(w, torch.device("cpu"))
    m2, meta = load_method(w, torch.device("cpu"))
    assert meta["method"] == "dtn"
    x = torch.rand(5, m1.spec.channels, 32, 32) * 2 - 1
    assert torch.equal(m1.predict(x), m2.predict(x))
    assert torch.equal(m1.translate(x), m2.translate(x))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=run_dir, device="cpu"))
    assert report["accuracy"] == result.final_eval["accuracy"]


def test_phases_freeze_round_trip_and_exact_resume_across_the_switch(tmp_path):
    """Pretraining for 2 steps, then adversarial: losses of both phases are finite, f and its
    head stay fixed after the switch while g, D and C train, the checkpoint reloads exactly,
    and a run interrupted before the switch and resumed equals an uninterrupted one."""
    full = train(opts(tmp_path, out=tmp_path / "full", save_every=2), interactive=False)
    by_step = {rec["step"]: rec for rec in full.history}
    assert set(by_step) == {1, 2, 3, 4}
    assert math.isfinite(by_step[2]["f/cls"]) and "g/gan" not in by_step[2]  # step index 1: pretraining
    for s in (3, 4):
        assert "f/cls" not in by_step[s]
        for k in ("d/adv", "g/gan", "g/const", "g/tid", "g/tv", "c/cls"):
            assert math.isfinite(by_step[s][k]), (s, k)

    d = tmp_path / "full" / "checkpoints"
    at2, at4 = (ckpt.read_tensors(d / f"{ckpt.step_name(s)}.safetensors") for s in (2, 4))
    for k in at2:
        if k.startswith(("f.", "f_head.")):
            assert torch.equal(at2[k], at4[k]), k
    for prefix in ("g.", "D.", "C."):
        assert any(not torch.equal(at2[k], at4[k]) for k in at2 if k.startswith(prefix)), prefix
    _check_round_trip(tmp_path / "full", full)

    def interrupt(step):
        if step == 1:  # still pretraining f; the resumed run crosses the switch
            signal.raise_signal(signal.SIGINT)

    part = train(opts(tmp_path, out=tmp_path / "part"), callbacks=(interrupt,), interactive=False)
    assert part.interrupted_by == signal.SIGINT and part.step == 1
    resumed = train(opts(tmp_path, out=tmp_path / "part", resume="auto"), interactive=False)
    assert resumed.step == 4
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert resumed.final_eval["accuracy"] == full.final_eval["accuracy"]


def test_colour_source_grey_target_the_papers_setting(tmp_path):
    r = train(opts(tmp_path, src="tiny-rgb", steps=3, params={"pretrain_steps": 1}), interactive=False)
    assert all(math.isfinite(v) for rec in r.history for v in rec.values())
    assert r.history[-1].keys() >= {"d/adv", "g/gan", "g/const", "g/tid", "c/cls"}
    _check_round_trip(tmp_path / "run", r)
    m, meta = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    assert meta["spec"]["channels"] == 3 and m.nets["g"].net[-2].out_channels == 1


def test_grayscale_runs_a_colour_target_in_one_channel(tmp_path):
    assert DTN.input_channels(DTN.Config(grayscale=True), 1, 3) == 1  # MNIST -> MNIST-M in grey
    assert DTN.input_channels(DTN.Config(grayscale=True), 3, 1) == 1  # SVHN -> MNIST in grey
    r = train(opts(tmp_path, tgt="tiny-rgb", steps=3, params={"pretrain_steps": 1, "grayscale": True}),
              interactive=False)
    assert all(math.isfinite(v) for rec in r.history for v in rec.values())
    _check_round_trip(tmp_path / "run", r)
    m, meta = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    assert meta["spec"]["channels"] == 1 and m.nets["D"](torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_d_every_updates_d_on_every_nth_adversarial_step_only(tmp_path):
    """pretrain 2, d_every 2: D learns at steps 2 and 4 (adversarial steps 0 and 2), not at 3 and 5."""
    train(opts(tmp_path, steps=6, save_every=1, keep_checkpoints=10, params={"d_every": 2}), interactive=False)
    d = tmp_path / "run" / "checkpoints"
    at = {s: ckpt.read_tensors(d / f"{ckpt.step_name(s)}.safetensors") for s in (2, 3, 4, 5, 6)}

    def d_moved(a, b):  # D's weights (its batch-norm statistics also move in g's steps, through D's forward)
        return any(not torch.equal(at[a][k], at[b][k]) for k in at[a]
                   if k.startswith("D.") and "running_" not in k and "num_batches" not in k)

    assert d_moved(2, 3) and not d_moved(3, 4) and d_moved(4, 5) and not d_moved(5, 6)
    assert all(any(not torch.equal(at[a][k], at[a + 1][k]) for k in at[a] if k.startswith("g.")) for a in (2, 3, 4, 5))


def test_tanh_f_is_bounded_and_its_statistics_freeze_with_it(tmp_path):
    m = _method(1, f_output="tanh")
    z = m.nets["f"](torch.rand(8, 1, 32, 32) * 2 - 1)
    assert z.shape == (8, 128) and z.abs().max() <= 1
    train(opts(tmp_path, save_every=1, keep_checkpoints=10, params={"f_output": "tanh"}), interactive=False)
    d = tmp_path / "run" / "checkpoints"
    at2, at4 = (ckpt.read_tensors(d / f"{ckpt.step_name(s)}.safetensors") for s in (2, 4))
    stats = [k for k in at2 if k.startswith("f.") and "running_" in k]
    assert stats and all(torch.equal(at2[k], at4[k]) for k in stats)  # eval mode after pretraining


def _driven(**cfg):
    """A DTN past pretraining whose update() records (group, loss) instead of training."""
    torch.manual_seed(0)  # the same weights and images for every cfg
    m = _method(1, pretrain_steps=0, **cfg).train()
    calls = []
    m._update = lambda name, loss: calls.append((name, float(loss.detach())))
    batch = {"x_s": torch.rand(4, 1, 32, 32) * 2 - 1, "y_s": torch.arange(4), "x_t": torch.rand(6, 1, 32, 32) * 2 - 1}
    return m, calls, batch


def test_g_steps_updates_g_that_many_times_per_step():
    for n in (1, 3):
        m, calls, batch = _driven(g_steps=n)
        m.train_step(batch, 0)
        assert [c[0] for c in calls] == ["D", *["g"] * n, "C"]


def test_d_batches_separate_normalises_each_class_alone_and_mixed_together():
    fake, x_t = torch.rand(10, 1, 32, 32) * 2 - 1, torch.rand(6, 1, 32, 32) * 2 - 1
    for mode in ("mixed", "separate"):
        m, _, _ = _driven(d_batches=mode)
        D = m.nets["D"]
        with torch.no_grad():
            got = m._discriminate(fake, x_t, 4)
            if mode == "separate":  # D's batch statistics from each class alone
                want = D(fake[:4]), D(fake[4:]), D(x_t)
                assert m._discriminate(fake, x_t, 4, real=False)[2] is None
            else:  # one batch of all three
                both = D(torch.cat([fake, x_t]))
                want = both[:4], both[4:10], both[10:]
                assert torch.equal(m._discriminate(fake, x_t, 4, real=False)[1], want[1])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
        # The two modes really differ in train mode (batch norm): the test above can fail.
        with torch.no_grad():
            assert not torch.allclose(D(fake[:4]), D(torch.cat([fake, x_t]))[:4])


def test_pretrain_augment_moves_the_source_images_only_while_f_pretrains():
    losses = {}
    for aug in (False, True):
        m, calls, batch = _driven(pretrain_augment=aug)
        m.cfg.pretrain_steps = 1
        torch.manual_seed(1)
        m.train_step(batch, 0)  # pretraining: f's classification loss on (augmented) x_s
        losses[aug] = calls[0]
    assert losses[False][0] == losses[True][0] == "f" and losses[False][1] != losses[True][1]


def test_c_augment_moves_only_cs_copy_of_g_images():
    calls_by = {}
    for aug in (False, True):
        m, calls, batch = _driven(c_augment=aug)
        m.train_step(batch, 0)
        calls_by[aug] = calls
    (d0, g0, c0), (d1, g1, c1) = calls_by[False], calls_by[True]
    assert d0 == d1 and g0 == g1  # D and g see G's images as they are
    assert c0[0] == c1[0] == "C" and c0[1] != c1[1]


def test_until_c_first_trains_f_and_its_head_predict(tmp_path):
    """A run that ends inside f's pretraining reports f's source classifier, not an untrained
    C; from C's first update on, C predicts. The count survives a checkpoint, and a
    checkpoint without it (written before it was kept) reads C."""
    r = train(opts(tmp_path, steps=2), interactive=False)  # pretrain_steps=2: no adversarial step
    m, _ = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    assert m.c_steps == 0
    x = torch.rand(6, m.spec.channels, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(m.predict(x), m.nets["f_head"](m.nets["f"](x)))
        assert torch.equal(m.features(x), m.nets["f"](x))
        assert not torch.equal(m.predict(x), m.nets["C"](x))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu"))
    assert report["accuracy"] == r.final_eval["accuracy"]

    train(opts(tmp_path, steps=4, resume="auto"), interactive=False)  # two adversarial steps
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    m, _ = load_method(w, torch.device("cpu"))
    assert m.c_steps == 2
    with torch.no_grad():
        assert torch.equal(m.predict(x), m.nets["C"](x))
        assert torch.equal(m.features(x), m.nets["C"][0](x))

    m.load_extra_state({})
    assert m.c_steps == 1
    with pytest.raises(CheckpointError, match="dtn run"):
        m.load_extra_state({"c_steps": torch.tensor(1), "other": torch.tensor(0)})
