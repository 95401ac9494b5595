"""Multi-process training on the CPU (gloo, 2 processes under torchrun): the launch
environment, the collectives, equal weights against one process with twice the batch,
GAN-style alternating updates, sharded evaluation, and rank-0-only side effects."""

from __future__ import annotations

import json

import pytest
import torch

import _launch
import _methods
from uda_cli.config import EvaluateOptions, TrainOptions
from uda_cli.data.batches import ShardedIndices
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import distributed
from uda_cli.engine.distributed import LaunchEnv, first_host, launch_env, rank_seed
from uda_cli.engine.evaluate import evaluate_checkpoint
from uda_cli.engine.trainer import train


@pytest.fixture(scope="module")
def test_methods():
    _methods.register()
    yield
    _methods.unregister()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    return _launch.shared_launch(tmp_path_factory)


def weights(run_dir):
    return ckpt.read_tensors(ckpt.resolve_checkpoint(run_dir))


def single(tmp_path, method, steps, **kw):
    """The one-process reference: same options, batch 2B."""
    base = dict(method=method, src="tiny-src", tgt="tiny-tgt", steps=steps, batch_size=2 * _launch.B, device="cpu",
                out=tmp_path / method, eval_every=0)
    base.update(kw)
    return train(TrainOptions(**base), interactive=False)


def assert_close(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# ---- the launch environment ---------------------------------------------------------------------

def test_torchrun_environment_wins_over_slurm():
    e = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                    "MASTER_ADDR": "n1", "MASTER_PORT": "29500", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})
    assert e == LaunchEnv(3, 8, 1, 4, "n1", 29500, "torchrun")


def test_slurm_environment_inside_srun():
    e = launch_env({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"})
    assert (e.rank, e.world_size, e.local_rank, e.local_world_size, e.launcher) == (5, 8, 1, 4, "slurm")
    assert e.master_addr == "gpu07" and e.master_port == 20000 + 123456 % 20000


def test_batch_shell_is_one_process():
    # sbatch sets SLURM_NTASKS and SLURM_PROCID for the script itself, which is one process
    assert not launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "1"}).distributed
    assert launch_env({}) == LaunchEnv()


@pytest.mark.parametrize("nodes, first", [
    ("node1", "node1"), ("a,b", "a"), ("gpu[03-05,9],cpu1", "gpu03"), ("rack[2-3]-n[010-012]", "rack2-n010"),
    ("x-[1,4]", "x-1"),
])
def test_first_host_of_a_slurm_host_list(nodes, first):
    assert first_host(nodes) == first


def test_rank_seeds_differ():
    assert len({rank_seed(0, r) for r in range(8)} | {rank_seed(1, r) for r in range(8)}) == 16


def test_single_process_needs_no_process_group():
    d = distributed.setup("cpu", env=LaunchEnv())
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    d.all_reduce_grads([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0)) and d.is_main
    assert d.stop_vote().poll(15) == 15  # one process acts on a signal at once
    assert d.gather_bytes(b"x") == [b"x"] and d.shard(7) == slice(0, 7)


def test_sharded_indices_split_each_global_batch():
    one = ShardedIndices(50, 8, seed=3)
    two = [ShardedIndices(50, 4, seed=3, world_size=2, rank=r) for r in range(2)]
    for _ in range(20):  # across epoch boundaries too
        assert torch.equal(one.next(), torch.cat([s.next() for s in two]))
    assert torch.equal(two[0].state_dict()["perm"], two[1].state_dict()["perm"])


def test_rng_state_travels_as_bytes():
    state = ckpt.rng_state()
    back = ckpt.unpack_state(ckpt.pack_state(state))
    assert torch.equal(back["torch"], state["torch"]) and back["python"][1] == list(state["python"][1])


# ---- under torchrun ------------------------------------------------------------------------------

def test_collectives(launch):
    assert launch.status("selftest") == {0: 0, 1: 0}, launch.log
    assert "selftest ok rank 0" in launch.stdout and "selftest ok rank 1" in launch.stdout


def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(launch, tmp_path, test_methods):
    assert launch.status("mlp") == {0: 0, 1: 0}, launch.log
    ref = single(tmp_path, "test-mlp", 30)
    assert_close(weights(launch.root / "mlp"), weights(ref.run_dir))
    recs = [json.loads(l) for l in (launch.root / "mlp" / "metrics.jsonl").read_text().splitlines()]
    ref_recs = [json.loads(l) for l in (ref.run_dir / "metrics.jsonl").read_text().splitlines()]
    loss = [r["c/cls"] for r in recs if r["kind"] == "train"]
    assert loss == pytest.approx([r["c/cls"] for r in ref_recs if r["kind"] == "train"], abs=1e-5)  # mean over ranks
    cfg = json.loads((launch.root / "mlp" / "config.json").read_text())
    assert cfg["options"]["world_size"] == 2 and cfg["options"]["global_batch_size"] == 2 * _launch.B
    assert f"global batch {2 * _launch.B} per domain per step" in launch.stderr


