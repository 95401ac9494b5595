"""Segmentation domain readers (cityscapes, gta5, synthia, folder:PATH) on tiny files written
to tmp_path in each dataset's real layout and label format."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from uda_cli.data import pairs as pairs_module
from uda_cli.data.dense import read_png_unchanged
from uda_cli.data.labels import CITYSCAPES_CLASSES, IGNORE, SYNTHIA13, SYNTHIA16
from uda_cli.data.registry import get_domain, load_dense
from uda_cli.errors import ConfigError, DataError


# ---- writing files ----------------------------------------------------------------------------

def png_bytes(a: np.ndarray) -> bytes:
    """A PNG written by hand (zlib + struct): [H, W] grey or [H, W, 3] RGB, 8 or 16 bits by dtype."""
    a = np.asarray(a)
    h, w = a.shape[:2]
    colour_type = {2: 0, 3: 2}[a.ndim]
    depth = 16 if a.dtype == np.uint16 else 8
    rows = a.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\x00" + rows[r].tobytes() for r in range(h))  # filter 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write(path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(a))


def rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def palette_png(path, ids: np.ndarray) -> None:
    """A 'P'-mode PNG whose indices are ``ids``, with a colour palette (as GTA5's labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def check_sample(source, i: int, size: tuple[int, int]):
    image, label = source.read(i)
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, *size)
    assert label.dtype == torch.uint8 and tuple(label.shape) == size
    return image, label


# ---- 16-bit PNGs: torchvision keeps the values and the channel order -----------------------------

def test_decode_png_unchanged_gives_16_bit_channels_in_file_order(tmp_path):
    a = np.zeros((2, 3, 3), dtype=np.uint16)
    a[..., 0] = [[3, 4, 21], [1, 0, 300]]
    a[..., 1] = 1000
    a[..., 2] = 65535
    write(tmp_path / "x.png", a)
    got = read_png_unchanged(tmp_path / "x.png")
    assert got.dtype == np.uint16 and got.shape == (2, 3, 3)
    np.testing.assert_array_equal(got, a)


# ---- cityscapes ------------------------------------------------------------------------------

CS_IDS = np.array([[7, 26, 0, 33], [8, 24, 1, 255], [23, 21, 11, 5]], dtype=np.uint8)
CS_TRAIN = np.array([[0, 13, IGNORE, 18], [1, 11, IGNORE, IGNORE], [10, 8, 2, IGNORE]], dtype=np.uint8)


def cityscapes(root, splits=("train", "val"), labels=True):
    folder = root / "cityscapes"
    for split in splits:
        for k, (city, seq) in enumerate([("zurich", "000000_000019"), ("aachen", "000001_000019"),
                                         ("aachen", "000000_000019")]):
            stem = f"{city}_{seq}"
            write(folder / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(3, 4, k))
            if labels:
                write(folder / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", CS_IDS)
                write(folder / "gtFine" / split / city / f"{stem}_gtFine_color.png", rgb(3, 4))  # not read
    return folder


def test_cityscapes_reads_label_ids_as_train_ids(tmp_path):
    cityscapes(tmp_path)
    spec = get_domain("cityscapes")
    assert spec.task == "segmentation" and spec.classes == CITYSCAPES_CLASSES and spec.channels == 3
    assert (spec.image_size, spec.splits, spec.train_split, spec.eval_split) == (
        (512, 1024), ("train", "val", "test"), "train", "val")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete split warns nothing
        src = load_dense("cityscapes", "train", data_root=tmp_path)
    assert src.name == "cityscapes:train" and src.labelled and len(src) == 3
    assert src.stems == ["aachen_000000_000019", "aachen_000001_000019", "zurich_000000_000019"]
    image, label = check_sample(src, 0, (3, 4))
    np.testing.assert_array_equal(label.numpy(), CS_TRAIN)
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), rgb(3, 4, 2))
    assert len(load_dense("cityscapes", "val[1:]", data_root=tmp_path)) == 2


