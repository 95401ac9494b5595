"""`uda tsne` on segmentation runs: per-pixel features sampled class-balanced at the feature
map's resolution (ignore pixels skipped), the three outputs, tpld's easy/hard colouring, and
the one-line refusals. Tiny GTA5/Cityscapes-layout files (``_street``) and 2-step runs."""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_segmentation_run import _street, cli
from test_self_training_run import TPLD
from uda_cli.data.labels import CITYSCAPES_CLASSES
from uda_cli.data.registry import load_dense
from uda_cli.viz import tsne as T
from uda_cli.viz.tsne import PixelPool


def train(root: Path, run: Path, *extra: str, method: str = "source-only") -> list[str]:
    return ["train", "--method", method, "--src", "gta5", "--tgt", "cityscapes", "--data-root", str(root),
            "--set", "model=deeplabv2_small", "--set", "pretrained=none", "--set", "lr=0.01",
            "--src-size", "96x48", "--tgt-size", "80x40", "--batch-size", "2", "--device", "cpu",
            "--eval-every", "0", "--workers", "0", "--out", str(run), *extra]


@pytest.fixture(scope="module")
def street(tmp_path_factory) -> Path:
    root = _street(tmp_path_factory.mktemp("street"))
    # cityscapes:test: images, no labels (as the real split's are withheld)
    for p in (root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"):
        dest = root / "cityscapes" / "leftImg8bit" / "test" / p.parent.name / p.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    return root


@pytest.fixture(scope="module")
def seg_run(street, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("seg") / "run"
    code, _, err = _cli(train(street, run, "--steps", "2"))
    assert code == 0, err
    return run


@pytest.fixture(scope="module")
def tpld_run(street, tmp_path_factory) -> Path:
    """2 warm-up steps, a phase-1 round, a phase-2 round (1 easy, 2 hard target images)."""
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("tpld") / "run"
    code, _, err = _cli(train(street, run, *TPLD, method="tpld"))
    assert code == 0, err
    return run


class _Capture:
    def readouterr(self):  # cli() reads capsys; the module fixtures have none
        return type("O", (), {"out": "", "err": ""})()


def _cli(args):
    return cli(args, _Capture())


@pytest.fixture
def quick(monkeypatch):
    """Fewer t-SNE iterations: the sampling and the outputs are under test, not the optimiser."""
    monkeypatch.setattr(T, "EARLY_ITERS", 50)
    monkeypatch.setattr(T, "ITERS", 50)
    monkeypatch.setattr(T, "CALLBACK_EVERY", 10)


def rows_of(folder: Path) -> list[dict]:
    return list(csv.DictReader((folder / "tsne.csv").open()))


def small_labels(root: Path, domain: str, fmap: tuple[int, int]) -> dict[str, np.ndarray]:
    """Each image's train-id labels at the feature map's (h, w), nearest (the label pixel under
    each cell's centre), computed here with numpy."""
    name, split = domain.split(":")
    source = load_dense(name, split, root)
    out = {}
    for i in range(len(source)):
        lab = source.read(i)[1].numpy()
        h, w = fmap
        r = np.minimum(((np.arange(h) + 0.5) * lab.shape[0] / h).astype(int), lab.shape[0] - 1)
        c = np.minimum(((np.arange(w) + 0.5) * lab.shape[1] / w).astype(int), lab.shape[1] - 1)
        out[source.stem(i)] = lab[np.ix_(r, c)]
    return out


def assert_balanced(counts: Counter, available: dict[str, int], n: int) -> None:
    """Class-balanced as promised: n points in all (or every available pixel), and a class below
    the largest count by more than one has given every pixel it had."""
    assert sum(counts.values()) == min(n, sum(available.values()))
    top = max(counts.values())
    for k, have in available.items():
        assert counts.get(k, 0) <= have and (counts.get(k, 0) >= top - 1 or counts.get(k, 0) == have), (k, counts)


# ---- the pool --------------------------------------------------------------------------------

def test_pixel_pool_keeps_a_capped_seeded_sample_and_skips_ignore():
    rng = np.random.default_rng(0)
    pools = [PixelPool(3, 10, seed=5) for _ in range(2)]
    for image in range(4):
        labels = rng.choice([0, 1, 2, 255], size=(6, 8), p=[0.6, 0.3, 0.02, 0.08])
        feats = np.stack([labels, np.full_like(labels, image), rng.integers(0, 9, labels.shape)], -1).astype(float)
        for p in pools:
            p.add(feats, labels, image)
    pool = pools[0]
    assert pool.counts()[0] == 10 and pool.counts()[1] == 10 and pool.counts()[2] <= 10
    f, y, where = pool.draw(12, seed=1)
    assert set(y.tolist()) <= {0, 1, 2} and len(y) == 12
    assert np.array_equal(f[:, 0], y) and np.array_equal(f[:, 1], where[:, 0])  # vectors travel with their pixel
    c = Counter(y.tolist())
    assert c[2] == min(pool.counts()[2], 4) and abs(c[0] - c[1]) <= 1
    f2, y2, w2 = pools[1].draw(12, seed=1)
    assert np.array_equal(f, f2) and np.array_equal(where, w2)  # seeded


# ---- the command -----------------------------------------------------------------------------

def test_segmentation_tsne_writes_balanced_pixels(street, seg_run, quick, capsys):
    code, out, err = cli(["tsne", str(seg_run), "--samples", "63", "--perplexity", "10", "--workers", "0",
                          "--device", "cpu"], capsys)
    assert code == 0, err
    folder = seg_run / "tsne"
    assert "pixels" in out and "proxy A-distance" in out and "features cityscapes:val" in err

    with Image.open(folder / "tsne.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 1000

    rep = json.loads((folder / "tsne.json").read_text())
    assert (rep["src"], rep["tgt"]) == ("gta5:all", "cityscapes:val")  # the run's source; its target evaluation split
    assert rep["unit"] == "pixels" and -2 <= rep["proxy_a_distance"] <= 2
    assert rep["proxy_a_distance"] == pytest.approx(2 * (1 - 2 * rep["domain_error"]))
    assert rep["sizes"] == {"src": [48, 96], "tgt": [40, 80]}  # each domain at the size the run read it
    assert rep["feature_map"] == {"src": [12, 24], "tgt": [10, 20]}  # deeplabv2_small: stride 4
    assert rep["images_read"] == {"src": 5, "tgt": 2}  # 12 of 19 classes never show up: every image is read
    assert rep["feature_dim"] > 0 and rep["settings"]["max_images"] == 100

    rows = rows_of(folder)
    assert list(rows[0]) == ["x", "y", "domain", "label", "index", "image", "row", "col"]
    for domain, key in (("gta5:all", "src"), ("cityscapes:val", "tgt")):
        mine = [r for r in rows if r["domain"] == domain]
        truth = small_labels(street, domain, tuple(rep["feature_map"][key]))
        # Each point's class is its pixel's label at the feature map's resolution: never ignore.
        assert all(CITYSCAPES_CLASSES[truth[r["image"]][int(r["row"]), int(r["col"])]] == r["label"] for r in mine)
        assert len({(r["image"], r["row"], r["col"]) for r in mine}) == len(mine)  # no pixel twice
        everything = np.concatenate([v.ravel() for v in truth.values()])
        available = {CITYSCAPES_CLASSES[k]: int(c) for k, c in Counter(everything.tolist()).items() if k != 255}
        assert_balanced(Counter(r["label"] for r in mine), available, 63)
        assert rep["num_samples"][key] == len(mine) == min(63, sum(available.values()))
        assert rep["per_class"][key] == {c: sum(r["label"] == c for r in mine) for c in CITYSCAPES_CLASSES}
    assert any(255 in v for v in small_labels(street, "cityscapes:val", (10, 20)).values())  # ignore was there to skip


def test_reading_stops_at_max_images_and_is_seeded(seg_run, quick, tmp_path, capsys):
    args = ["tsne", str(seg_run), "--samples", "20", "--max-images", "1", "--workers", "0", "--device", "cpu"]
    assert cli([*args, "--out", str(tmp_path / "a")], capsys)[0] == 0
    assert cli([*args, "--out", str(tmp_path / "b"), "--batch-size", "1"], capsys)[0] == 0
    rep = json.loads((tmp_path / "a" / "tsne.json").read_text())
    assert rep["images_read"] == {"src": 1, "tgt": 1}
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    key = [(r["domain"], r["image"], r["row"], r["col"]) for r in a]
    assert key == [(r["domain"], r["image"], r["row"], r["col"]) for r in b]
    assert len({r["image"] for r in a if r["domain"] == "gta5:all"}) == 1


def test_tpld_easy_hard_colours_target_pixels(tpld_run, quick, capsys):
    stats = json.loads((tpld_run / "rounds" / "01" / "stats.json").read_text())
    code, out, err = cli(["tsne", str(tpld_run), "--easy-hard", "--samples", "40", "--perplexity", "10",
                          "--workers", "0", "--device", "cpu"], capsys)
    assert code == 0, err
    rep = json.loads((tpld_run / "tsne" / "tsne.json").read_text())
    assert rep["tgt"] == "cityscapes:train"  # the lists name training images
    assert rep["easy_hard"]["round"] == 1 and rep["easy_hard"]["easy_images"] == len(stats["easy"]) == 1
    rows = rows_of(tpld_run / "tsne")
    assert list(rows[0])[-1] == "difficulty"
    tgt = [r for r in rows if r["domain"] == "cityscapes:train"]
    assert all(r["difficulty"] == ("easy" if r["image"] in stats["easy"] else "hard") for r in tgt)
    assert {r["difficulty"] for r in tgt} == {"easy", "hard"}
    assert all(r["difficulty"] == "" for r in rows if r["domain"] == "gta5:all")
    assert rep["easy_hard"]["points"] == dict(Counter(r["difficulty"] for r in tgt))
    with Image.open(tpld_run / "tsne" / "tsne.png") as im:
        assert im.size[0] > 1800  # the third panel


def test_refusals_are_one_line(street, seg_run, tpld_run, tmp_path, capsys):
    no_phase2 = tmp_path / "no-phase2"
    shutil.copytree(tpld_run, no_phase2)
    stats = no_phase2 / "rounds" / "01" / "stats.json"
    data = json.loads(stats.read_text())
    del data["easy"], data["hard"]
    stats.write_text(json.dumps(data))
    cases = [
        ([str(seg_run), "--easy-hard"], "is a source-only run"),
        ([str(no_phase2), "--easy-hard"], "has no phase-2 round"),
        ([str(tpld_run), "--easy-hard", "--tgt", "gta5"], "target training images (cityscapes:train), not gta5:all"),
        ([str(tpld_run), "--easy-hard", "--tgt", "cityscapes:val"], "(cityscapes:train), not cityscapes:val"),
        ([str(tpld_run), "--easy-hard", "--tgt", "cityscapes:train[:0]"], "selects no images"),
        ([str(seg_run), "--src", "nowhere"], "unknown domain 'nowhere'"),
        ([str(seg_run), "--tgt", "mnist2000"], "is not a segmentation domain of the checkpoint's classes"),
        ([str(seg_run), "--tgt", "mnist-scenes-mini"], "is not a segmentation domain of the checkpoint's classes"),
        ([str(seg_run), "--tgt", "cityscapes:test"], "cityscapes:test has no labels"),
    ]
    for args, message in cases:
        code, _, err = cli(["tsne", *args, "--out", str(tmp_path / "m"), "--workers", "0", "--device", "cpu"],
                           capsys)
        lines = [x for x in err.strip().splitlines() if not x.startswith("warning:")]  # gta5's odd label, once
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
    assert not (tmp_path / "m" / "tsne.csv").exists()


def test_segmentation_options_are_refused_on_classification_runs(tmp_path, capsys):
    run = tmp_path / "digits"
    code, _, err = cli(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-rgb", "--steps", "1",
                        "--batch-size", "4", "--device", "cpu", "--eval-every", "0", "--out", str(run)], capsys)
    assert code == 0, err
    for flag in (["--max-images", "3"], ["--easy-hard"], ["--workers", "0"]):
        code, _, err = cli(["tsne", str(run), *flag, "--device", "cpu"], capsys)
        assert code == 2 and "applies to segmentation runs" in err and len(err.strip().splitlines()) == 1, err
