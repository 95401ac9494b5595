"""Parts of a split, ``DOMAIN:SPLIT[START:STOP]``: a labelled hold-out carved from a target's
train split, so that settings can be chosen without looking at its test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import run

from uda_cli.data.registry import (
    _DOMAINS,
    DomainSpec,
    get_domain,
    load_domain,
    parse_domain,
    register_domain,
    resolve_split,
    split_slice,
)
from uda_cli.errors import ConfigError


def test_split_slice_reads_python_slices_and_refuses_anything_else():
    assert split_slice("train") == ("train", None)
    assert split_slice("train[:-1000]") == ("train", slice(None, -1000))
    assert split_slice("train[50000:]") == ("train", slice(50000, None))
    assert split_slice("train [ 1 : 3 ]") == ("train", slice(1, 3))
    for bad in ("train[", "train]", "train[1]", "train[a:b]", "train[1:2:3]", "train[-:]", "train[1:2]x"):
        with pytest.raises(ConfigError) as e:
            split_slice(bad)
        assert len(str(e.value).splitlines()) == 1 and "train[:-1000]" in str(e.value)
    assert parse_domain("mnist:train[:-1000]") == ("mnist", "train[:-1000]")
    assert parse_domain("folder:/data/x:all[0:100]") == ("folder:/data/x", "all[0:100]")  # the : inside [] is not the split's
    assert parse_domain("folder:/data/x:all") == ("folder:/data/x", "all")


def test_resolve_split_checks_the_split_and_keeps_the_part():
    spec = get_domain("tiny-tgt")
    assert resolve_split(spec, "train[ :-10 ]", "test") == "train[:-10]"
    assert resolve_split(spec, None, "train") == "train"
    with pytest.raises(ConfigError, match="has no split 'val'; its splits are: train, test"):
        resolve_split(spec, "val[:10]", "train")


def test_a_part_is_that_slice_of_the_split_and_an_empty_part_is_refused():
    whole_x, whole_y = load_domain("tiny-tgt", "train")
    head_x, head_y = load_domain("tiny-tgt", "train[:-10]")
    tail_x, tail_y = load_domain("tiny-tgt", "train[-10:]")
    assert len(head_y) == 54 and len(tail_y) == 10
    assert (head_x == whole_x[:-10]).all() and (tail_x == whole_x[-10:]).all()
    assert (head_y == whole_y[:-10]).all() and (tail_y == whole_y[-10:]).all()
    assert len(load_domain("tiny-tgt", "train[-64:64]")[1]) == 64  # the bounds themselves are in
    for part in ("train[100:]", "train[-65:]", "train[:-70]", "train[3:65]"):
        with pytest.raises(ConfigError) as e:
            load_domain("tiny-tgt", part)
        assert str(e.value) == (f"tiny-tgt:{part} reaches past the 64 images of tiny-tgt:train; "
                                "pick START and STOP within -64..64")
    with pytest.raises(ConfigError) as e:
        load_domain("tiny-tgt", "train[10:5]")
    assert str(e.value) == ("tiny-tgt:train[10:5] selects no images (tiny-tgt:train has 64); "
                            "pick START below STOP, e.g. tiny-tgt:train[:-6]")


def test_a_part_does_not_keep_the_whole_split_in_memory():
    """A domain read at its native size and channels goes into the run without a copy, so a
    part taken as a view would keep every image of the split alive behind the run's tensor."""
    read = []

    def reader(_folder, _split):
        read.append((np.zeros((1000, 32, 32, 1), np.uint8), np.arange(1000) % 10))
        return read[-1]

    if "native-32" not in _DOMAINS:
        register_domain(DomainSpec(
            name="native-32", task="classification", classes=tuple("0123456789"), channels=1, image_size=(32, 32),
            splits=("train",), train_split="train", eval_split="train", dataset=None, reader=reader,
        ))
    whole, _ = load_domain("native-32", "train")
    assert np.shares_memory(whole.numpy(), read[-1][0])  # the premise: no copy of a whole split
    x, y = load_domain("native-32", "train[:100]")
    assert x.shape == (100, 1, 32, 32) and y.tolist() == list(range(10)) * 10
    assert not np.shares_memory(x.numpy(), read[-1][0]) and not np.shares_memory(y.numpy(), read[-1][1])


def test_train_on_part_of_the_target_and_evaluate_on_the_rest(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tgt:train[:-16]",
                        "--steps", "2", "--batch-size", "8", "--out", str(out), "--device", "cpu"], capsys)
    assert code == 0, err
    meta = json.loads((out / "config.json").read_text())
    assert meta["options"]["tgt"] == "tiny-tgt:train[:-16]"
    code, text, err = run(["evaluate", str(out), "--domain", "tiny-tgt:train[-16:]"], capsys)
    assert code == 0, err
    report = json.loads((out / "eval" / "tiny-tgt_train_-16___step00000002.json").read_text())
    assert report["domain"] == "tiny-tgt:train[-16:]" and report["num_samples"] == 16
    code, _, err = run(["evaluate", str(out), "--domain", "tiny-tgt:train[-16]"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1 and "SPLIT[START:STOP]" in err


def test_a_part_of_a_folder_domain(tmp_path):
    from PIL import Image

    for k, cls in enumerate(("a", "b")):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * (3 * k + i), np.uint8)).save(tmp_path / cls / f"{i}.png")
    whole_x, whole_y = load_domain(f"folder:{tmp_path}", "all")
    name, split = parse_domain(f"folder:{tmp_path}:all[1:-1]")
    assert split == "all[1:-1]"
    x, y = load_domain(name, split)
    assert len(y) == 4 and (x == whole_x[1:-1]).all() and y.tolist() == whole_y[1:-1].tolist()
