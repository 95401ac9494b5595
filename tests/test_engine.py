"""The training core: a real (tiny) run, checkpoints, exact resume, interruption."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import save_file

from uda_cli.config import TrainOptions
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.trainer import load_method, train
from uda_cli.errors import CheckpointError, ConfigError
from _checks import assert_same_weights


def opts(tmp_path, **kw):
    base = dict(method="source-only", src="tiny-src", tgt="tiny-tgt", steps=12, batch_size=8, out=tmp_path / "run",
                device="cpu", save_every=5, eval_every=6, log_every=3)
    base.update(kw)
    return TrainOptions(**base)


def test_run_writes_checkpoints_metrics_and_eval(tmp_path):
    r = train(opts(tmp_path), interactive=False)
    run = tmp_path / "run"
    assert r.step == 12 and r.interrupted_by is None
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000012"
    # save_every=5 -> 5, 10 and the final 12; keep_checkpoints=3 keeps all three
    names = sorted(p.name for p in (run / "checkpoints").glob("step-*.safetensors") if ".state." not in p.name)
    assert names == ["step-00000005.safetensors", "step-00000010.safetensors", "step-00000012.safetensors"]
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert train_steps == [3, 6, 9, 12]
    assert all(torch.isfinite(torch.tensor(r["c/cls"])) for r in recs if r["kind"] == "train")
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [6, 12]
    assert 0.0 <= r_final(r) <= 1.0
    meta = ckpt.read_metadata(ckpt.resolve_checkpoint(run))
    assert meta["method"] == "source-only" and meta["step"] == 12 and meta["config"]["lr"] == 2e-4
    assert meta["spec"]["channels"] == 1 and json.loads((run / "config.json").read_text())["options"]["steps"] == 12
    assert list((run / "eval").glob("*.json"))


def r_final(r):
    return r.final_eval["accuracy"]


def test_source_only_learns_the_tiny_task(tmp_path):
    r = train(opts(tmp_path, steps=150, batch_size=32, eval_every=0, save_every=1000, src="tiny-src", tgt="tiny-src",
                   params={"lr": 1e-3}), interactive=False)
    assert r.final_eval["accuracy"] > 0.9  # a model that cannot learn fails this


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    train(opts(tmp_path, steps=20, save_every=2, keep_checkpoints=2), interactive=False)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["latest", "step-00000018.safetensors", "step-00000018.state.safetensors",
                     "step-00000020.safetensors", "step-00000020.state.safetensors"]
    # 0 keeps every one (what tools/curves.py --domain reads)
    train(opts(tmp_path, out=tmp_path / "all", steps=7, save_every=2, keep_checkpoints=0), interactive=False)
    kept = sorted(p.name for p in (tmp_path / "all" / "checkpoints").glob("step-*[0-9].safetensors"))
    assert kept == [f"step-{s:08d}.safetensors" for s in (2, 4, 6, 7)]


@pytest.mark.parametrize("src", ["tiny-src", "tiny-rgb"])
def test_interrupt_then_resume_equals_uninterrupted(tmp_path, src):
    """N steps, a SIGINT, N more == 2N steps uninterrupted, bit for bit (CPU)."""
    n = 7
    full = train(opts(tmp_path, src=src, out=tmp_path / "full", steps=2 * n, save_every=100, eval_every=0),
                 interactive=False)

    def interrupt(step):
        if step == n:
            signal.raise_signal(signal.SIGINT)

    part = train(opts(tmp_path, src=src, out=tmp_path / "part", steps=2 * n, save_every=100, eval_every=0),
                 callbacks=(interrupt,), interactive=False)
    assert part.interrupted_by == signal.SIGINT and part.step == n
    assert (tmp_path / "part" / "checkpoints" / "latest").read_text().strip() == ckpt.step_name(n)
    with pytest.raises(ConfigError, match="--resume auto"):
        train(opts(tmp_path, src=src, out=tmp_path / "part", steps=2 * n), interactive=False)
    resumed = train(opts(tmp_path, src=src, out=tmp_path / "part", steps=2 * n, save_every=100, eval_every=0,
                         resume="auto"), interactive=False)
    assert resumed.step == 2 * n
    assert_same_weights(tmp_path / "full", tmp_path / "part")
    assert resumed.final_eval["accuracy"] == full.final_eval["accuracy"]
    steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == sorted(set(steps))  # no duplicated records after resume


@pytest.mark.parametrize("method,kind", [("source-only", "Adam"), ("dann", "SGD")])
def test_cpu_optimizers_are_fused_and_their_checkpoint_says_so(tmp_path, method, kind):
    from uda_cli.engine.trainer import fused_ok

    assert fused_ok([torch.zeros(2), torch.zeros(3)]) is True
    for other in ([], [torch.zeros(2, device="meta")], [torch.zeros(2), torch.zeros(2, dtype=torch.int64)]):
        assert fused_ok(other) is False  # torch's default: no fused kernel we have run
    train(opts(tmp_path, method=method, steps=2, save_every=100, eval_every=0), interactive=False)
    weights = ckpt.resolve_checkpoint(tmp_path / "run")
    state = ckpt.read_train_state(weights)
    groups = [g for opt in state["optim"].values() for g in opt["param_groups"]]
    assert groups and all(g["fused"] is True for g in groups)
    # The header alone (what digits.py reads for its optimizer_kernels column): the same settings, no moments.
    light = ckpt.read_train_state(weights, tensors=False)
    assert [g for opt in light["optim"].values() for g in opt["param_groups"]] == groups
    moments = [(v, light["optim"][n]["state"][i][k]) for n, opt in state["optim"].items()
               for i, per in opt["state"].items() for k, v in per.items()]
    assert moments and all(isinstance(v, torch.Tensor) and w is None for v, w in moments)
    assert ("betas" in groups[0]) == (kind == "Adam") and ("nesterov" in groups[0]) == (kind == "SGD")


def test_a_torch_without_the_fused_kernel_gets_the_default_one(monkeypatch):
    from uda_cli.engine import trainer
    from uda_cli.methods.base import OptimSpec

    made = []

    class OldSGD(torch.optim.SGD):  # the signature of a torch from before fused SGD
        def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, **kw):
            if "fused" in kw:
                raise TypeError("__init__() got an unexpected keyword argument 'fused'")
            made.append(self)
            super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)

    monkeypatch.setattr(torch.optim, "SGD", OldSGD)
    spec = OptimSpec(nets=("F",), kind="sgd", lr=0.1, momentum=0.9)
    opt = trainer.make_optimizer(spec, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    assert made == [opt] and not opt.param_groups[0]["fused"]
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9


def test_resume_refuses_other_options(tmp_path):
    train(opts(tmp_path, steps=4), interactive=False)
    with pytest.raises(CheckpointError, match="batch size"):
        train(opts(tmp_path, steps=8, batch_size=4, resume="auto"), interactive=False)


def test_resume_auto_on_empty_folder_starts_fresh(tmp_path):
    r = train(opts(tmp_path, steps=3, resume="auto"), interactive=False)
    assert r.step == 3


def test_truncated_and_foreign_checkpoints_fail_in_one_line(tmp_path):
    train(opts(tmp_path, steps=3), interactive=False)
    w = ckpt.resolve_checkpoint(tmp_path / "run")
    data = w.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_method(bad, torch.device("cpu"))
    assert "truncated" in str(e.value) and "\n" not in str(e.value)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match="not a uda checkpoint"):
        load_method(foreign, torch.device("cpu"))
    (tmp_path / "junk.safetensors").write_bytes(b"not at all")
    with pytest.raises(CheckpointError):
        load_method(tmp_path / "junk.safetensors", torch.device("cpu"))
    # extra state the method does not write (e.g. another method's): one line, not a ValueError
    from safetensors import safe_open

    with safe_open(str(w), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["extra.c_steps"] = torch.tensor(3)
    extra = tmp_path / "extra.safetensors"
    save_file(tensors, str(extra), metadata=meta)
    with pytest.raises(CheckpointError, match="extra state") as e:
        load_method(extra, torch.device("cpu"))
    assert "\n" not in str(e.value)


def test_checkpoint_roundtrip_restores_predictions(tmp_path):
    r = train(opts(tmp_path, steps=6), interactive=False)
    m1, _ = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    m2, meta = load_method(ckpt.resolve_checkpoint(tmp_path / "run"), torch.device("cpu"))
    x = torch.rand(5, 1, 32, 32) * 2 - 1
    assert torch.equal(m1.predict(x), m2.predict(x))
    assert meta["step"] == 6
    # the reloaded model scores exactly what the run reported at its end
    from uda_cli.config import EvaluateOptions
    from uda_cli.engine.evaluate import evaluate_checkpoint

    report, _ = evaluate_checkpoint(EvaluateOptions(target=tmp_path / "run", device="cpu"))
    assert report["accuracy"] == r.final_eval["accuracy"]


def test_no_tmp_files_left_behind(tmp_path):
    train(opts(tmp_path, steps=4, save_every=1), interactive=False)
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_nonfinite_loss_stops_with_a_clear_error(tmp_path):
    from uda_cli.errors import UDAError

    with pytest.raises(UDAError, match="not finite"):
        train(opts(tmp_path, steps=30, log_every=10, params={"lr": 1e30}), interactive=False)
    # the checkpoints written before the blow-up are still there
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_an_update_backpropagates_only_into_its_own_group(tmp_path):
    """A G step through D and T must not touch their gradients (the engine passes the group's
    parameters as autograd ``inputs``): D's weight gradients are work no optimizer uses."""
    import _methods
    from uda_cli.methods.registry import _METHODS

    checked = []

    class Probe(_methods.GANForTests):
        def update(self, name, loss):
            before = {n: [None if p.grad is None else p.grad.clone() for p in self.nets[n].parameters()]
                      for n in ("D", "T")}
            super().update(name, loss)
            if name == "G":
                for n, grads in before.items():
                    after = [p.grad for p in self.nets[n].parameters()]
                    assert all(a is not None and b is not None and torch.equal(a, b) for a, b in zip(after, grads)), n
                assert all(p.grad is not None for p in self.nets["G"].parameters())
                checked.append(name)

    Probe.name = "test-gan-probe"
    _METHODS["test-gan-probe"] = Probe
    try:
        r = train(opts(tmp_path, method="test-gan-probe", steps=3, eval_every=0), interactive=False)
    finally:
        del _METHODS["test-gan-probe"]
    assert r.step == 3 and checked == ["G"] * 3