def test_cityscapes_test_split_has_no_labels(tmp_path):
    cityscapes(tmp_path, splits=("test",), labels=False)
    src = load_dense("cityscapes", "test", data_root=tmp_path)
    assert not src.labelled and len(src) == 3
    image, label = src.read(1)
    assert label is None and tuple(image.shape) == (3, 3, 4)


def test_cityscapes_missing_or_half_extracted(tmp_path):
    with pytest.raises(DataError, match=r"cityscapes is not downloaded.*run: uda download cityscapes"):
        load_dense("cityscapes", "val", data_root=tmp_path)
    cityscapes(tmp_path, labels=False)  # leftImg8bit unpacked, gtFine not
    with pytest.raises(DataError, match=r"gtFine/val.*missing.*run: uda download cityscapes") as e:
        load_dense("cityscapes", "val", data_root=tmp_path)
    assert "\n" not in str(e.value)
    (tmp_path / "cityscapes" / "gtFine" / "val").mkdir(parents=True)  # there, but empty
    with pytest.raises(DataError, match=r"no image/label pairs.*run: uda download cityscapes"):
        load_dense("cityscapes", "val", data_root=tmp_path)


# ---- gta5 ------------------------------------------------------------------------------------

GTA_IDS = np.array([[7, 26, 0, 33, 4], [8, 24, 1, 34, 17], [23, 21, 11, 5, 31], [7, 7, 7, 7, 7]], dtype=np.uint8)


def gta5(root):
    """00001 and 00002 paired (00002's label half size), 00003 without a label, 00004 without an image."""
    folder = root / "gta5"
    for k in (1, 2, 3):
        write(folder / "images" / f"{k:05d}.png", rgb(4, 5, k))
    palette_png(folder / "labels" / "00001.png", GTA_IDS)
    palette_png(folder / "labels" / "00002.png", GTA_IDS[::2, ::2])  # 3x2 for a 5x4 image
    palette_png(folder / "labels" / "00004.png", GTA_IDS)
    return folder


def test_gta5_reads_palette_indices_and_warns_once_about_odd_pairs(tmp_path):
    folder = gta5(tmp_path)
    spec = get_domain("gta5")
    assert (spec.task, spec.image_size, spec.splits, spec.train_split, spec.eval_split, spec.dataset) == (
        "segmentation", (720, 1280), ("all",), "all", "all", "gta5")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        src = load_dense("gta5", "all", data_root=tmp_path)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "2 pairs" in message and "1 labels differ in size" in message and "labels/00002.png is 3x2" in message
    assert "1 images without a label are skipped (images/00003.png)" in message
    assert "1 labels without an image are skipped (labels/00004.png)" in message
    assert src.stems == ["00001", "00002"]
    _image, label = check_sample(src, 0, (4, 5))
    expected = np.full(GTA_IDS.shape, IGNORE, dtype=np.uint8)
    for lid, tid in ((7, 0), (26, 13), (33, 18), (8, 1), (24, 11), (23, 10), (21, 8), (11, 2), (17, 5), (31, 16)):
        expected[GTA_IDS == lid] = tid
    np.testing.assert_array_equal(label.numpy(), expected)
    _image, label = check_sample(src, 1, (4, 5))  # the small label, resized (nearest) to its image
    assert set(np.unique(label.numpy())) <= set(np.unique(expected))
    assert (folder / ".uda-cache" / "sizes-all.json").is_file()


