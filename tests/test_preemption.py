"""Preemption and unattended use: a signal mid-training leaves a complete checkpoint and a
documented exit status, the resumed run ends where an uninterrupted one does, SIGKILL
never costs a checkpoint, and logs are plain (or JSON) off a terminal. The scheduler
scripts in examples/ at least parse."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import _launch
import _methods
from uda_cli.cli.app import main
from uda_cli.config import TrainOptions
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.trainer import train
from _checks import assert_same_weights

REPO = Path(__file__).resolve().parents[1]
STEPS = 14


@pytest.fixture(scope="module")
def test_methods():
    _methods.register()
    yield
    _methods.unregister()


def argv(out, *extra):
    return ["train", "--method", "test-mlp", "--src", "tiny-src", "--tgt", "tiny-tgt", "--steps", str(STEPS),
            "--batch-size", "8", "--device", "cpu", "--set", "dropout=0.3", "--eval-every", "0", "--out", str(out),
            *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, test_methods):
    """The uninterrupted run (dropout on, so the RNG state has to survive the interruption)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    opts = TrainOptions(method="test-mlp", src="tiny-src", tgt="tiny-tgt", steps=STEPS, batch_size=8, device="cpu",
                        params={"dropout": 0.3}, eval_every=0, out=out)
    train(opts, interactive=False)
    return ckpt.read_tensors(ckpt.resolve_checkpoint(out))


def cli(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138)])
def test_signal_checkpoints_exits_with_its_status_and_resumes_exactly(tmp_path, capsys, monkeypatch, reference,
                                                                      sig, status):
    run = tmp_path / "run"
    monkeypatch.setenv("UDA_TEST_SIGNAL_AT", f"6:{int(sig)}")  # a real signal, during step 6 of 14
    code, _, err = cli(argv(run, "--log-format", "text"), capsys)
    assert code == status, err
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000007"  # the step it was in, finished
    assert ckpt.read_train_state(ckpt.resolve_checkpoint(run))["rng"]  # complete: the state file is there too
    assert f"stopped by signal {int(sig)} at step 7" in err and "--resume auto" in err
    monkeypatch.delenv("UDA_TEST_SIGNAL_AT")
    code, _, err = cli(argv(run, "--resume", "auto", "--log-format", "text"), capsys)
    assert code == 0, err
    assert_same_weights(ckpt.read_tensors(ckpt.resolve_checkpoint(run)), reference)


def test_sigkill_keeps_the_last_complete_checkpoint(tmp_path, reference, test_methods):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, str(_launch.ENTRY), "UDA_TEST_SIGNAL_AT=9:9",
                        *argv(run, "--save-every", "4", "--log-format", "text")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _launch.pythonpath()}, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    weights = ckpt.resolve_checkpoint(run)
    assert weights.name == "step-00000008.safetensors"  # steps 9 and 10 are lost, nothing else
    assert ckpt.read_tensors(weights) and ckpt.read_train_state(weights)["batches"]
    resumed = train(TrainOptions(method="test-mlp", src="tiny-src", tgt="tiny-tgt", steps=STEPS, batch_size=8,
                                 device="cpu", params={"dropout": 0.3}, eval_every=0, out=run, resume="auto"),
                    interactive=False)
    assert resumed.step == STEPS
    assert_same_weights(ckpt.read_tensors(ckpt.resolve_checkpoint(run)), reference)


