"""Commands that read a run's domains again (evaluate, adapt-images, tsne) find the run's own data root."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_cli import run
from uda_cli.data.registry import DIGIT_CLASSES, DomainSpec, _DOMAINS, register_domain
from uda_cli.errors import DataError
from uda_cli.viz import tsne as T

SMALL_PIXELDA = ["--set", "g_filters=8", "--set", "g_blocks=1", "--set", "d_filters=8", "--set", "task_net=lenet"]


def _reader(folder, split):
    """Reads ``<data root>/rooted/<split>.npz``, as a real dataset reads its files."""
    path = folder / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path} is missing; run `uda download rooted --data-root ROOT`")
    with np.load(path) as f:
        return f["x"], f["y"]


def _write(root, n=40):
    (root / "rooted").mkdir(parents=True)
    rng = np.random.default_rng(n)
    for split in ("train", "test"):
        x = rng.integers(0, 255, size=(n, 32, 32, 1), dtype=np.uint8)
        np.savez(root / "rooted" / f"{split}.npz", x=x, y=np.arange(n) % 10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pixelda run (a translator, so adapt-images can read it) trained with --data-root R on a dataset under R."""
    if "rooted" not in _DOMAINS:
        register_domain(DomainSpec(
            name="rooted", task="classification", classes=DIGIT_CLASSES, channels=1, image_size=(32, 32),
            splits=("train", "test"), train_split="train", eval_split="test", dataset="rooted", reader=_reader,
            description="test domain with files under the data root",
        ))
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("rooted")
    _write(base / "root")
    with pytest.raises(SystemExit) as e:
        from uda_cli.cli.app import main

        main(["train", "--method", "pixelda", "--src", "rooted", "--tgt", "tiny-rgb", "--steps", "2",
              "--batch-size", "4", "--device", "cpu", "--eval-every", "0", "--data-root", str(base / "root"),
              "--out", str(base / "run"), *SMALL_PIXELDA])
    assert e.value.code == 0
    return base


@pytest.fixture
def empty_default(tmp_path, monkeypatch):
    """$UDA_DATA_ROOT points at an empty folder: only the run's own root has the data."""
    monkeypatch.setenv("UDA_DATA_ROOT", str(tmp_path / "empty"))


def test_evaluate_adapt_images_and_tsne_read_the_runs_data_root(trained, empty_default, tmp_path, capsys, monkeypatch):
    rd = trained / "run"
    code, _, err = run(["evaluate", str(rd), "--domain", "rooted:test", "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["num_samples"] == 40

    code, _, err = run(["adapt-images", str(rd), "--out", str(tmp_path / "exp"), "--limit", "5"], capsys)
    assert code == 0, err  # the default domain is the run's source, rooted:train
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["num_images"] == 5

    monkeypatch.setattr(T, "EARLY_ITERS", 50)
    monkeypatch.setattr(T, "ITERS", 50)
    code, _, err = run(["tsne", str(rd), "--src", "rooted:train", "--tgt", "tiny-rgb:test", "--samples", "40",
                        "--out", str(tmp_path / "map")], capsys)
    assert code == 0, err
    assert (tmp_path / "map" / "tsne.png").is_file()


def test_data_root_flag_wins_and_a_vanished_run_root_falls_back(trained, empty_default, tmp_path, capsys):
    rd = trained / "run"
    other = tmp_path / "other"
    _write(other, n=30)  # another copy, of another size: the report shows which was read
    code, _, err = run(["evaluate", str(rd), "--domain", "rooted:test", "--json", str(tmp_path / "a.json"),
                        "--data-root", str(other)], capsys)
    assert code == 0, err
    code, _, err = run(["evaluate", str(rd), "--domain", "rooted:test", "--json", str(tmp_path / "b.json")], capsys)
    assert code == 0, err
    a, b = (json.loads((tmp_path / f"{n}.json").read_text())["num_samples"] for n in "ab")
    assert (a, b) == (30, 40)

    (trained / "root").rename(trained / "moved")  # the run's root is gone: $UDA_DATA_ROOT (empty) is read
    try:
        code, _, err = run(["evaluate", str(rd), "--domain", "rooted:test"], capsys)
        assert code != 0 and len(err.strip().splitlines()) == 1
        assert "empty" in err and "uda download rooted" in err
    finally:
        (trained / "moved").rename(trained / "root")
