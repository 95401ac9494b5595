"""cbst and crst on classification (digit) domains: one confidence per image. The per-image
selection against a hand-made probability table, the round files of a run on the tiny digit
domains, crst's mrkld and lrent on a round (their loss checked by hand on one batch), a run
SIGKILLed inside a round resumes to the straight run's weights, a pass resumes from its
probs.npy, and the target's own labels never reach the method."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_segmentation_run import KILL_AT_STEP_5 as SEG_KILL_AT_STEP_5
from uda_cli.cli.app import main
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import rounds as R
from uda_cli.methods import self_training as st
from uda_cli.methods.cbst import CBST, read_image_round
from uda_cli.methods.crst import CRST

TESTS = Path(__file__).resolve().parent
ROUNDS = ["--set", "warmup_steps=3", "--set", "rounds=2", "--set", "round_steps=3"]  # rounds at steps 3 and 6
CLASSES = tuple(str(k) for k in range(10))


def argv(run: Path, *extra: str, method: str = "cbst", tgt: str = "tiny-tgt") -> list[str]:
    return ["train", "--method", method, "--src", "tiny-src", "--tgt", tgt, "--batch-size", "8", "--device", "cpu",
            "--eval-every", "0", "--out", str(run), *extra]


def cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def weights(run: Path) -> dict:
    return ckpt.read_tensors(ckpt.resolve_checkpoint(run))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bare(cls, **cfg):
    """A method object without networks: its config and a spec of 10 classes."""
    m = cls.__new__(cls)
    m.cfg, m.spec = cls.Config(**cfg), type("S", (), {"num_classes": 10, "classes": CLASSES, "task": "x"})()
    return m


# ---- the per-image selection against the reference ---------------------------------------------

def test_image_selection_matches_an_exact_sort_and_the_rule():
    """Thresholds from the histograms equal CRST's exact sort (values on the bin grid), and a
    label is argmax p/lambda where it reaches 1; lrent keeps what CRST's rule keeps."""
    rng = np.random.default_rng(3)
    n, k, portion = 40, 10, 0.3
    raw = rng.gamma(0.4, size=(n, k)) + 1e-3
    raw[np.arange(n), rng.integers(0, 4, n)] += 3.0  # confident in classes 0-3, the rest rarely predicted
    p = np.round(raw / raw.sum(1, keepdims=True) * 1024) / 1024  # on the 2**14-bin grid: exact thresholds
    prob = torch.from_numpy(p).float()
    pmax, pred = prob.max(1)
    lam = st.thresholds(st.class_histograms(pmax, pred, k), portion)
    exact = np.ones(k)
    for c in range(k):
        conf = sorted(p[:, c][p.argmax(1) == c].tolist(), reverse=True)
        m = math.floor(len(conf) * portion)
        if m:
            exact[c] = conf[m - 1]
    assert lam.double().numpy() == pytest.approx(exact, abs=0)
    assert (exact == 1.0).any() and (exact < 1.0).sum() >= 3

    want = []
    for row in p:
        w = row / exact
        want.append(int(w.argmax()) if w.max() >= 1 else 255)
    got = bare(CBST).select_images(prob, lam)
    assert got.tolist() == want and 0 < sum(y != 255 for y in want) < n

    # lrent: q = normalise((p/lambda)^4), kept where sum -q log p + a q log q < sum -q log lambda
    alpha = 0.25
    keep_want = []
    for row in p.astype(np.float64):
        w = (np.maximum(row, 1e-12) / exact) ** (1 / alpha)
        q = w / w.sum()
        reg = (-q * np.log(np.maximum(row, 1e-12) + 1e-32) + alpha * q * np.log(q + 1e-32)).sum()
        sel = (-q * np.log(exact + 1e-32)).sum()
        keep_want.append(int(q.argmax()) if reg < sel else 255)
    got = bare(CRST, regularizer="lrent").select_images(prob, lam)
    assert got.tolist() == keep_want and any(y != 255 for y in keep_want)


