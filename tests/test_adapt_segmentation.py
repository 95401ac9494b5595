"""`uda adapt-images` on segmentation runs: an lsd run on the shipped digit scenes exported as
images/ + labels/ + classes.json, checked against translate() and the source labels, trained
on by source-only, resumed file by file, and the one-line refusals."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from test_adapt_images import SMALL, train_cli
from test_segmentation_run import cli
from uda_cli.data.folder import folder_domain
from uda_cli.data.registry import load_dense
from uda_cli.data.streaming import resize_pair
from uda_cli.data.transforms import denormalize, normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.adapt import FORMAT
from uda_cli.engine.setup import load_method

SRC, TGT = "mnist-scenes-mini", "mnistm-scenes-mini"
SRC_SIZE = (48, 48)  # (H, W) the lsd run reads its source at: the export's default size
CPU = ["--device", "cpu", "--workers", "0"]


def _train(run: Path, method: str, *extra: str) -> None:
    """``uda train`` SRC -> TGT for 2 steps on the CPU (module fixtures have no capsys)."""
    from uda_cli.cli.app import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--method", method, "--src", SRC, "--tgt", TGT, "--steps", "2", "--batch-size", "2",
              "--eval-every", "0", "--out", str(run), *CPU, *extra])
    assert e.value.code == 0


@pytest.fixture(scope="module")
def lsd_run(tmp_path_factory) -> Path:
    """lsd, 2 steps, thin G and D, its source read at 48x48 (the target at its 64x64)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("lsd") / "run"
    _train(run, "lsd", "--set", "g_width=8", "--set", "d_width=8", "--src-size", "48x48")
    return run


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for sub in ("images", "labels")
            for p in sorted((folder / sub).glob("*.png"))}


def _check_against_source(run: Path, out: Path, n: int, size: tuple[int, int]) -> None:
    """Each image is translate() of the source scene resized to ``size`` (within a grey level);
    each label is the source label resized by nearest."""
    method, _ = load_method(ckpt.resolve_checkpoint(run), torch.device("cpu"))
    source = load_dense(SRC, "train")
    for i in range(n):
        stem = source.stem(i)
        image, label = source.read(i)
        want_label = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].to(torch.uint8)
        got_label = np.asarray(Image.open(out / "labels" / f"{stem}.png"))
        assert got_label.shape == size and np.array_equal(got_label, want_label.numpy()), stem
        x, _ = resize_pair(image, None, size)
        with torch.no_grad():
            want = denormalize(method.translate(normalize(x[None]))[0]).permute(1, 2, 0).numpy().astype(int)
        with Image.open(out / "images" / f"{stem}.png") as im:
            assert im.mode == "RGB"
            got = np.asarray(im).astype(int)
        assert got.shape == (*size, 3) and np.abs(got - want).max() <= 1, stem


# ---- the export and its files ------------------------------------------------------------------