def test_sigterm_on_one_rank_stops_every_rank_and_resumes_exactly(tmp_path_factory):
    """torchrun, 2 ranks, dropout on: SIGTERM reaches rank 1 only, during step 13 of 40."""
    launch = _launch.shared_launch(tmp_path_factory)
    assert launch.status("stop") == {0: 143, 1: 143}, launch.log  # the same documented status on both
    stops = [json.loads(l)["message"] for l in launch.stderr.splitlines() if '"stopped by signal 15' in l]
    assert len(stops) == 1, launch.log  # logged by rank 0 only
    step = int(stops[0].split(" at step ")[1].split(";")[0])
    assert 13 < step < 40  # the ranks agreed on a step at most one after the signal
    ckpt_dir = launch.root / "stop" / "checkpoints"
    state = ckpt.read_train_state(ckpt_dir / f"{ckpt.step_name(step)}.safetensors")
    assert len(state["rng_ranks"]) == 2 and not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    assert launch.status("resume") == {0: 0, 1: 0} and launch.status("reference") == {0: 0, 1: 0}, launch.log
    assert_same_weights(ckpt.read_tensors(ckpt.resolve_checkpoint(launch.root / "stop")),
                 ckpt.read_tensors(ckpt.resolve_checkpoint(launch.root / "reference")))
    recs = [json.loads(l) for l in (launch.root / "stop" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs if r["kind"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 40  # the interrupted run's records, then the resumed run's


def test_resume_on_another_number_of_processes_keeps_the_global_batch(tmp_path_factory, tmp_path, capsys, test_methods):
    """A checkpoint of 2 ranks x batch 4 continues on 1 process x batch 8 (same data order), not x batch 4."""
    from uda_cli.errors import CheckpointError

    launch = _launch.shared_launch(tmp_path_factory)
    first = sorted((launch.root / "stop" / "checkpoints").glob("step-*[0-9].safetensors"))[0]
    opts = dict(method="test-mlp", src="tiny-src", tgt="tiny-tgt", steps=40, device="cpu", params={"dropout": 0.3},
                eval_every=0, out=tmp_path / "one", resume=str(first))
    with pytest.raises(CheckpointError, match="global batch size 4 x 2 processes vs 4 x 1"):
        train(TrainOptions(batch_size=4, **opts), interactive=False)
    r = train(TrainOptions(batch_size=8, log_format="json", **opts), interactive=False)
    assert r.step == 40 and r.world_size == 1
    notes = [json.loads(l)["message"] for l in capsys.readouterr().err.splitlines() if '"info"' in l]
    assert any("written by 2 process(es), this run has 1: same data order" in n for n in notes)


def test_json_log_format_is_one_object_per_line(tmp_path, capsys, test_methods):
    code, out, err = cli(argv(tmp_path / "run", "--log-format", "json") + ["--steps", "4"], capsys)
    assert code == 0
    records = [json.loads(l) for l in err.splitlines()]  # every line parses
    assert {"train", "eval"} <= {r["kind"] for r in records}
    result = json.loads(out)  # the result, one object on stdout
    assert result["kind"] == "result" and result["step"] == 4 and 0 <= result["accuracy"] <= 1


def test_text_log_format_has_no_escape_codes(tmp_path, capsys, test_methods):
    code, out, err = cli(argv(tmp_path / "run", "--log-format", "text") + ["--steps", "4"], capsys)
    assert code == 0 and "\x1b" not in err + out and "step 4/4" in err and "target accuracy" in out


def test_scheduler_scripts_parse():
    scripts = sorted((REPO / "examples" / "slurm").glob("*.sbatch")) + [REPO / "examples" / "sweep.sh"]
    assert len(scripts) >= 3
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, (s, r.stderr)
        assert "--resume auto" in s.read_text()


def test_sweep_collects_results(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    # seed 1 of an earlier sweep, already collected (one uda process per run is slow to start here)
    earlier = {"kind": "result", "run_dir": str(out / "earlier"), "method": "test-mlp", "src": "tiny-src",
               "tgt": "tiny-tgt", "seed": 1, "accuracy": 0.5}
    (out / "results.jsonl").write_text(json.dumps(earlier) + "\n")
    env = {**os.environ, "PYTHONPATH": _launch.pythonpath(), "UDA": f"{sys.executable} {_launch.ENTRY}", "METHODS": "test-mlp",
           "PAIRS": "tiny-src,tiny-tgt", "SEEDS": "0", "STEPS": "3", "OUT": str(out), "EXTRA": "--device cpu --batch-size 8"}
    r = subprocess.run(["bash", str(REPO / "examples" / "sweep.sh")], capture_output=True, text=True, env=env, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [1, 0] and rows[1]["run_dir"] == str(out / "test-mlp_tiny-src_tiny-tgt_s0")
    table = (out / "results.md").read_text()
    assert "| test-mlp | tiny-src | tiny-tgt |" in table and table.rstrip().endswith("| 2 |")
    assert (out / "logs" / "test-mlp_tiny-src_tiny-tgt_s0.log").read_text()  # the run's log, apart


def test_a_signal_after_the_last_step_is_reported_not_lost(tmp_path, test_methods):
    """SIGTERM during the last step's checkpoint or the final evaluation: the run is complete
    (interrupted_by stays None, the final evaluation is there) and the signal comes back as
    late_signal, so a caller looping over runs (benchmarks/digits.py) stops instead of
    starting the next one."""
    def late(step):
        if step == 4:
            signal.raise_signal(signal.SIGTERM)

    opts = TrainOptions(method="test-mlp", src="tiny-src", tgt="tiny-tgt", steps=4, batch_size=8, device="cpu",
                        eval_every=0, out=tmp_path / "run")
    r = train(opts, callbacks=(late,), interactive=False)
    assert r.step == 4 and r.interrupted_by is None and r.final_eval is not None
    assert r.late_signal == signal.SIGTERM
    assert train(opts.model_copy(update={"resume": "auto"}), interactive=False).late_signal is None


def test_uda_train_exits_as_stopped_after_a_late_signal(tmp_path, test_methods, monkeypatch, capsys):
    """The same late signal through `uda train`: the complete run is reported (the result line
    on stdout, the signal in the log), and the exit status is 128+signal, so a shell loop over
    runs (examples/sweep.sh) stops instead of starting the next run."""
    from uda_cli.engine import trainer

    real = trainer.train

    def with_late_signal(opts, **kw):
        def late(step):
            if step == opts.steps:
                signal.raise_signal(signal.SIGTERM)
        return real(opts, callbacks=(late,), **kw)

    monkeypatch.setattr(trainer, "train", with_late_signal)
    with pytest.raises(SystemExit) as e:
        main(argv(tmp_path / "run", "--log-format", "json"))
    out, err = capsys.readouterr()
    assert e.value.code == 128 + signal.SIGTERM
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kind"] == "result" and result["step"] == STEPS and "accuracy" in result
    assert "came after the last step" in err and "Traceback" not in err
    monkeypatch.setattr(trainer, "train", real)
    with pytest.raises(SystemExit) as e:  # resumed: already complete, no signal, exit 0
        main(argv(tmp_path / "run", "--resume", "auto"))
    assert e.value.code in (0, None)
