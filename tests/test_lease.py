"""tools/lease.py: one GPU lease's jobs in one call, stopped at a deadline, brought back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import _launch
from test_benchmark import REPO, load_tool


def lease_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "tools" / "lease.py"), *args]


def test_lease_runs_the_jobs_until_the_deadline_and_brings_back_the_cut_run(tmp_path, shared_data):
    """A job that ends lands in table.md; one still training at the deadline gets SIGTERM,
    keeps the checkpoint of the step it reached, and comes back in runs.tar.gz with its
    logged curve (curves.md) and its weights, without the optimizer state."""
    data = tmp_path / "carry"
    r = subprocess.run(lease_cmd("pack", "--shared", str(shared_data), "--dest", str(data), "--no-wheels"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert all((data / n).is_dir() and not (data / n).is_symlink() for n in ("mnist", "usps", "svhn"))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("quick --methods source-only --pairs mnist-usps --seeds 0\n"
                    "long --methods source-only --pairs mnist-usps --seeds 1 --steps 1000000 --eval-every 2\n")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": _launch.pythonpath(), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(lease_cmd("run", str(jobs), "--parallel", "2", "--seconds", "60", "--grace", "30",
                                 "--out", str(out), "--work", str(tmp_path / "work"), "--data", str(data),
                                 "--weights", "source-only", "--", "--budget", "smoke", "--device", "cpu",
                                 "--batch-size", "8"),
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (out / "lease.log").read_text()
    assert "cut at the deadline" in log and "end quick rc 0" in log
    cut = [l for l in log.splitlines() if l.startswith("cut or failed:")]
    assert len(cut) == 1 and cut[0].startswith("cut or failed: long.d/") and "(checkpoint at step-" in cut[0]
    table = [l for l in (out / "table.md").read_text().splitlines() if "MNIST→USPS" in l]
    assert len(table) == 1 and "| smoke | 3 | 8 |" in table[0]  # only the job that ended has a row
    assert "usps1800:test" in (out / "curves.md").read_text()
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = tar.getnames()
        runs = sorted({n.split("/")[1] for n in names if n.count("/") >= 2})
        assert len(runs) == 2 and {"quick.log", "long.log", "quick.json", "queue.log"} <= set(names)
        assert not any(n.endswith(".state.safetensors") for n in names)
        long_run = next(n for n in names if n.startswith("long.d/") and n.endswith("/checkpoints/latest"))
        step = tar.extractfile(long_run).read().decode().strip()
        assert long_run.replace("latest", f"{step}.safetensors") in names  # the step SIGTERM reached, weights included
        metrics = tar.extractfile(long_run.replace("checkpoints/latest", "metrics.jsonl")).read().decode()
        evals = [json.loads(l) for l in metrics.splitlines() if '"eval"' in l]
        assert len(evals) >= 1 and int(step.split("-")[1]) >= evals[-1]["step"]


def test_lease_archive_leaves_the_largest_weights_behind_and_splits_into_parts(tmp_path, monkeypatch):
    lease = load_tool("lease")
    q = tmp_path / "q"
    for job, method, size in (("a", "pixelda", 6000), ("b", "pixelda", 20000), ("c", "dann", 5000)):
        run = q / f"{job}.d" / f"{method}_run"
        (run / "checkpoints").mkdir(parents=True)
        (run / "config.json").write_text(json.dumps({"method": method}))
        (run / "metrics.jsonl").write_text("")
        for s in (1, 2):  # only the newest step's weights travel, never the optimizer state
            (run / "checkpoints" / f"step-0000000{s}.safetensors").write_bytes(os.urandom(size))
            (run / "checkpoints" / f"step-0000000{s}.state.safetensors").write_bytes(os.urandom(size))
        (q / f"{job}.log").write_text("log")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(lease, "PART_BYTES", 4000)
    log: list[str] = []
    parts = lease.archive(q, out, {"pixelda"}, max_bytes=16000, log=log)
    assert [p.name for p in parts] == ["runs.tar.gz.part00", "runs.tar.gz.part01"]  # 6,000 random bytes + the rest
    dropped = [l for l in log if l.startswith("weights left behind")]
    assert dropped == ["weights left behind (archive past 0.0153 MiB): b.d/pixelda_run/checkpoints/step-00000002.safetensors"]
    joined = tmp_path / "runs.tar.gz"
    joined.write_bytes(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(joined) as tar:
        weights = [n for n in tar.getnames() if n.endswith(".safetensors")]
    assert weights == ["a.d/pixelda_run/checkpoints/step-00000002.safetensors"]  # dann's are not asked for


def test_lease_refuses_in_one_line(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a --methods source-only --pairs mnist-usps\n")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    cases = ((["run", str(jobs), "--seconds", "5"], "no $OUT and no --out"),
             (["run", str(tmp_path / "nope.txt"), "--seconds", "5", "--out", str(tmp_path)], "no jobs file"),
             (["run", str(jobs), "--seconds", "5", "--out", str(tmp_path), "--data", str(tmp_path / "none")],
              "lacks the datasets; run `python tools/lease.py pack`"),
             (["pack", "--shared", str(tmp_path / "none"), "--dest", str(tmp_path / "d"), "--no-wheels"],
              "has no mnist, usps, svhn"))
    for args, msg in cases:
        r = subprocess.run(lease_cmd(*args), capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