# ---- a cbst run on the tiny digits ---------------------------------------------------------------

@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run, a checkpoint at every step (the tests below cut copies of it)."""
    run = tmp_path_factory.mktemp("stc") / "straight"
    with pytest.raises(SystemExit) as e:
        main(argv(run, *ROUNDS, "--log-format", "text", "--save-every", "1", "--keep-checkpoints", "0"))
    assert e.value.code == 0
    return run


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_rounds_write_their_files(straight):
    config = json.loads((straight / "config.json").read_text())
    assert config["options"]["steps"] == 3 + 2 * 3 and config["config"]["steps"] == 9
    c = config["config"]
    # source-only's digit recipe for the warm-up; no flip in the pass
    assert (c["optimizer"], c["lr"], c["betas"], c["weight_decay"]) == ("adam", 2e-4, [0.5, 0.999], 2.5e-5)
    assert c["pass_flip"] is False and c["backbone"] == "auto" and config["spec"]["task"] == "classification"
    for r, portion in ((0, 0.2), (1, 0.25)):
        folder = straight / "rounds" / f"{r:02d}"
        assert (folder / "complete").exists() and not (folder / "labels").exists()
        probs = np.load(folder / "probs.npy")
        assert probs.shape == (64, 10) and probs.dtype == np.float16
        assert np.allclose(probs.astype(np.float32).sum(1), 1, atol=1e-2)
        th = json.loads((folder / "thresholds.json").read_text())
        assert th["round"] == r and th["portion"] == pytest.approx(portion) and list(th["lambda"]) == list(CLASSES)
        rows = read_csv(folder / "labels.csv")
        assert list(rows[0]) == ["index", "label", "confidence"] and [int(x["index"]) for x in rows] == list(range(64))
        labels = [int(x["label"]) if x["label"] else 255 for x in rows]
        assert set(labels) <= set(range(10)) | {255} and 0 < labels.count(255) < 64
        assert [np.float16(x["confidence"]) for x in rows] == probs.max(1).tolist()
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["images"] == 64 and stats["labelled"] == pytest.approx(sum(y != 255 for y in labels) / 64)
        assert stats["labelled_per_class"] == pytest.approx([labels.count(k) / 64 for k in range(10)])


def test_pseudo_labels_are_the_selection_on_the_stored_probs(straight):
    """Each round's labels and lambdas are what the selection computes from its probs.npy alone."""
    for r in (0, 1):
        files = R.RoundFiles(straight, r)
        labels, probs = read_image_round(files, 64, 10)
        p = probs.float()
        pmax, pred = p.max(1)
        lam = st.thresholds(st.class_histograms(pmax, pred, 10), st.portion(r))
        assert json.loads(files.thresholds.read_text())["lambda"] == dict(zip(CLASSES, lam.tolist()))
        assert torch.equal(labels, bare(CBST).select_images(p, lam))


@pytest.fixture
def relabelled():
    """tiny-tgt's images with other labels (class k read as k + 3)."""
    import conftest
    from uda_cli.data.registry import _DOMAINS, register_domain

    base = conftest._tiny(64, 1, 10, 1)  # tiny-tgt's reader

    def reader(folder, split):
        x, y = base(folder, split)
        return x, (y + 3) % 10

    register_domain(dataclasses.replace(_DOMAINS["tiny-tgt"], name="tiny-tgt-relabelled", reader=reader))
    yield "tiny-tgt-relabelled"
    _DOMAINS.pop("tiny-tgt-relabelled")


def test_the_target_labels_never_reach_the_method(straight, relabelled, tmp_path, capsys):
    """The same images under other labels train to the very same weights and round files."""
    run = tmp_path / "relabelled"
    code, out, err = cli(argv(run, *ROUNDS, tgt=relabelled), capsys)
    assert code == 0, err
    assert same(weights(run), weights(straight))
    for r in ("00", "01"):
        assert (run / "rounds" / r / "labels.csv").read_bytes() == (straight / "rounds" / r / "labels.csv").read_bytes()