def test_gta5_sizes_come_from_the_cache_until_a_file_changes(tmp_path, monkeypatch):
    folder = gta5(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_dense("gta5", "all", data_root=tmp_path)
        calls = []
        real = pairs_module.image_size
        monkeypatch.setattr(pairs_module, "image_size", lambda p: calls.append(p.name) or real(p))
        assert len(load_dense("gta5", "all[:1]", data_root=tmp_path)) == 1
        assert calls == []  # every size from the cache
        palette_png(folder / "labels" / "00002.png", GTA_IDS)  # replaced: now the right size
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_dense("gta5", "all", data_root=tmp_path)
    assert calls == ["00002.png"]
    assert "differ in size" not in str(caught[0].message)


def test_gta5_missing_or_half_extracted(tmp_path):
    with pytest.raises(DataError, match=r"gta5 is not downloaded: no folder .*gta5; run: uda download gta5"):
        load_dense("gta5", "all", data_root=tmp_path)
    write(tmp_path / "gta5" / "images" / "00001.png", rgb(4, 5))
    with pytest.raises(DataError, match=r"gta5 is incomplete: its labels folder .*labels is missing.*"
                                        r"run: uda download gta5 --data-root") as e:
        load_dense("gta5", "all", data_root=tmp_path)
    assert "\n" not in str(e.value)
    palette_png(tmp_path / "gta5" / "labels" / "00009.png", GTA_IDS)
    with pytest.raises(DataError, match=r"gta5:all: no image/label pairs .*\(1 images, 1 labels with no partner\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dense("gta5", "all", data_root=tmp_path)
    with pytest.raises(ConfigError, match="no split 'train'"):
        load_dense("gta5", "train", data_root=tmp_path)


def test_gta5_damaged_label_is_one_line(tmp_path):
    folder = gta5(tmp_path)
    (folder / "labels" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # cut short
    with pytest.raises(DataError, match=r"00001.png is a truncated PNG") as e:
        load_dense("gta5", "all", data_root=tmp_path)
    assert "\n" not in str(e.value)


# ---- synthia ---------------------------------------------------------------------------------

SYN_IDS = np.array([[3, 4, 2, 21], [5, 7, 15, 9], [6, 1, 10, 17], [8, 19, 12, 11], [0, 22, 16, 20]], dtype=np.uint16)


def synthia(root):
    folder = root / "synthia" / "RAND_CITYSCAPES"
    write(folder / "RGB" / "0000000.png", rgb(5, 4))
    label = np.stack([SYN_IDS, SYN_IDS * 700 + 999, np.full_like(SYN_IDS, 65535)], axis=-1).astype(np.uint16)
    write(folder / "GT" / "LABELS" / "0000000.png", label)  # 16-bit, 3 channels, junk past 255 after the first
    write(folder / "GT" / "COLOR" / "0000000.png", rgb(5, 4))  # not read
    return folder


def test_synthia_reads_the_first_channel_of_16_bit_labels(tmp_path):
    synthia(tmp_path)
    spec = get_domain("synthia")
    assert (spec.task, spec.classes, spec.image_size, spec.splits, spec.dataset) == (
        "segmentation", CITYSCAPES_CLASSES, (760, 1280), ("all",), "synthia")
    assert spec.class_subsets == (("16", SYNTHIA16), ("13", SYNTHIA13))
    src = load_dense("synthia", "all", data_root=tmp_path)
    assert src.stems == ["0000000"]
    _image, label = check_sample(src, 0, (5, 4))
    expected = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 10, 11, 12], [13, 15, 17, 18],
                         [IGNORE, IGNORE, IGNORE, IGNORE]], dtype=np.uint8)  # void, lanemarking, terrain, train
    np.testing.assert_array_equal(label.numpy(), expected)


def test_synthia_half_extracted(tmp_path):
    write(tmp_path / "synthia" / "RAND_CITYSCAPES" / "RGB" / "0000000.png", rgb(5, 4))
    with pytest.raises(DataError, match=r"RAND_CITYSCAPES/GT/LABELS\) folder .* is missing.*run: uda download synthia"):
        load_dense("synthia", "all", data_root=tmp_path)


# ---- folder:PATH segmentation ----------------------------------------------------------------

FOLDER_IDS = np.array([[10, 20, 30, 0], [30, 30, 20, 10], [0, 0, 10, 10]], dtype=np.uint8)