def test_precision_picks_the_forward_dtype():
    from uda_cli.engine.runtime import autocast_for

    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    cpu = torch.device("cpu")
    for precision, dtype in (("auto", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16)):
        with autocast_for(cpu, precision)():
            assert lin(x).dtype == dtype, precision
    with autocast_for(torch.device("cuda"), "fp32")():  # fp32 turns the CUDA default off (no GPU needed to build it)
        assert lin(x).dtype == torch.float32
    with pytest.raises(ConfigError):
        autocast_for(cpu, "fp16")


def test_fp32_on_cuda_turns_tf32_off_and_the_other_precisions_allow_it():
    """TF32 rounds float32 convs to a 10-bit mantissa: an fp32 run, there to tell a rounding
    effect apart, must not get it. The flags are plain settings: no GPU needed to check them."""
    from uda_cli.engine.runtime import configure_backends

    mm, dnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = mm.allow_tf32, dnn.allow_tf32, dnn.benchmark
    try:
        for precision, tf32 in (("auto", True), ("fp32", False), ("bf16", True), ("fp32", False)):
            configure_backends(torch.device("cuda"), precision)
            assert mm.allow_tf32 is tf32 and dnn.allow_tf32 is tf32, precision
        dnn.allow_tf32 = True
        configure_backends(torch.device("cpu"), "fp32")  # the CPU has no TF32: left as it was
        assert dnn.allow_tf32 is True
    finally:
        mm.allow_tf32, dnn.allow_tf32, dnn.benchmark = saved