# `uda train` on the tiny domains that SIGKILLs itself right after step 5 (its checkpoint is step 4's).
KILL_AT_STEP_5 = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
import conftest  # registers tiny-src and tiny-tgt
""" + SEG_KILL_AT_STEP_5


def test_killed_inside_a_round_resumes_to_the_straight_run(straight, tmp_path, capsys):
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH"))
                                                        if p)}
    r = subprocess.run([sys.executable, "-c", KILL_AT_STEP_5, *argv(run, *ROUNDS, "--save-every", "2")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert ckpt.resolve_checkpoint(run).name == "step-00000004.safetensors"  # inside round 0 (steps 3-5)
    probs = run / "rounds" / "00" / "probs.npy"
    before = probs.stat().st_mtime_ns
    code, out, err = cli(argv(run, *ROUNDS, "--save-every", "2", "--resume", "auto", "--log-format", "text"), capsys)
    assert code == 0, err
    assert "round 0: pseudo-label pass" not in err and "round 1: pseudo-label pass" in err  # round 0 reloaded
    assert probs.stat().st_mtime_ns == before
    assert same(weights(run), weights(straight))
    assert (run / "rounds" / "01" / "complete").exists()


def cut_at(straight: Path, run: Path, step: int) -> None:
    shutil.copytree(straight, run)
    for p in (run / "checkpoints").glob("step-*"):
        if int(p.name.split(".")[0].removeprefix("step-")) > step:
            p.unlink()
    (run / "checkpoints" / "latest").write_text(f"{ckpt.step_name(step)}\n")


def test_a_pass_resumes_from_its_probs(straight, tmp_path, capsys):
    """Round 1 cut before its selection (only probs.npy written): a resume from the checkpoint
    at the round's first step reuses the probabilities and trains to the same weights."""
    run = tmp_path / "cut"
    cut_at(straight, run, 6)
    r1 = run / "rounds" / "01"
    for name in ("complete", "labels.csv", "stats.json", "thresholds.json"):
        (r1 / name).unlink()
    inode = (r1 / "probs.npy").stat().st_ino
    code, out, err = cli(argv(run, *ROUNDS, "--resume", "auto"), capsys)
    assert code == 0, err
    assert (r1 / "probs.npy").stat().st_ino == inode and (r1 / "complete").exists()
    assert (r1 / "labels.csv").read_bytes() == (straight / "rounds" / "01" / "labels.csv").read_bytes()
    assert same(weights(run), weights(straight))