def seg_folder(root, classes=None):
    """images/a.png (3x4), images/b.jpg (3x4) with grey labels of the values 10/20/30, 0 unlabelled."""
    write(root / "images" / "a.png", rgb(3, 4))
    root.joinpath("images").mkdir(exist_ok=True)
    Image.fromarray(rgb(3, 4, 1)).save(root / "images" / "b.jpg")
    write(root / "labels" / "a.png", FOLDER_IDS)
    write(root / "labels" / "b.png", FOLDER_IDS[::-1].copy())
    (root / "images" / "notes.txt").write_text("not an image")  # ignored
    (root / "classes.json").write_text(json.dumps(classes if classes is not None else {
        "names": ["road", "car", "sky"], "ids": [10, 20, 30], "ignore": [0],
        "colors": [[128, 64, 128], [0, 0, 142], [70, 130, 180]]}))
    return root


def test_folder_segmentation_reads_classes_json(tmp_path):
    import pickle

    root = seg_folder(tmp_path / "mine")
    spec = get_domain(f"folder:{root}")
    assert (spec.task, spec.classes, spec.channels, spec.image_size, spec.splits) == (
        "segmentation", ("road", "car", "sky"), 3, (3, 4), ("all",))
    assert spec.palette == ((128, 64, 128), (0, 0, 142), (70, 130, 180))
    src = load_dense(spec.name, "all")
    assert src.stems == ["a", "b"] and src.labelled
    _image, label = check_sample(src, 0, (3, 4))
    np.testing.assert_array_equal(label.numpy(), [[0, 1, 2, 255], [2, 2, 1, 0], [255, 255, 0, 0]])
    check_sample(src, 1, (3, 4))  # the JPEG image
    again = pickle.loads(pickle.dumps(src))  # DataLoader workers get a copy
    np.testing.assert_array_equal(again.read(0)[1].numpy(), label.numpy())


