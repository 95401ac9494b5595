"""folder:PATH domains: parsing, reading, caching, errors, and a train -> evaluate round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from uda_cli.cli.app import main
from uda_cli.config import TrainOptions
from uda_cli.data.registry import get_domain, load_domain, parse_domain
from uda_cli.errors import ConfigError, DataError


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def grey(value, size=(16, 16)):
    return np.full(size, value, dtype=np.uint8)


@pytest.fixture
def folder(tmp_path):
    """cat/ and dog/ (ImageFolder style), mixed sizes and modes, plus things to ignore."""
    root = tmp_path / "pets"
    save(root / "cat" / "1.png", grey(10))  # the first image: it sets the size and channels
    save(root / "cat" / "2.png", grey(20, (8, 8)))  # another size: resized while reading
    save(root / "cat" / "10.png", grey(30))
    save(root / "dog" / "a.png", np.full((16, 16, 3), 200))  # colour in a grey folder: converted
    (root / "dog" / ".a.png.tmp-123").write_bytes(b"half an image")  # an interrupted atomic write
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save(root / "preview.png", grey(0))  # files beside the class folders are not images of a class
    return root


# ---- parsing ----------------------------------------------------------------------------------

def test_parse_keeps_colons_in_existing_paths_and_reads_a_trailing_split(tmp_path):
    assert parse_domain("usps:test") == ("usps", "test")
    assert parse_domain("folder:/data/x") == ("folder:/data/x", None)
    assert parse_domain("folder:/data/x:all") == ("folder:/data/x", "all")  # what the trainer writes back
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_domain(f"folder:{odd}") == (f"folder:{odd}", None)
    assert parse_domain(f"folder:{odd}:all") == (f"folder:{odd}", "all")
    assert parse_domain("folder:C:\\data\\x") == ("folder:C:\\data\\x", None)  # the tail is not a word


# ---- reading ----------------------------------------------------------------------------------

def test_reads_classes_sizes_and_modes(folder):
    spec = get_domain(f"folder:{folder}")
    assert spec.name == f"folder:{folder.resolve()}"
    assert spec.classes == ("cat", "dog") and spec.task == "classification"
    assert spec.channels == 1 and spec.image_size == (16, 16)
    assert spec.splits == ("all",) and spec.train_split == spec.eval_split == "all"
    x, y = load_domain(spec.name, "all")
    assert x.dtype == torch.uint8 and tuple(x.shape) == (4, 1, 16, 16)
    assert y.tolist() == [0, 0, 0, 1]
    # natural order within a class (1, 2, 10), the 8x8 image resized, the colour image made grey
    assert x[:, 0, 8, 8].tolist() == [10, 20, 30, 200]


def test_first_image_decides_size_and_channels(tmp_path):
    root = tmp_path / "rgb"
    save(root / "a" / "0.png", np.zeros((20, 24, 3)))
    save(root / "b" / "0.png", np.zeros((10, 10)))
    spec = get_domain(f"folder:{root}")
    assert spec.channels == 3 and spec.image_size == (20, 24)
    x, _ = load_domain(spec.name, "all")
    assert tuple(x.shape) == (2, 3, 20, 24)


def test_manifest_gives_class_order_and_format(tmp_path):
    root = tmp_path / "export"
    for c in ("2", "10"):
        save(root / c / "0.png", grey(int(c)))
    (root / "manifest.json").write_text(json.dumps({"task": "classification", "classes": ["2", "10"],
                                                    "image_size": [32, 32], "channels": 3}))
    spec = get_domain(f"folder:{root}")
    assert spec.classes == ("2", "10")  # not sorted as text: the manifest's order
    assert spec.channels == 3 and spec.image_size == (32, 32)
    x, y = load_domain(spec.name, "all")
    assert tuple(x.shape) == (2, 3, 32, 32) and y.tolist() == [0, 1]


def test_cache_per_path_is_rebuilt_when_the_folder_changes(folder):
    a = get_domain(f"folder:{folder}")
    assert get_domain(f"folder:{folder}/../pets") is a  # one resolved path, one spec
    save(folder / "bird" / "0.png", grey(5))
    b = get_domain(f"folder:{folder}")
    assert b is not a and b.classes == ("bird", "cat", "dog")


def test_images_added_after_the_spec_are_read(folder):
    spec = get_domain(f"folder:{folder}")
    save(folder / "dog" / "b.png", grey(1))
    assert load_domain(spec.name, "all")[0].shape[0] == 5


# ---- errors -----------------------------------------------------------------------------------

def test_problems_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no folder at") as e:
        get_domain(f"folder:{tmp_path / 'missing'}")
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no class sub-folders"):
        get_domain(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no images"):
        get_domain(f"folder:{tmp_path / 'noimg'}")
    with pytest.raises(ConfigError, match="needs a path"):
        get_domain("folder:")


def test_other_splits_and_segmentation_folders_are_refused(folder, tmp_path):
    spec = get_domain(f"folder:{folder}")
    with pytest.raises(ConfigError, match="no split 'test'; its splits are: all"):
        load_domain(spec.name, "test")
    seg = tmp_path / "seg"
    save(seg / "images" / "a.png", grey(0))
    save(seg / "labels" / "a.png", grey(0))
    (seg / "manifest.json").write_text(json.dumps({"task": "segmentation"}))
    with pytest.raises(ConfigError, match="segmentation folder"):
        get_domain(f"folder:{seg}")


def test_unreadable_image_is_a_data_error(folder):
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    spec = get_domain(f"folder:{folder}")
    with pytest.raises(DataError, match="broken.png is not a readable image"):
        load_domain(spec.name, "all")


def test_config_check_domain_works_unchanged(folder, tmp_path):
    TrainOptions(method="source-only", src=f"folder:{folder}", tgt=f"folder:{folder}:all")
    with pytest.raises(ValidationError, match="no folder at"):
        TrainOptions(method="source-only", src=f"folder:{tmp_path / 'nope'}", tgt="tiny-tgt")


def test_unknown_domain_mentions_folders(capsys):
    code, _, err = run(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", "tiny-tg"], capsys)
    assert code == 2 and "folder:PATH" in err


# ---- a run on a folder, evaluated by its default (the folder name written back) ---------------

def test_train_on_folder_then_evaluate_by_default(tmp_path, capsys):
    torch.set_num_threads(1)
    root = tmp_path / "digits"
    rng = np.random.default_rng(0)
    for k in range(10):
        for i in range(2):
            save(root / str(k) / f"{i}.png", rng.integers(0, 255, (32, 32)))
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "--method", "source-only", "--src", "tiny-src", "--tgt", f"folder:{root}",
                          "--steps", "2", "--batch-size", "4", "--device", "cpu", "--out", str(run_dir)], capsys)
    assert code == 0, err
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["tgt_eval"] == f"folder:{root.resolve()}:all"
    code, out, err = run(["evaluate", str(run_dir), "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"folder:{root.resolve()}:all" in out and "(20 images)" in out