def test_refusals_are_one_line(straight, tmp_path, capsys):
    # an incomplete round folder with the checkpoint inside that round
    run = tmp_path / "incomplete"
    cut_at(straight, run, 7)
    (run / "rounds" / "01" / "complete").unlink()
    code, _, err = cli(argv(run, *ROUNDS, "--resume", "auto"), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "is incomplete but the checkpoint is inside round 1" in errors[0], err
    assert "Traceback" not in err
    # a complete round whose labels.csv is gone
    run = tmp_path / "edited"
    cut_at(straight, run, 7)
    (run / "rounds" / "01" / "labels.csv").unlink()
    code, _, err = cli(argv(run, *ROUNDS, "--resume", "auto"), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and "labels.csv is missing" in errors[0] and "Traceback" not in err, err
    # segmentation-only settings; tpld stays a segmentation method
    for extra, msg in ((("--set", "model=deeplabv2_small"), "--set model applies to segmentation runs"),
                       (("--set", "pass_scale=0.9"), "--set pass_scale applies to segmentation runs")):
        code, _, err = cli(argv(tmp_path / "x", *extra), capsys)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli(argv(tmp_path / "t", method="tpld"), capsys)
    assert code == 2 and "'tpld' handles segmentation domains" in err and len(err.strip().splitlines()) == 1, err


# ---- crst ----------------------------------------------------------------------------------------

def one_batch(method, k=10, n=6, d=12):
    """A source and target batch through F = flatten, C = linear; returns the batch and the loss
    the method hands to update()."""
    torch.manual_seed(0)
    method.nets = nn.ModuleDict({"F": nn.Flatten(), "C": nn.Linear(d, k)})
    got = []
    method._update = lambda name, loss: got.append(loss)
    batch = {"x_s": torch.randn(n, 1, 3, 4), "y_s": torch.randint(0, k, (n,)), "x_t": torch.randn(n, 1, 3, 4),
             "idx_t": torch.tensor([4, 0, 2, 2, 5, 1])}
    logged = method._image_step(batch)
    return batch, got[0], logged


@pytest.mark.parametrize("regularizer", ["mrkld", "lrent"])
def test_crst_runs_a_round_and_its_loss_is_the_formula(regularizer, tmp_path, capsys):
    run = tmp_path / regularizer
    code, out, err = cli(argv(run, "--set", "warmup_steps=2", "--set", "rounds=1", "--set", "round_steps=2",
                              "--set", f"regularizer={regularizer}", method="crst"), capsys)
    assert code == 0 and (run / "rounds" / "00" / "complete").exists(), err
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["reg_weight"] == {"mrkld": 0.1, "lrent": 0.25}[regularizer]
    labels, probs = read_image_round(R.RoundFiles(run, 0), 64, 10)
    lam = torch.tensor(list(json.loads((run / "rounds" / "00" / "thresholds.json").read_text())["lambda"].values()))
    assert torch.equal(labels, bare(CRST, regularizer=regularizer).select_images(probs.float(), lam))

    # the step's loss by hand: CE(source) + mean CE over the labelled target images + the regulariser
    m = bare(CRST, regularizer=regularizer)
    m.lam = torch.tensor([0.9] * 5 + [0.3] * 5)
    m.image_labels = torch.tensor([3, 255, 7, 255, 1, 9])
    g = torch.Generator().manual_seed(1)
    m.image_probs = torch.randn(6, 10, generator=g).mul(2).softmax(1) if regularizer == "lrent" else None
    batch, loss, _ = one_batch(m)
    c = m.nets["C"]
    logit_s, logit_t = c(batch["x_s"].flatten(1)), c(batch["x_t"].flatten(1))
    y = m.image_labels[batch["idx_t"]]
    keep = y != 255
    if regularizer == "mrkld":
        target = F.cross_entropy(logit_t[keep], y[keep]) - 0.1 * F.log_softmax(logit_t[keep], 1).mean(1).mean()
    else:
        w = (m.image_probs[batch["idx_t"]] / m.lam) ** 4
        q = w / w.sum(1, keepdim=True)
        target = (-(q * F.log_softmax(logit_t, 1)).sum(1))[keep].mean()
    want = F.cross_entropy(logit_s, batch["y_s"]) + target
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)

    # a batch without a labelled image: the target term is 0, still on the graph
    m.image_labels = torch.full((6,), 255)
    batch, loss, logged = one_batch(m)
    assert float(logged["c/pseudo"]) == 0.0
    source = F.cross_entropy(m.nets["C"](batch["x_s"].flatten(1)), batch["y_s"])
    assert float(loss.detach()) == pytest.approx(float(source.detach()))
    logits = torch.randn(6, 10, 1, 1, requires_grad=True)
    target = {"y_t": torch.full((6, 1, 1), 255), "topk_t": torch.arange(10).view(1, 10, 1, 1).expand(6, 10, 1, 1),
              "topkp_t": torch.full((6, 10, 1, 1), 0.1)}
    none = m.target_loss(logits, target)
    assert float(none.detach()) == 0.0 and none.requires_grad
