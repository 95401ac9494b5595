"""A segmentation run end to end on tiny files in GTA5's and Cityscapes' real layouts:
train, SIGKILL, resume to the same weights as a straight run, evaluate (cityscapesScripts
as the oracle on the saved predictions), and the one-line refusals."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import _launch
from test_dense_readers import palette_png, rgb, write
from uda_cli.cli.app import main
from uda_cli.data import labels as L
from uda_cli.engine import checkpoint as ckpt

SIZE = ["--src-size", "96x48", "--tgt-size", "96x48"]


def _street(root: Path) -> Path:
    """GTA5: 5 frames of 60x100 (one label at half size); Cityscapes: 3 train and 2 val
    frames of 64x128 ("full resolution"), labels of a few classes and ignored ids."""
    rng = np.random.default_rng(0)
    ids = np.array([7, 8, 11, 21, 23, 26, 24, 0])  # road, sidewalk, building, vegetation, sky, car, person, unlabeled

    def label(h, w, seed):
        r = np.random.default_rng(seed)
        return np.kron(r.choice(ids, size=(h // 4, w // 4)), np.ones((4, 4), dtype=np.int64)).astype(np.uint8)

    def image_for(lbl, seed):  # the class is readable from the colour, plus noise
        im = rgb(*lbl.shape, seed) // 4
        im[..., 0] += (lbl * 5).astype(np.uint8)
        return im

    g = root / "gta5"
    for k in range(1, 6):
        lbl = label(60, 100, k)
        write(g / "images" / f"{k:05d}.png", image_for(lbl, k))
        palette_png(g / "labels" / f"{k:05d}.png", lbl[::2, ::2] if k == 3 else lbl)
    c = root / "cityscapes"
    for split, n in (("train", 3), ("val", 2)):
        for k in range(n):
            stem = f"{'aachen' if k % 2 else 'bremen'}_{k:06d}_000019"
            city = stem.split("_")[0]
            lbl = label(64, 128, 100 + k + 10 * (split == "val"))
            write(c / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", image_for(lbl, 50 + k))
            write(c / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", lbl)
    del rng
    return root


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    return _street(tmp_path_factory.mktemp("street"))


def argv(root: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--method", "source-only", "--src", "gta5", "--tgt", "cityscapes", "--data-root", str(root),
            "--set", "model=deeplabv2_small", "--set", "pretrained=none", "--set", "lr=0.01", *SIZE,
            "--crop", "64x32", "--scale", "0.75,1.25", "--flip", "--batch-size", "2", "--steps", "6",
            "--device", "cpu", "--eval-every", "0", "--out", str(run), *extra]


def cli(args, capsys):
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


# `uda train` that SIGKILLs itself right after step 5 (its checkpoint is step 4's).
KILL_AT_STEP_5 = """
import os, signal, sys
from uda_cli.engine import trainer
real = trainer.train
def killed(opts, callbacks=(), **kw):
    def kill(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(opts, callbacks=(*callbacks, kill), **kw)
trainer.train = killed
from uda_cli.cli.app import main
main(sys.argv[1:])
"""


def test_killed_segmentation_run_resumes_to_the_straight_run(street, tmp_path, capsys):
    straight = tmp_path / "straight"
    with pytest.warns(UserWarning, match="1 labels differ in size from their image"):  # GTA5's odd label, once
        code, out, err = cli(argv(street, straight, "--workers", "0", "--log-format", "text"), capsys)
    assert code == 0, err
    assert "target mIoU (cityscapes:val)" in out
    assert "sizes 96x48 -> 96x48, crop 64x32" in err.splitlines()[0]

    run = tmp_path / "killed"
    r = subprocess.run([sys.executable, "-c", KILL_AT_STEP_5,
                        *argv(street, run, "--workers", "2", "--save-every", "2", "--log-format", "text")],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _launch.pythonpath()},
                       timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert ckpt.resolve_checkpoint(run).name == "step-00000004.safetensors"
    code, out, err = cli(argv(street, run, "--workers", "1", "--save-every", "2", "--resume", "auto"), capsys)
    assert code == 0, err
    a = ckpt.read_tensors(ckpt.resolve_checkpoint(straight))
    b = ckpt.read_tensors(ckpt.resolve_checkpoint(run))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


def test_evaluate_prints_iou_and_matches_cityscapes_scripts(street, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert cli(argv(street, run, "--workers", "0"), capsys)[0] == 0
    preds = tmp_path / "preds"
    code, out, err = cli(["evaluate", str(run), "--domain", "cityscapes:val", "--save-predictions", str(preds),
                          "--json", str(tmp_path / "r.json"), "--workers", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    assert "mIoU" in out and "per-class IoU" in out and "road" in out
    import json

    ours = json.loads((tmp_path / "r.json").read_text())
    assert ours["size"] == [48, 96] and ours["num_images"] == 2 and ours["flip"] is False
    saved = sorted(p.name for p in (preds / "ids").glob("*.png"))
    assert saved == ["aachen_000001_000019.png", "bremen_000000_000019.png"]
    from PIL import Image

    assert Image.open(preds / "ids" / saved[0]).size == (128, 64)  # the label's full resolution

    cs = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling",
                             reason="pip install -e '.[dev]' installs the oracle")
    for name, value in {"predictionPath": str(preds / "ids"), "predictionWalk": None, "evalInstLevelScore": False,
                        "evalPixelAccuracy": False, "JSONOutput": False, "quiet": True}.items():
        monkeypatch.setattr(cs.args, name, value)
    gts = sorted(str(p) for p in (street / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))
    theirs = cs.evaluateImgLists([cs.getPrediction(cs.args, g) for g in gts], gts, cs.args)
    capsys.readouterr()
    for c in L.CITYSCAPES_CLASSES:
        a, b = ours["per_class_iou"][c], theirs["classScores"][c]
        assert (a is None) if math.isnan(b) else a == pytest.approx(b, abs=1e-6), c
    assert ours["miou"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--crop", "200x20"], "--crop 200x20 is larger than the source images (96x48)"),
    (["--src-size", "96by48"], "is not a size; write WIDTHxHEIGHT"),
    (["--scale", "2,1"], "0 < LO <= HI"),
])
def test_bad_sizes_are_one_line(street, tmp_path, capsys, extra, message):
    args = argv(street, tmp_path / "r", "--workers", "0")
    args = [a for a in args if a not in ("--scale", "0.75,1.25")] if "--crop" in extra else args
    code, _, err = cli(args + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err, err


def test_tasks_differ_and_missing_data_are_one_line(street, tmp_path, capsys):
    code, _, err = cli(["train", "--method", "source-only", "--src", "gta5", "--tgt", "mnist2000", "--out",
                        str(tmp_path / "a"), "--data-root", str(street)], capsys)
    assert code == 2 and "gta5 is a segmentation domain and mnist2000 a classification one" in err, err
    code, _, err = cli(["train", "--method", "source-only", "--src", "synthia", "--tgt", "cityscapes", "--out",
                        str(tmp_path / "b"), "--data-root", str(street), *SIZE], capsys)
    assert code == 1 and "uda download synthia" in err and len(err.strip().splitlines()) <= 2, err
    code, _, err = cli(["train", "--method", "source-only", "--src", "mnist2000", "--tgt", "usps1800", "--crop",
                        "16x16", "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--crop applies to segmentation domains" in err, err


def test_typos_and_commands_that_do_not_handle_segmentation_yet(tmp_path, capsys):
    code, _, err = cli(["train", "--method", "source-only", "--src", "mnist-scene-mini", "--tgt", "mnistm-scenes-mini",
                        "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "did you mean 'mnist-scenes-mini'?" in err, err
    code, _, err = cli(["train", "--method", "source-only", "--src", "mnist-scenes-mini", "--tgt",
                        "mnistm-scenes-mini", "--set", "model=deeplab_small", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "did you mean 'deeplabv2_small'?" in err, err
    run = tmp_path / "run"
    code, out, err = cli(["train", "--method", "source-only", "--src", "mnist-scenes-mini", "--tgt",
                          "mnistm-scenes-mini", "--steps", "2", "--batch-size", "2", "--workers", "0", "--device",
                          "cpu", "--out", str(run)], capsys)
    assert code == 0 and "target mIoU (mnistm-scenes-mini:test)" in out, err
    # tsne maps a segmentation run's pixels (tests/test_tsne_segmentation.py); --easy-hard is tpld's alone
    code, _, err = cli(["tsne", str(run), "--easy-hard"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "tpld" in err, err
    code, _, err = cli(["adapt-images", str(run), "--out", str(tmp_path / "x")], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "does not translate images" in err, err