def test_bf16_training_on_the_cpu_runs_keeps_float32_weights_and_is_recorded(tmp_path):
    from safetensors.torch import load_file

    r32 = train(opts(tmp_path, out=tmp_path / "fp32", steps=4, eval_every=4), interactive=False)
    r16 = train(opts(tmp_path, out=tmp_path / "bf16", steps=4, eval_every=4, precision="bf16"), interactive=False)
    assert r32.step == r16.step == 4
    w32 = load_file(str(tmp_path / "fp32" / "checkpoints" / "step-00000004.safetensors"))
    w16 = load_file(str(tmp_path / "bf16" / "checkpoints" / "step-00000004.safetensors"))
    assert {t.dtype for t in w16.values() if t.is_floating_point()} == {torch.float32}  # master weights stay fp32
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)  # the bf16 forward changed the steps
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["options"]["precision"] == "bf16"
    from uda_cli.config import EvaluateOptions
    from uda_cli.engine.evaluate import evaluate_checkpoint

    def read(run, **kw):
        return evaluate_checkpoint(EvaluateOptions(target=tmp_path / run, device="cpu", **kw))[0]

    reports = {p: read("bf16", precision=p) for p in ("fp32", "bf16")}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["step"] == 4 and r["precision"] == p for p, r in reports.items())
    # Without --precision a run is read as it trained: bf16 for the bf16 run, float32 for the other.
    assert read("bf16")["precision"] == "bf16" and read("fp32")["precision"] == "fp32"
    assert read("bf16")["accuracy"] == reports["bf16"]["accuracy"]
    # Resumed without the flag, a run keeps training in its own precision; the flag overrides it.
    train(opts(tmp_path, out=tmp_path / "bf16", steps=6, eval_every=6, resume="auto"), interactive=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["options"]["precision"] == "bf16"
    assert read("bf16")["step"] == 6 and read("bf16")["precision"] == "bf16"
    train(opts(tmp_path, out=tmp_path / "bf16", steps=8, eval_every=8, resume="auto", precision="fp32"), interactive=False)
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["options"]["precision"] == "fp32"
    with pytest.raises(ValueError, match="precision"):
        opts(tmp_path, precision="half")