def test_folder_segmentation_default_ids_palette_and_16_bit_labels(tmp_path):
    root = tmp_path / "pal"
    write(root / "images" / "1.png", rgb(2, 3))
    write(root / "images" / "10.png", rgb(5, 6))  # natural order: 1 before 10; the first sets the size
    palette_png(root / "labels" / "1.png", [[0, 1, 2], [2, 1, 0]])  # indices, whatever the palette's colours
    palette_png(root / "labels" / "10.png", np.ones((5, 6)))
    (root / "classes.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    src = load_dense(f"folder:{root}", "all")
    assert get_domain(f"folder:{root}").image_size == (2, 3) and src.stems == ["1", "10"]
    np.testing.assert_array_equal(src.read(0)[1].numpy(), [[0, 1, 2], [2, 1, 0]])
    deep = tmp_path / "deep"
    write(deep / "images" / "x.png", rgb(2, 2))
    write(deep / "labels" / "x.png", np.array([[1000, 60000], [1000, 7]], dtype=np.uint16))
    (deep / "classes.json").write_text(json.dumps({"names": ["a", "b"], "ids": [1000, 60000], "ignore": [7]}))
    np.testing.assert_array_equal(load_dense(f"folder:{deep}", "all").read(0)[1].numpy(), [[0, 1], [0, 255]])


def one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_folder_segmentation_unknown_label_value_names_file_and_value(tmp_path):
    root = seg_folder(tmp_path / "f", {"names": ["road", "car", "sky"], "ids": [10, 20, 30]})  # no "ignore"
    src = load_dense(f"folder:{root}", "all")
    with pytest.raises(DataError, match=r"labels/a.png holds the label value 0, which .*classes.json lists neither "
                                        r'in "ids" nor in "ignore"') as e:
        src.read(0)
    one_line(e)


def test_folder_segmentation_pairs_are_checked(tmp_path):
    root = seg_folder(tmp_path / "size")
    write(root / "labels" / "b.png", FOLDER_IDS[:2])  # 4x2 for a 4x3 image
    with pytest.raises(DataError, match=r"labels/b.png is 4x2 but its image b.jpg is 4x3 \(W x H\)") as e:
        load_dense(f"folder:{root}", "all")
    one_line(e)
    root = seg_folder(tmp_path / "nolabel")
    write(root / "images" / "c.png", rgb(3, 4))
    with pytest.raises(DataError, match=r"images/c.png has no label: expected .*labels/c.png") as e:
        load_dense(f"folder:{root}", "all")
    one_line(e)
    root = seg_folder(tmp_path / "noimage")
    write(root / "labels" / "z.png", FOLDER_IDS)
    with pytest.raises(DataError, match=r"labels/z.png has no image: expected .*images/z.png"):
        load_dense(f"folder:{root}", "all")
    root = seg_folder(tmp_path / "twice")
    write(root / "images" / "b.png", rgb(3, 4))
    with pytest.raises(DataError, match=r"two files with the stem 'b'"):
        load_dense(f"folder:{root}", "all")
    root = seg_folder(tmp_path / "rgblabel")
    write(root / "labels" / "a.png", rgb(3, 4))
    with pytest.raises(DataError, match=r"labels/a.png has 3 channels; a label is a one-channel PNG"):
        load_dense(f"folder:{root}", "all").read(0)
    root = seg_folder(tmp_path / "jpglabel")
    Image.fromarray(FOLDER_IDS).save(root / "labels" / "q.jpg")
    with pytest.raises(DataError, match=r"q.jpg is not a PNG; labels must be lossless PNGs"):
        load_dense(f"folder:{root}", "all")


@pytest.mark.parametrize("classes, message", [
    ("{not json", r"classes.json is not valid JSON"),
    ([1, 2], r"classes.json is not a JSON object"),
    ({"names": []}, r'"names" must be a non-empty list'),
    ({"names": ["a", "a"]}, r"the class 'a' is named twice"),
    ({"names": ["a", "b"], "ids": [1]}, r'"ids" must list 2 label values'),
    ({"names": ["a", "b"], "ids": [1, 1]}, r"the label value 1 is given to two classes"),
    ({"names": ["a", "b"], "ignore": [1]}, r'the label value 1 is both a class in "ids" and in "ignore"'),
    ({"names": ["a", "b"], "ignore": "255"}, r'"ignore" must list label values'),
    ({"names": ["a", "b"], "colors": [[1, 2, 3]]}, r'"colors" must list 2 \[r, g, b\] colours'),
    ({"names": ["a"], "ignored": [255]}, r"unknown key 'ignored'"),
])
def test_folder_segmentation_bad_classes_json(tmp_path, classes, message):
    root = seg_folder(tmp_path / "bad", classes={"names": ["x"]})
    (root / "classes.json").write_text(classes if isinstance(classes, str) else json.dumps(classes))
    with pytest.raises(DataError, match=message) as e:
        get_domain(f"folder:{root}")
    assert "classes.json" in one_line(e)


def test_folder_segmentation_layout_errors(tmp_path):
    root = tmp_path / "nocls"
    write(root / "images" / "a.png", rgb(3, 4))
    write(root / "labels" / "a.png", FOLDER_IDS)
    with pytest.raises(ConfigError, match=r"has images/ and labels/ but no classes.json") as e:
        get_domain(f"folder:{root}")
    one_line(e)
    (root / "manifest.json").write_text(json.dumps({"task": "segmentation"}))
    with pytest.raises(ConfigError, match=r"segmentation folder .* but has no classes.json"):
        get_domain(f"folder:{root}")
    root = tmp_path / "nolabels"
    write(root / "images" / "a.png", rgb(3, 4))
    (root / "classes.json").write_text(json.dumps({"names": ["a"]}))
    with pytest.raises(ConfigError, match=r"no labels/ folder"):
        get_domain(f"folder:{root}")
    root = tmp_path / "noimages"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "classes.json").write_text(json.dumps({"names": ["a"]}))
    with pytest.raises(ConfigError, match=r"images holds no images"):
        get_domain(f"folder:{root}")