def test_sharded_evaluation_equals_one_process(launch, test_methods):
    run = launch.root / "mlp"
    report, _ = evaluate_checkpoint(EvaluateOptions(target=run, device="cpu", json_path=run.parent / "single.json"))
    during = json.loads(next((run / "eval").glob("*step00000030.json")).read_text())  # the run's own, on 2 ranks
    by_command = json.loads((launch.root / "mlp_eval.json").read_text())  # `uda evaluate` on 2 ranks
    assert launch.status("evaluate") == {0: 0, 1: 0}, launch.log
    for other in (during, by_command):
        for k in ("accuracy", "mean_class_accuracy", "num_samples", "confusion_matrix", "per_class_accuracy"):
            assert other[k] == report[k], k
    assert report["num_samples"] == 64
    evals = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in l]
    assert [e["step"] for e in evals] == [10, 20, 30]


def test_segmentation_run_and_its_sharded_evaluation(launch):
    """A dense run on 2 ranks (each reads its slice of the global batch through its own
    DataLoader worker) trains, and its sharded mIoU equals one process's on the same checkpoint."""
    run = launch.root / "seg"
    assert launch.status("seg") == {0: 0, 1: 0}, launch.log
    during = json.loads(next((run / "eval").glob("*step00000003.json")).read_text())
    report, _ = evaluate_checkpoint(EvaluateOptions(target=run, device="cpu", workers=0,
                                                    json_path=run.parent / "seg_single.json"))
    assert during["num_images"] == report["num_images"] == 500
    assert during["confusion_matrix"] == report["confusion_matrix"] and during["miou"] == report["miou"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["global_batch_size"] == 4


def test_alternating_updates_match_one_process(launch, tmp_path, test_methods):
    """D, T, then G through D and T: the G backward's gradients on D and T are not applied, and
    U (in G's group, used by no loss) keeps grad=None on every rank: weight decay never touches it."""
    assert launch.status("gan") == {0: 0, 1: 0}, launch.log
    ref = single(tmp_path, "test-gan", 8)
    two, one = weights(launch.root / "gan"), weights(ref.run_dir)
    assert_close(two, one)
    assert torch.equal(two["U.weight"], one["U.weight"])


@pytest.mark.parametrize("name, method", [("source_only", "source-only"), ("pixelda", "pixelda")])
def test_real_methods_train_under_torchrun(launch, name, method):
    assert launch.status(name) == {0: 0, 1: 0}, launch.log
    run = launch.root / name
    w = weights(run)
    from uda_cli.engine.trainer import load_method

    m, meta = load_method(ckpt.resolve_checkpoint(run), torch.device("cpu"))
    assert set(w) == set(ckpt.weight_tensors(m))  # the keys of a single-process checkpoint: no DDP prefix
    assert meta["step"] == 3 and meta["options"]["world_size"] == 2
    recs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == [3]  # one writer: rank 0
    assert all(torch.isfinite(torch.tensor(v)) for r in train_recs for k, v in r.items() if "/" in k)
    printed = [json.loads(l) for l in launch.stdout.splitlines() if l.startswith('{"kind": "result"')]
    results = [r for r in printed if r["run_dir"] == str(run)]
    assert len(results) == 1 and results[0]["world_size"] == 2  # rank 1 prints nothing
    if method == "pixelda":  # batch norm buffers: rank 0's, the same on every rank
        assert any(k.endswith("running_mean") for k in w)


def test_srun_tasks_train_without_torchrun(tmp_path, test_methods):
    """Two processes that know their rank from SLURM's variables only, as `srun` starts them."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=_launch.pythonpath(), OMP_NUM_THREADS="1", MASTER_PORT=str(port), SLURM_JOB_ID="77",
               SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2")
    out = tmp_path / "srun"
    cmd = [sys.executable, str(_launch.ENTRY), "train", "--method", "test-mlp", *_launch.COMMON, "--steps", "6",
           "--eval-every", "0", "--out", str(out), "--log-format", "json"]
    procs = [subprocess.Popen(cmd, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "launched by slurm" in outs[0][1] and outs[1][0] == ""  # rank 1 prints nothing
    ref = single(tmp_path, "test-mlp", 6)
    assert_close(weights(out), weights(ref.run_dir))
