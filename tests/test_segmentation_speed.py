"""benchmarks/segmentation_speed.py on tiny settings: both tables print, with a row per setting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "segmentation_speed.py"


def _script():
    spec = importlib.util.spec_from_file_location("_bench_segmentation_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_tiny_run_prints_both_tables(tmp_path, capsys):
    mod = _script()
    keep = tmp_path / "files"
    assert mod.main(["--device", "cpu", "--models", "deeplabv2_small", "--size", "64x32", "--tgt-size", "48x24",
                     "--steps", "2", "--warmup", "1", "--files", "2", "--workers", "0", "--frame-scale", "0.05",
                     "--repeats", "1", "--keep", str(keep)]) == 0
    out = capsys.readouterr().out

    assert "| model | params M | precision |" in out
    (row,) = _rows(out, "deeplabv2_small")
    assert row[2:8] == ["fp32", "NCHW", "64x32", "48x24", "1", "2"]
    assert float(row[8].split()[0]) > 0 and float(row[9]) > 0  # ms/step, img/s
    assert float(row[10]) > 0  # peak MiB

    loader = _rows(out, "gta5") + _rows(out, "cityscapes")
    assert len(loader) == 4  # one stream row and one decode row per dataset
    streams = [r for r in loader if len(r) == 10]
    assert [(r[0], r[1], r[3], r[4], r[5]) for r in streams] == [("gta5", "96x53", "64x36", "2", "0"),
                                                                 ("cityscapes", "102x51", "51x26", "2", "0")]
    assert all(float(r[6].split()[0]) > 0 and float(r[8].split()[0]) > 0 for r in streams)  # uda and PIL img/s

    # The files are in the layouts uda reads, with label ids; a second run reuses them.
    assert sorted(p.name for p in (keep / "gta5" / "labels").iterdir()) == ["00001.png", "00002.png"]
    assert len(list((keep / "cityscapes" / "gtFine" / "train").rglob("*_gtFine_labelIds.png"))) == 2
    import numpy as np
    from PIL import Image

    with Image.open(keep / "gta5" / "labels" / "00001.png") as im:
        assert im.mode == "P" and np.asarray(im).max() <= 33
    stamp = (keep / "gta5" / "images" / "00001.png").stat().st_mtime_ns
    assert mod.write_files(keep, 2, 0.05) == {"version": 1, "files": 2, "frame_scale": 0.05, "seed": 0}
    assert (keep / "gta5" / "images" / "00001.png").stat().st_mtime_ns == stamp


def test_tiny_tpld_round(tmp_path, capsys):
    """--parts round: one tpld round on tiny synthetic frames times its pass and its steps."""
    mod = _script()
    assert mod.main(["--parts", "round", "--device", "cpu", "--models", "deeplabv2_small", "--size", "64x32",
                     "--tgt-size", "64x32", "--batch", "2", "--steps", "3", "--files", "3", "--workers", "0",
                     "--frame-scale", "0.05", "--keep", str(tmp_path / "files")]) == 0
    out = capsys.readouterr().out
    assert "One tpld round, deeplabv2_small fp32, source 64x32, target 64x32, batch 2 + 2" in out
    (pass_row,) = [r for r in _rows(out, "pass (predict with flip, thresholds, selection, voting, files)")]
    assert pass_row[1] == "3 images" and float(pass_row[3].split()[0]) > 0 and float(pass_row[4]) > 0
    (step_row,) = [r for r in _rows(out, "retraining (phase-1 step: source CE + bootstrapped target + MRKLD)")]
    assert step_row[1] == "2 steps" and float(step_row[2].split()[0]) > 0


def test_tiny_method_steps(tmp_path, capsys):
    """--parts method: a real lsd and a real i2i run on tiny synthetic frames, each step timed."""
    mod = _script()
    assert mod.main(["--parts", "method", "--methods", "lsd,i2i", "--device", "cpu", "--models", "deeplabv2_small",
                     "--size", "64x32", "--tgt-size", "64x32", "--steps", "2", "--files", "2", "--workers", "0",
                     "--frame-scale", "0.05", "--keep", str(tmp_path / "files")]) == 0
    out = capsys.readouterr().out
    assert "| method | network | steps | ms/step | first step ms | steps/s | peak MiB | params M | run |" in out
    assert "fp32, source 64x32, target 64x32, batch 1 + 1" in out
    rows = _rows(out, "lsd") + _rows(out, "i2i")
    assert [(r[0], r[1], r[2]) for r in rows] == [("lsd", "deeplabv2_small", "1"), ("i2i", "deeplabv2_small", "1")]
    for r in rows:
        assert float(r[3].split()[0]) > 0 and float(r[4]) > 0 and float(r[5]) > 0 and float(r[6]) > 0
        assert float(r[7].split()[0]) > 0 and "F 0.35" in r[7]  # the total, then each network
    assert "G " in rows[0][7] and "D " in rows[0][7] and "Q_tr_x " in rows[1][7]
    assert [r[8] for r in rows] == ["ok", "ok"]
    # The train_step wrappers are gone: the classes have their own again.
    from uda_cli.methods.i2i import I2I
    from uda_cli.methods.lsd import LSD

    assert LSD.train_step.__qualname__ == "LSD.train_step" and I2I.train_step.__qualname__ == "I2I.train_step"


def test_models_auto_only_for_method(capsys):
    mod = _script()
    import pytest

    with pytest.raises(SystemExit):
        mod.main(["--parts", "train", "--models", "auto"])
    assert "--parts method only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mod.main(["--parts", "method", "--methods", "lsd,nope"])
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_a_run_failing_after_its_timed_steps_keeps_them(monkeypatch):
    """Random-weight ResNet-101 runs end in a non-finite-loss error after the last (timed) step:
    the error becomes the row's note; a run failing before its steps are timed still raises."""
    import pytest

    import uda_cli.engine.trainer as trainer
    from uda_cli.errors import UDAError

    mod = _script()

    def fails(opts, interactive):
        raise UDAError("loss d/tr is not finite at step 2 (no checkpoint was written); lower the learning rate")

    monkeypatch.setattr(trainer, "train", fails)
    assert mod._train(None, {"ms": [1.0, 2.0]}, 2) == "loss d/tr is not finite at step 2"
    with pytest.raises(UDAError):
        mod._train(None, {"ms": [1.0]}, 2)