def test_export_matches_translate_and_labels_and_trains_source_only(lsd_run, tmp_path, capsys):
    out = tmp_path / "exp"
    code, stdout, err = cli(["adapt-images", str(lsd_run), "--out", str(out), "--limit", "6", "--batch-size", "4",
                             *CPU], capsys)
    assert code == 0, err
    assert "wrote 6 scenes, 0 already there; 6 in" in stdout and "at 48x48" in stdout
    assert f"train on it: uda train --src folder:{out} --tgt {TGT}" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["classes.json", "images", "labels", "manifest.json", "preview.png"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == FORMAT and m["task"] == "segmentation" and m["method"] == "lsd" and m["step"] == 2
    assert (m["domain"], m["split"], m["image_size"], m["size"]) == (SRC, "train", [48, 48], "48x48")
    assert m["num_images"] == m["num_source_images"] == 6 and m["complete"] is True
    assert m["checkpoint_sha256"] and m["config"]["g_width"] == 8
    classes = json.loads((out / "classes.json").read_text())
    names = tuple(str(d) for d in range(10)) + ("background",)
    assert classes == {"names": list(names), "ids": list(range(11)), "ignore": [255]}  # no palette: no colors
    with Image.open(out / "preview.png") as im:  # 4 scenes, 2 rows, 48 px scaled x2 by the grid, a left margin
        assert im.mode == "RGB" and im.height == 2 + 2 * (96 + 2) and im.width > 2 + 4 * (96 + 2)
    _check_against_source(lsd_run, out, 6, SRC_SIZE)
    # the preview's first translated cell: the written translation with its label overlaid
    # (class colours at half weight, ignored pixels as they are), scaled x2 by the grid
    from uda_cli.engine.adapt import class_palette, overlay
    from uda_cli.data.registry import get_domain

    stem = load_dense(SRC, "train").stem(0)
    tr = torch.from_numpy(np.array(Image.open(out / "images" / f"{stem}.png"))).permute(2, 0, 1)
    lab = torch.from_numpy(np.array(Image.open(out / "labels" / f"{stem}.png")))
    cell = overlay(tr, lab, class_palette(get_domain(SRC))).repeat(2, 0).repeat(2, 1)
    assert not np.array_equal(cell, tr.permute(1, 2, 0).numpy().repeat(2, 0).repeat(2, 1))  # labels drawn
    with Image.open(out / "preview.png") as im:
        p = np.asarray(im)
    left = p.shape[1] - (2 + 4 * 98) + 2
    assert np.array_equal(p[2 + 98 : 2 + 98 + 96, left : left + 96], cell)

    # folder:DIR reads it back, and source-only trains on it and evaluates
    spec = folder_domain(f"folder:{out}")
    assert spec.task == "segmentation" and spec.classes == names and spec.image_size == SRC_SIZE
    assert len(spec.reader(None, "all")) == 6
    run = tmp_path / "so"
    code, stdout, err = cli(["train", "--method", "source-only", "--src", f"folder:{out}", "--tgt", TGT, "--steps", "2",
                             "--batch-size", "2", "--eval-every", "0", "--set", "model=deeplabv2_small",
                             "--out", str(run), *CPU], capsys)
    assert code == 0 and f"target mIoU ({TGT}:test)" in stdout, err
    code, stdout, err = cli(["evaluate", str(run), "--domain", f"folder:{out}", *CPU], capsys)
    assert code == 0 and "mIoU" in stdout, err


def test_size_flag_resizes_images_and_labels_by_nearest(lsd_run, tmp_path, capsys):
    out = tmp_path / "exp"
    code, stdout, err = cli(["adapt-images", str(lsd_run), "--out", str(out), "--limit", "3", "--size", "40x24",
                             *CPU], capsys)
    assert code == 0 and "at 40x24" in stdout, err
    assert json.loads((out / "manifest.json").read_text())["image_size"] == [24, 40]
    _check_against_source(lsd_run, out, 3, (24, 40))
    # a second call at another size would mix sizes in one folder: refused
    code, _, err = cli(["adapt-images", str(lsd_run), "--out", str(out), "--limit", "3", *CPU], capsys)
    assert code == 2 and err.strip().splitlines() == [
        f"error: {out} was exported at 40x24, not 48x48; pass --size 40x24 to finish it, or a new --out"], err


def test_an_i2i_segmentation_run_exports_the_same_way(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "i2i", "--src-size", "48x48")
    out = tmp_path / "exp"
    code, stdout, err = cli(["adapt-images", str(run), "--out", str(out), "--limit", "2", *CPU], capsys)
    assert code == 0 and "i2i step 2 on mnist-scenes-mini:train at 48x48: wrote 2 scenes" in stdout, err
    _check_against_source(run, out, 2, SRC_SIZE)


# ---- resume ------------------------------------------------------------------------------------

def test_resume_rewrites_only_what_is_missing(lsd_run, tmp_path, capsys):
    whole, part = tmp_path / "whole", tmp_path / "part"
    argv = lambda out, b: ["adapt-images", str(lsd_run), "--out", str(out), "--limit", "7", "--batch-size", b, *CPU]  # noqa: E731
    assert cli(argv(whole, "7"), capsys)[0] == 0
    assert cli(argv(part, "3"), capsys)[0] == 0
    stems = sorted(p.stem for p in (part / "images").glob("*.png"))
    assert len(stems) == 7
    # an interrupted export: two images gone, one label gone, one image empty, a stale temporary file
    (part / "images" / f"{stems[1]}.png").unlink()
    (part / "images" / f"{stems[5]}.png").unlink()
    (part / "labels" / f"{stems[3]}.png").unlink()
    (part / "images" / f"{stems[6]}.png").write_bytes(b"")
    stale = part / "images" / ".x.tmp-123"
    stale.write_bytes(b"half a png")
    old = 1_000_000_000
    for p in (part / "images").glob("*.png"):
        os.utime(p, ns=(old, old))
    for p in (part / "labels").glob("*.png"):
        os.utime(p, ns=(old, old))
    code, stdout, err = cli(argv(part, "2"), capsys)
    assert code == 0 and "wrote 4 scenes, 3 already there; 7 in" in stdout, err
    assert not stale.exists()
    rewritten = {f"images/{stems[i]}.png" for i in (1, 5, 6)} | {f"labels/{stems[3]}.png"}
    for sub in ("images", "labels"):
        for p in (part / sub).glob("*.png"):
            rel = f"{sub}/{p.name}"
            assert (p.stat().st_mtime_ns != old) == (rel in rewritten), rel
    assert _files(part) == _files(whole)  # as an uninterrupted export, whatever the batch size
    # nothing left to do: nothing written
    code, stdout, err = cli(argv(part, "2"), capsys)
    assert code == 0 and "wrote 0 scenes, 7 already there" in stdout, err
    # another domain into the same folder is refused in one line
    code, _, err = cli(["adapt-images", str(lsd_run), "--out", str(part), "--domain", f"{SRC}:test", *CPU], capsys)
    assert code == 2 and f"is an export of {SRC}:train, not {SRC}:test" in err and len(err.strip().splitlines()) == 1


# ---- refusals ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_seg_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("so") / "run"
    _train(run, "source-only")
    return run


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("pixelda") / "run"
    train_cli(run, extra=SMALL)
    return run


def _one_line(code, err, message):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("args,message", [
    (["--size", "abc"], "--size: 'abc' is not a size; write WIDTHxHEIGHT"),
    (["--size", "0x0"], "--size: '0x0' is not a size; write WIDTHxHEIGHT"),
    (["--size", "6x32"], "--size 6x32 is too small for"),  # DeepLab-small's maps are /4: at least 8 a side
    (["--samples-per-image", "2"], "lsd has no noise input"),
    (["--domain", "mnist2000"], "is a classification domain but"),
])
def test_bad_arguments_are_one_line(lsd_run, tmp_path, capsys, args, message):
    out = tmp_path / "exp"
    code, _, err = cli(["adapt-images", str(lsd_run), "--out", str(out), *CPU, *args], capsys)
    _one_line(code, err, message)
    assert not out.exists()  # nothing written before the checks


def test_non_translating_segmentation_run_and_size_on_classification(plain_seg_run, classification_run, tmp_path,
                                                                      capsys):
    code, _, err = cli(["adapt-images", str(plain_seg_run), "--out", str(tmp_path / "a"), *CPU], capsys)
    _one_line(code, err, "source-only checkpoint, which does not translate images; adapt-images needs one of: ")
    assert "lsd" in err
    for flag, value in (("--size", "32x32"), ("--workers", "2")):
        code, _, err = cli(["adapt-images", str(classification_run), "--out", str(tmp_path / "b"), "--device", "cpu",
                            flag, value], capsys)
        _one_line(code, err, f"{flag} applies to segmentation runs")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- street files: a palette, a label stored at another size -------------------------------------

def test_street_export_keeps_the_palette_and_gta5_labels(tmp_path, capsys):
    from test_segmentation_run import SIZE, _street
    from uda_cli.data import labels as L

    street = _street(tmp_path / "street")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="labels differ in size"):
        code, _, err = cli(["train", "--method", "lsd", "--src", "gta5", "--tgt", "cityscapes", "--data-root",
                            str(street), "--set", "model=deeplabv2_small", "--set", "pretrained=none", "--set",
                            "g_width=8", "--set", "d_width=8", *SIZE, "--batch-size", "1", "--steps", "1",
                            "--eval-every", "0", "--out", str(run), *CPU], capsys)
    assert code == 0, err
    out = tmp_path / "exp"
    with pytest.warns(UserWarning, match="labels differ in size"):
        code, stdout, err = cli(["adapt-images", str(run), "--out", str(out), *CPU], capsys)
    assert code == 0 and "on gta5:all at 96x48: wrote 5 scenes" in stdout and "--tgt cityscapes" in stdout, err
    classes = json.loads((out / "classes.json").read_text())
    assert classes["names"] == list(L.CITYSCAPES_CLASSES) and classes["ignore"] == [255]
    assert [tuple(c) for c in classes["colors"]] == list(L.CITYSCAPES_PALETTE)
    assert folder_domain(f"folder:{out}").palette == L.CITYSCAPES_PALETTE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same "labels differ in size" warning, checked above
        source = load_dense("gta5", "all", street)
    for i in range(len(source)):  # 00003's label is stored at half size: read at the image's, then resized
        _, label = source.read(i)
        want = F.interpolate(label[None, None].float(), size=(48, 96), mode="nearest")[0, 0].to(torch.uint8).numpy()
        assert np.array_equal(np.array(Image.open(out / "labels" / f"{source.stem(i)}.png")), want)
