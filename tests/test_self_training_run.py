"""Self-training rounds end to end (cbst) on tiny GTA5/Cityscapes files: round files, a run
SIGKILLed inside a round resumes to the straight run's weights, the pass resumes from its
files, --init, and the one-line refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from test_segmentation_run import KILL_AT_STEP_5, _street, cli
from uda_cli.engine import checkpoint as ckpt

ROUNDS = ["--set", "warmup_steps=3", "--set", "rounds=2", "--set", "round_steps=3"]


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    return _street(tmp_path_factory.mktemp("street"))


def argv(root: Path, run: Path, *extra: str, method: str = "cbst") -> list[str]:
    return ["train", "--method", method, "--src", "gta5", "--tgt", "cityscapes", "--data-root", str(root),
            "--set", "model=deeplabv2_small", "--set", "pretrained=none", "--set", "lr=0.01",
            "--src-size", "96x48", "--tgt-size", "96x48", "--batch-size", "2", "--device", "cpu",
            "--eval-every", "0", "--workers", "0", "--out", str(run), *extra]


def weights(run: Path) -> dict:
    return ckpt.read_tensors(ckpt.resolve_checkpoint(run))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight(street, tmp_path_factory) -> Path:
    """The uninterrupted run, a checkpoint at every step (the tests below cut copies of it)."""
    run = tmp_path_factory.mktemp("st") / "straight"
    from uda_cli.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(argv(street, run, *ROUNDS, "--log-format", "text", "--save-every", "1", "--keep-checkpoints", "0"))
    assert e.value.code == 0
    return run


def test_rounds_write_their_files(straight, street):
    stems = sorted(p.name.removesuffix("_leftImg8bit.png")
                   for p in (street / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))
    config = json.loads((straight / "config.json").read_text())
    assert config["options"]["steps"] == 3 + 2 * 3 and config["config"]["steps"] == 9
    for r, portion in ((0, 0.2), (1, 0.25)):
        folder = straight / "rounds" / f"{r:02d}"
        assert (folder / "complete").exists()
        assert sorted(p.stem for p in (folder / "labels").glob("*.png")) == stems
        assert sorted(p.stem for p in (folder / "pred").glob("*.npz")) == stems
        th = json.loads((folder / "thresholds.json").read_text())
        assert th["portion"] == pytest.approx(portion) and len(th["lambda"]) == 19
        stats = json.loads((folder / "stats.json").read_text())
        assert stats["images"] == 3 and 0 <= stats["labelled"] <= 1 and len(stats["labelled_per_class"]) == 19
        from PIL import Image

        label = np.array(Image.open(folder / "labels" / f"{stems[0]}.png"))
        assert label.shape == (48, 96) and set(np.unique(label)) <= set(range(19)) | {255}
        with np.load(folder / "pred" / f"{stems[0]}.npz") as z:
            assert z["classes"].shape == (2, 48, 96) and z["probs"].dtype == np.float16


def test_killed_inside_a_round_resumes_to_the_straight_run(straight, street, tmp_path, capsys):
    run = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_AT_STEP_5, *argv(street, run, *ROUNDS, "--save-every", "2")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert ckpt.resolve_checkpoint(run).name == "step-00000004.safetensors"  # inside round 0 (steps 3-5)
    code, out, err = cli(argv(street, run, *ROUNDS, "--save-every", "2", "--resume", "auto"), capsys)
    assert code == 0, err
    assert same(weights(run), weights(straight))
    assert (run / "rounds" / "01" / "complete").exists()


def test_a_pass_resumes_from_its_files(straight, street, tmp_path, capsys):
    """Round 1's pass cut short (its marker, labels and one prediction gone): a resume from
    the checkpoint before the round redoes only what is missing, to the same weights."""
    import shutil

    run = tmp_path / "cut"
    shutil.copytree(straight, run)
    r1 = run / "rounds" / "01"
    (r1 / "complete").unlink()
    shutil.rmtree(r1 / "labels")
    one = sorted((r1 / "pred").glob("*.npz"))[1]
    one.unlink()
    for p in (run / "checkpoints").glob("step-0000000[7-9]*"):
        p.unlink()
    (run / "checkpoints" / "latest").write_text("step-00000006\n")
    assert (run / "checkpoints" / "step-00000006.safetensors").exists()
    code, out, err = cli(argv(street, run, *ROUNDS, "--resume", "auto", "--log-format", "text"), capsys)
    assert code == 0, err
    assert one.exists() and (r1 / "complete").exists()
    assert same(weights(run), weights(straight))


def test_init_starts_from_another_run_and_skips_the_warmup(straight, street, tmp_path, capsys):
    src = tmp_path / "src"
    assert cli(["train", "--method", "source-only", "--src", "gta5", "--tgt", "cityscapes", "--data-root",
                str(street), "--set", "model=deeplabv2_small", "--set", "pretrained=none", "--src-size", "96x48",
                "--tgt-size", "96x48", "--batch-size", "2", "--steps", "2", "--device", "cpu", "--eval-every", "0",
                "--workers", "0", "--out", str(src)], capsys)[0] == 0
    run = tmp_path / "init"
    code, out, err = cli(argv(street, run, "--set", "rounds=1", "--set", "round_steps=2", "--init", str(src),
                              "--log-format", "text"), capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["warmup_steps"] == 0 and config["options"]["steps"] == 2
    assert "round 0: pseudo-label pass" in err


def test_refusals_are_one_line(street, straight, tmp_path, capsys):
    # --steps against the derived length
    code, _, err = cli(argv(street, tmp_path / "a", *ROUNDS, "--steps", "5"), capsys)
    assert code == 2 and "derives its length" in err and len(err.strip().splitlines()) == 1, err
    # --init of another task
    digits = tmp_path / "digits"
    assert cli(["train", "--method", "source-only", "--src", "mnist2000", "--tgt", "usps1800", "--steps", "1",
                "--batch-size", "4", "--device", "cpu", "--out", str(digits)], capsys)[0] == 0
    code, _, err = cli(argv(street, tmp_path / "b", *ROUNDS, "--init", str(digits)), capsys)
    assert code == 2 and "--init" in err and "classification run of 10 classes" in err, err
    # a segmentation network on classification domains (cbst runs there on digit networks)
    code, _, err = cli(["train", "--method", "cbst", "--src", "mnist2000", "--tgt", "usps1800", "--set",
                        "model=deeplabv2_small", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--set model applies to segmentation runs" in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1 and "Traceback" not in err, err
    # a round folder edited by hand: a pseudo-label gone, the run resumed inside that round
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(straight, run)
    for p in (run / "checkpoints").glob("step-0000000[89]*"):
        p.unlink()
    (run / "checkpoints" / "latest").write_text("step-00000007\n")
    victim = sorted((run / "rounds" / "01" / "labels").glob("*.png"))[0]
    victim.unlink()
    code, _, err = cli(argv(street, run, *ROUNDS, "--resume", "auto"), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and f"{victim} is missing" in errors[0] and "Traceback" not in err, err


def test_crst_adds_mrkld_to_the_target_term(street, tmp_path, capsys):
    """crst runs through a round; its target term is CBST's plus 0.1 x MRKLD (checked by hand
    on one batch), and lrent is refused in one line."""
    import torch.nn.functional as F

    from uda_cli.methods import self_training as st
    from uda_cli.methods.crst import CRST

    run = tmp_path / "crst"
    code, out, err = cli(argv(street, run, "--set", "warmup_steps=1", "--set", "rounds=1", "--set", "round_steps=2",
                              method="crst"), capsys)
    assert code == 0 and (run / "rounds" / "00" / "complete").exists(), err
    logits = torch.randn(2, 19, 6, 12)
    labels = torch.randint(0, 19, (2, 12, 24))
    labels[0, :3] = 255
    method = CRST.__new__(CRST)
    method.cfg = CRST.Config(regularizer="mrkld", reg_weight=0.1)
    up = F.interpolate(logits, size=(12, 24), mode="bilinear", align_corners=True)
    keep = labels != 255
    ce = F.cross_entropy(up, labels, ignore_index=255)
    reg = (-F.log_softmax(up, 1).mean(1))[keep].mean()
    assert float(method.target_loss(logits, {"y_t": labels})) == pytest.approx(float(ce + 0.1 * reg), rel=1e-5)
    assert float(st.mrkld(up, keep)) == pytest.approx(float(reg), rel=1e-6)

def test_crst_lrent_trains_on_soft_labels_from_the_top3(street, tmp_path, capsys):
    """regularizer=lrent: the pass keeps 3 classes per pixel, labels/ holds CRST's kept pixels,
    and the target term is the soft CE against normalise((p/lambda)^4) on those pixels (checked
    by hand on one batch); tpld refuses lrent in one line."""
    import torch.nn.functional as F

    from uda_cli.engine import rounds as R
    from uda_cli.methods.crst import CRST

    run = tmp_path / "lrent"
    code, out, err = cli(argv(street, run, "--set", "warmup_steps=1", "--set", "rounds=1", "--set", "round_steps=2",
                              "--set", "regularizer=lrent", method="crst"), capsys)
    assert code == 0 and (run / "rounds" / "00" / "complete").exists(), err
    assert json.loads((run / "config.json").read_text())["config"]["reg_weight"] == 0.25
    files = R.RoundFiles(run, 0)
    stem = sorted(p.stem for p in (run / "rounds" / "00" / "pred").glob("*.npz"))[0]
    classes, probs = R.read_pred(files.pred(stem))
    assert classes.shape[0] == 3 and probs.shape[0] == 3
    method = CRST.__new__(CRST)
    method.cfg, method.spec = CRST.Config(regularizer="lrent"), type("S", (), {"num_classes": 19})()
    method.lam = torch.tensor([0.9] * 10 + [0.5] * 9)
    torch.manual_seed(0)
    logits = torch.randn(1, 19, 6, 12)
    prob = torch.randn(1, 19, 12, 24).mul(3).softmax(1)
    top_p, top_c = prob.topk(3, 1)
    labels = torch.full((1, 12, 24), 255)
    labels[0, :6] = top_c[0, 0, :6]  # the upper half kept
    batch = {"y_t": labels, "topk_t": top_c, "topkp_t": top_p}
    w = (top_p / method.lam[top_c]) ** 4
    q = torch.zeros(1, 19, 12, 24).scatter_(1, top_c, w / w.sum(1, keepdim=True))
    up = F.interpolate(logits, size=(12, 24), mode="bilinear", align_corners=True)
    want = (-(q * F.log_softmax(up, 1)).sum(1))[0, :6].mean()
    assert float(method.target_loss(logits, batch)) == pytest.approx(float(want), rel=1e-4)
    code, _, err = cli(argv(street, tmp_path / "t", "--set", "regularizer=lrent", method="tpld"), capsys)
    assert code == 2 and "lrent" in err and "crst" in err and "Traceback" not in err, err


# --flip: a round's streams draw their flips from (seed, stream name, draw), so a resumed round
# must rebuild its easy and hard streams under the names the straight run gave them.
TPLD = ["--set", "warmup_steps=2", "--set", "phase1_rounds=1", "--set", "phase2_rounds=1", "--set", "round_steps=3",
        "--set", "easy_fraction=0.34", "--flip"]


def test_tpld_runs_both_phases_and_resumes_inside_phase_2(street, tmp_path, capsys):
    """2 warm-up steps, a phase-1 round (steps 2-4), a phase-2 round (5-7): round files with the
    voting counts and the easy/hard lists, and a run SIGKILLed inside phase 2 (checkpoint at
    step 6) resumes to the straight run's weights, F and D."""
    straight = tmp_path / "straight"
    code, out, err = cli(argv(street, straight, *TPLD, "--log-format", "text", method="tpld"), capsys)
    assert code == 0, err
    s0 = json.loads((straight / "rounds" / "00" / "stats.json").read_text())
    s1 = json.loads((straight / "rounds" / "01" / "stats.json").read_text())
    assert s0["phase"] == 1 and "easy" not in s0
    assert s0["labelled_after_voting"] >= s0["labelled_before_voting"]
    assert s1["phase"] == 2 and len(s1["easy"]) == 1 and len(s1["hard"]) == 2
    assert set(s1["easy"] + s1["hard"]) == set(s1["per_image"])
    assert "easy / 2 hard images" in err
    w = weights(straight)
    assert any(k.startswith("D.") for k in w)

    run = tmp_path / "killed"
    kill_at_6 = KILL_AT_STEP_5.replace("step == 5", "step == 7")
    r = subprocess.run([sys.executable, "-c", kill_at_6, *argv(street, run, *TPLD, "--save-every", "6",
                                                             method="tpld")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert ckpt.resolve_checkpoint(run).name == "step-00000006.safetensors"  # inside phase 2 (steps 5-7)
    code, out, err = cli(argv(street, run, *TPLD, "--save-every", "6", "--resume", "auto", method="tpld"), capsys)
    assert code == 0, err
    assert same(weights(run), w)


def test_tpld_refusals(street, tmp_path, capsys):
    code, _, err = cli(argv(street, tmp_path / "a", *TPLD, "--set", "rounds=5", method="tpld"), capsys)
    assert code == 2 and "set phase1_rounds and phase2_rounds instead" in err, err
    code, _, err = cli(argv(street, tmp_path / "b", *TPLD, "--set", "vote_window=4", method="tpld"), capsys)
    assert code == 2 and "vote_window must be odd" in err, err
    code, _, err = cli(["train", "--method", "tpld", "--src", "mnist2000", "--tgt", "usps1800", "--out",
                        str(tmp_path / "c")], capsys)
    assert code == 2 and "tpld" in err and "segmentation" in err, err


def test_target_list_picks_the_rounds_images(street, tmp_path, capsys):
    """--set target_list=FILE (CRST's 505-image list): the rounds label and train on the listed
    images only, named as stems or as CRST's paths; a name the target lacks is refused in one
    line before the first step."""
    stems = sorted(p.name.removesuffix("_leftImg8bit.png")
                   for p in (street / "cityscapes" / "leftImg8bit" / "train").rglob("*.png"))
    city = stems[1].split("_", 1)[0]
    listed = tmp_path / "list.lst"
    listed.write_text(f"# two of them\n{stems[0]}\nleftImg8bit/train/{city}/{stems[1]}_leftImg8bit.png\n")
    run = tmp_path / "listed"
    code, out, err = cli(argv(street, run, "--set", "warmup_steps=1", "--set", "rounds=1", "--set", "round_steps=2",
                              "--set", f"target_list={listed}"), capsys)
    assert code == 0, err
    assert sorted(p.stem for p in (run / "rounds" / "00" / "labels").glob("*.png")) == sorted(stems[:2])
    assert json.loads((run / "config.json").read_text())["config"]["target_list"] == str(listed)
    listed.write_text(f"{stems[0]}\nnot_a_city_000000_000000\n")
    code, _, err = cli(argv(street, tmp_path / "bad", "--set", "warmup_steps=1", "--set", "rounds=1",
                            "--set", "round_steps=2", "--set", f"target_list={listed}"), capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "not_a_city_000000_000000" in errors[0] and "1 of 2" in errors[0], err
    assert not (tmp_path / "bad" / "checkpoints").exists()  # refused before the first step
