"""Label tables of the segmentation benchmarks: Cityscapes' 19 train ids, SYNTHIA's 16 and 13.

Cityscapes (``cityscapesscripts/helpers/labels.py``, mcordts/cityscapesScripts): label id ->
train id for the 19 evaluated classes; every other id (0-6, 9, 10, 14-16, 18, 29, 30, -1) is
ignored (255). GTA5's palette PNGs hold the same label ids and map through the same table.

SYNTHIA-RAND-CITYSCAPES: its 16-bit ``GT/LABELS`` PNGs hold a SYNTHIA class id in the first
channel (README order: 0 void, 1 sky, 2 building, 3 road, ...). We map them to the
*Cityscapes* train ids of the 16 shared classes, the table ADVENT/DADA and CRST use (the
compact 16-id numbering they train on is these 16 classes in Cityscapes order). So a SYNTHIA
run and a GTA5 run predict the same 19-class space; SYNTHIA never labels terrain, truck or
train, and evaluation reports mIoU over the 16 (``SYNTHIA16``) and 13 (``SYNTHIA13``:
the 16 without wall, fence, pole) as the papers do, besides the 19.
Departure: CRST also maps SYNTHIA's 22 lanemarking to road; ADVENT, DADA and DAFormer
ignore it, and so do we.

This module imports numpy only.
"""

from __future__ import annotations

import numpy as np

IGNORE = 255

# (name, Cityscapes label id, train id, colour) for the 19 evaluated classes, in train-id order.
CITYSCAPES_19: tuple[tuple[str, int, int, tuple[int, int, int]], ...] = (
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("pole", 17, 5, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(c[0] for c in CITYSCAPES_19)
CITYSCAPES_LABEL_IDS: tuple[int, ...] = tuple(c[1] for c in CITYSCAPES_19)  # train id -> label id
CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = tuple(c[3] for c in CITYSCAPES_19)

# SYNTHIA class id -> Cityscapes train id (the 16 classes SYNTHIA shares with Cityscapes).
SYNTHIA_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}
# Train ids of the 16 and 13 classes the SYNTHIA->Cityscapes papers average over.
SYNTHIA16: tuple[int, ...] = tuple(sorted(SYNTHIA_TO_TRAIN.values()))
SYNTHIA13: tuple[int, ...] = tuple(t for t in SYNTHIA16 if t not in (3, 4, 5))  # without wall, fence, pole


def lut(mapping: dict[int, int], size: int = 256) -> np.ndarray:
    """A lookup table ``size`` long: ``lut[id] = train id``, IGNORE elsewhere (uint8)."""
    table = np.full(size, IGNORE, dtype=np.uint8)
    for k, v in mapping.items():
        table[k] = v
    return table


CITYSCAPES_ID_TO_TRAIN: np.ndarray = lut({lid: tid for _n, lid, tid, _c in CITYSCAPES_19})
# 16-bit SYNTHIA ids reach 65535 in principle; the table covers the uint16 range.
SYNTHIA_ID_TO_TRAIN: np.ndarray = lut(SYNTHIA_TO_TRAIN, 65536)


def train_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids (255 ignore) -> Cityscapes label ids, what cityscapesScripts' evaluator reads
    (ignored pixels become 0, "unlabeled")."""
    table = np.zeros(256, dtype=np.uint8)
    for _n, lid, tid, _c in CITYSCAPES_19:
        table[tid] = lid
    return table[train_ids]


def colorize(train_ids: np.ndarray, palette: tuple[tuple[int, int, int], ...] = CITYSCAPES_PALETTE) -> np.ndarray:
    """Train ids [H, W] -> an RGB uint8 image [H, W, 3] in ``palette`` (ignore: black)."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)
    return table[train_ids]
