"""`uda tsne`: class-balanced draw, proxy A-distance, the embedding, and the three outputs."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from uda_cli.cli.app import main
from uda_cli.viz import tsne as T
from uda_cli.viz.tsne import balanced_indices, effective_perplexity, embed, proxy_a_distance


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tsne") / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-rgb", "--steps", "3",
              "--batch-size", "8", "--device", "cpu", "--eval-every", "0", "--out", str(out)])
    assert e.value.code == 0
    return out


@pytest.fixture
def quick(monkeypatch):
    """Fewer t-SNE iterations: the command's plumbing, not the optimiser's convergence, is under test."""
    monkeypatch.setattr(T, "EARLY_ITERS", 50)
    monkeypatch.setattr(T, "ITERS", 50)
    monkeypatch.setattr(T, "CALLBACK_EVERY", 10)


# ---- the draw --------------------------------------------------------------------------------

def test_balanced_draw_fills_from_larger_classes():
    labels = np.array([0] * 50 + [1] * 50 + [2] * 3)
    idx = balanced_indices(labels, 30, seed=0)
    counts = Counter(labels[idx].tolist())
    assert len(idx) == 30 and len(set(idx.tolist())) == 30 and np.all(np.diff(idx) > 0)
    assert counts[2] == 3 and sorted((counts[0], counts[1])) == [13, 14]
    assert np.array_equal(idx, balanced_indices(labels, 30, seed=0))  # fixed seed, fixed draw
    assert not np.array_equal(idx, balanced_indices(labels, 30, seed=1))
    assert len(balanced_indices(labels, 1000, seed=0)) == len(labels)  # N above the domain's size: all of it


def test_balanced_draw_is_balanced_when_it_can_be():
    labels = np.repeat(np.arange(10), [100, 5, 30, 30, 30, 30, 30, 30, 30, 80])
    counts = Counter(labels[balanced_indices(labels, 100, seed=3)].tolist())
    assert counts[1] == 5 and all(counts[k] in (10, 11) for k in range(10) if k != 1)


# ---- proxy A-distance ------------------------------------------------------------------------

def test_proxy_a_distance_separable_and_identical():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    far = proxy_a_distance(a, rng.normal(size=(200, 8)) + np.r_[10.0, np.zeros(7)], seed=0)
    assert far["domain_error"] == 0 and far["proxy_a_distance"] == 2.0
    same = proxy_a_distance(a, rng.normal(size=(200, 8)), seed=0)
    assert abs(same["proxy_a_distance"]) < 0.5 and 0.3 < same["domain_error"] < 0.7
    assert same["l2"] in T.L2_GRID
    # d_A = 2 (1 - 2 eps), whatever eps is.
    assert same["proxy_a_distance"] == pytest.approx(2 * (1 - 2 * same["domain_error"]))


def test_proxy_a_distance_uses_the_balanced_error():
    """Few target points that a classifier cannot tell apart: always answering 'source' must not look good."""
    rng = np.random.default_rng(1)
    r = proxy_a_distance(rng.normal(size=(400, 4)), rng.normal(size=(20, 4)), seed=0)
    assert r["domain_error"] > 0.25  # plain error of "always source" would be 10/210 < 0.05


def test_effective_perplexity():
    assert effective_perplexity(30, 1000) == 30
    assert effective_perplexity(30, 31) == 10


def test_embed_separates_two_clusters(quick):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 20])
    xy, kl = embed(x, perplexity=8, seed=0)
    assert xy.shape == (60, 2) and np.isfinite(xy).all() and np.isfinite(kl)
    centre_gap = np.linalg.norm(xy[:30].mean(0) - xy[30:].mean(0))
    assert centre_gap > 3 * max(xy[:30].std(0).max(), xy[30:].std(0).max())
    assert np.array_equal(xy, embed(x, perplexity=8, seed=0)[0])  # seeded


# ---- the command -----------------------------------------------------------------------------

def test_tsne_writes_png_csv_and_json(run_dir, quick, capsys):
    code, out, err = run(["tsne", str(run_dir), "--src", "tiny-src:test", "--tgt", "tiny-rgb:test", "--samples", "25",
                          "--perplexity", "50", "--device", "cpu"], capsys)
    assert code == 0, err
    folder = run_dir / "tsne"  # the default --out of a run
    assert "proxy A-distance" in out and str(folder / "tsne.png") in out
    assert "features tiny-src:test" in err and "t-SNE: 100/100" in err  # progress, plain lines off a terminal

    with Image.open(folder / "tsne.png") as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 1000 and im.size[1] > 500

    rows = list(csv.DictReader((folder / "tsne.csv").open()))
    assert list(rows[0]) == ["x", "y", "domain", "label", "index"]
    assert len(rows) == 50
    by_domain = Counter(r["domain"] for r in rows)
    assert by_domain == {"tiny-src:test": 25, "tiny-rgb:test": 25}
    src_labels = Counter(r["label"] for r in rows if r["domain"] == "tiny-src:test")
    assert set(src_labels) == set("0123456789") and max(src_labels.values()) - min(src_labels.values()) <= 1
    # The label column is the image's class: tiny domains label image i with i % 10.
    assert all(int(r["index"]) % 10 == int(r["label"]) for r in rows)
    assert all(np.isfinite(float(r["x"])) and np.isfinite(float(r["y"])) for r in rows)

    rep = json.loads((folder / "tsne.json").read_text())
    assert rep["src"] == "tiny-src:test" and rep["tgt"] == "tiny-rgb:test"
    assert rep["num_samples"] == {"src": 25, "tgt": 25} and rep["feature_dim"] > 0
    assert -2 <= rep["proxy_a_distance"] <= 2
    assert rep["proxy_a_distance"] == pytest.approx(2 * (1 - 2 * rep["domain_error"]))
    assert rep["tsne"]["perplexity"] == pytest.approx(49 / 3) and rep["tsne"]["perplexity_requested"] == 50
    assert rep["tsne"]["negative_gradient_method"] == "fft" and rep["settings"]["seed"] == 0


def test_tsne_defaults_to_the_runs_test_splits(run_dir, quick, tmp_path, capsys):
    code, out, err = run(["tsne", str(run_dir / "checkpoints" / "step-00000003.safetensors"), "--samples", "8",
                          "--device", "cpu", "--out", str(tmp_path / "map")], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "map" / "tsne.json").read_text())
    assert (rep["src"], rep["tgt"]) == ("tiny-src:test", "tiny-rgb:test")
    assert len((tmp_path / "map" / "tsne.csv").read_text().splitlines()) == 1 + 16


@pytest.mark.parametrize("args,message", [
    (["--src", "tiny-tgt:test", "--tgt", "tiny-tgt:test"], "--src and --tgt are both tiny-tgt:test"),
    (["--src", "tiny-src:valid"], "no split 'valid'"),
    (["--samples", "0"], "--samples:"),
    (["--tgt", "nowhere"], "--tgt: unknown domain 'nowhere'"),
])
def test_refusals_are_one_line(run_dir, tmp_path, capsys, args, message):
    code, _, err = run(["tsne", str(run_dir), "--out", str(tmp_path / "m"), "--device", "cpu", *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_outside_a_run_needs_out(run_dir, tmp_path, capsys):
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes((run_dir / "checkpoints" / "step-00000003.safetensors").read_bytes())
    code, _, err = run(["tsne", str(lone), "--device", "cpu"], capsys)
    assert code == 2 and "pass --out DIR" in err
