"""Segmentation evaluation: IoU/mIoU reference math on hand-made confusion matrices, test-time
flip and scales, scoring at the label's resolution, sharding, saved predictions, and the
oracle: cityscapesScripts' own evaluator reading our saved PNGs gives our numbers."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uda_cli.data import labels as L
from uda_cli.data.dense import DenseSource, FilePairSource, LookupLabels
from uda_cli.data.transforms import normalize, resize_uint8
from uda_cli.engine.inference import predict_logits
from uda_cli.engine.metrics import classification_report, confusion_matrix, segmentation_report
from uda_cli.engine.seg_eval import _accumulate, evaluate_segmentation, voc_palette
from uda_cli.errors import DataError, OutputError


# ---- a minimal method and source ---------------------------------------------------------------

class FakeMethod:
    """What evaluation needs of a Method: spec, nets, eval/train, predict."""

    def __init__(self, net: nn.Module, classes):
        self.spec = SimpleNamespace(classes=tuple(classes), num_classes=len(classes), task="segmentation")
        self.nets = nn.ModuleDict({"G": net})

    def predict(self, x):
        return self.nets["G"](x)

    def train(self, mode: bool = True):
        self.nets.train(mode)
        return self

    def eval(self):
        return self.train(False)


class PixelNet(nn.Module):
    """A 1x1 convolution (flip-equivariant), optionally at stride ``stride`` (average pooling)."""

    def __init__(self, k: int, stride: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, k, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)
        self.stride = stride

    def forward(self, x):
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return self.conv(x)


class ColourCodeNet(nn.Module):
    """Predicts class c where the red channel reads 10 * c (the nearest code wins), at stride 2."""

    def __init__(self, k: int):
        super().__init__()
        self.register_buffer("codes", torch.arange(k, dtype=torch.float32).view(1, k, 1, 1) * 10)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        r = F.avg_pool2d((x[:, :1] + 1) * 127.5, 2)
        return -((r - self.codes) ** 2) / 100 + self.dummy


class TensorSource(DenseSource):
    def __init__(self, samples, name="toy:val", labelled=True):
        self.samples, self.name, self.labelled = samples, name, labelled

    def __len__(self):
        return len(self.samples)

    def stem(self, i):
        return f"img{i:03d}"

    def read(self, i):
        return self.samples[i]


def reference_pred(method, image, size, out_size):
    """ADVENT's protocol written out: resize, normalise, predict, upsample (align_corners=True), argmax."""
    x = normalize(resize_uint8(image[None], size))
    with torch.no_grad():
        logits = method.predict(x)
    return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=True).argmax(1)[0]


def random_samples(n, shapes, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        label = torch.randint(0, k, (h, w), generator=g, dtype=torch.uint8)
        label[: h // 8] = L.IGNORE  # an ignored band
        out.append((image, label))
    return out


# ---- reference math ------------------------------------------------------------------------------

def test_iou_hand_computed_with_absent_classes():
    # rows true, cols predicted. Class 2: in neither labels nor predictions (no IoU, left out of
    # the mean). Class 3: predicted once, never labelled (IoU 0, counted).
    cm = torch.tensor([[5, 1, 0, 0],
                       [2, 3, 0, 1],
                       [0, 0, 0, 0],
                       [0, 0, 0, 0]])
    r = segmentation_report(cm, ["a", "b", "c", "d"], subsets=(("ac", (0, 2)), ("c", (2,))))
    assert r["metric"] == "miou"
    assert r["per_class_iou"] == {"a": 5 / 8, "b": 3 / 7, "c": None, "d": 0.0}
    assert r["miou"] == pytest.approx((5 / 8 + 3 / 7 + 0) / 3, abs=1e-12)
    assert r["miou_ac"] == pytest.approx(5 / 8, abs=1e-12)
    assert r["miou_c"] is None
    assert r["pixel_accuracy"] == pytest.approx(8 / 12)
    assert r["mean_class_accuracy"] == pytest.approx((5 / 6 + 3 / 6) / 2)
    assert r["per_class_accuracy"] == {"a": 5 / 6, "b": 0.5, "c": None, "d": None}
    assert r["num_pixels"] == 12
    assert r["classes"] == ["a", "b", "c", "d"]
    assert r["confusion_matrix"] == cm.tolist()


def test_confusion_from_pixels_drops_ignore_and_matches_device_accumulator():
    target = torch.tensor([[0, 0, 1, 255], [1, 1, 3, 255]])
    pred = torch.tensor([[0, 1, 1, 2], [0, 1, 3, 0]])
    want = torch.zeros(4, 4, dtype=torch.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 0), (1, 1), (3, 3)]:
        want[t, p] += 1
    assert torch.equal(confusion_matrix(pred.flatten(), target.flatten(), 4), want)
    flat = torch.zeros(17, dtype=torch.int64)
    _accumulate(flat, pred[None], target[None].to(torch.uint8), 4)
    assert torch.equal(flat[:16].view(4, 4), want)
    assert int(flat[16]) == 2  # the ignored pixels' bin


def test_subsets_16_13_match_advent_nanmean():
    rng = np.random.default_rng(0)
    hist = rng.integers(0, 50, size=(19, 19))
    hist[16, :] = 0  # "train" never labelled ...
    hist[:, 16] = 0  # ... nor predicted: no IoU
    hist[14, :] = 0  # "truck" predicted, never labelled: IoU 0
    # ADVENT's per_class_iu / nanmean (advent/utils/func.py)
    with np.errstate(divide="ignore", invalid="ignore"):
        iu = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    r = segmentation_report(torch.from_numpy(hist), L.CITYSCAPES_CLASSES,
                            subsets=(("16", L.SYNTHIA16), ("13", L.SYNTHIA13)))
    assert r["per_class_iou"]["train"] is None and r["per_class_iou"]["truck"] == 0.0
    assert r["miou"] == pytest.approx(np.nanmean(iu), abs=1e-12)
    assert r["miou_16"] == pytest.approx(np.nanmean(iu[list(L.SYNTHIA16)]), abs=1e-12)
    assert r["miou_13"] == pytest.approx(np.nanmean(iu[list(L.SYNTHIA13)]), abs=1e-12)
    assert len(L.SYNTHIA16) == 16 and len(L.SYNTHIA13) == 13
    # a dict of subsets reads the same
    as_dict = segmentation_report(torch.from_numpy(hist), L.CITYSCAPES_CLASSES, {"13": L.SYNTHIA13})
    assert as_dict["miou_13"] == r["miou_13"]
    with pytest.raises(ValueError):
        segmentation_report(torch.from_numpy(hist), L.CITYSCAPES_CLASSES, {"x": (19,)})


def test_empty_matrix_has_no_means():
    r = segmentation_report(torch.zeros(3, 3, dtype=torch.int64), ["a", "b", "c"])
    assert r["miou"] is None and r["pixel_accuracy"] is None and r["mean_class_accuracy"] is None


def test_classification_report_names_its_metric():
    r = classification_report(torch.tensor([[2, 0], [1, 1]]), ["0", "1"])
    assert r["metric"] == "accuracy" and r["accuracy"] == pytest.approx(0.75)


# ---- inference ---------------------------------------------------------------------------------

def test_flip_and_scales_leave_a_symmetric_model_unchanged():
    method = FakeMethod(PixelNet(5, stride=2), [str(i) for i in range(5)])
    x = normalize(torch.randint(0, 256, (2, 3, 16, 24), dtype=torch.uint8))
    plain = predict_logits(method, x, (32, 48))
    assert plain.shape == (2, 5, 32, 48)
    # a 1x1 conv at stride 2 commutes with the flip: the flipped pass, flipped back, is the same
    flipped = predict_logits(method, x, (32, 48), flip=True)
    torch.testing.assert_close(flipped, plain.softmax(1), rtol=0, atol=1e-6)
    assert torch.equal(flipped.argmax(1), plain.argmax(1))
    assert torch.equal(predict_logits(method, x, (32, 48), softmax=True), plain.softmax(1))
    # a constant image reads the same at every scale
    const = normalize(torch.full((1, 3, 16, 24), 77, dtype=torch.uint8))
    one = predict_logits(method, const, (32, 48), softmax=True)
    many = predict_logits(method, const, (32, 48), flip=True, scales=(0.5, 0.75, 1.0, 1.5))
    torch.testing.assert_close(many, one, rtol=0, atol=1e-6)


def test_multi_scale_flip_is_the_mean_of_the_passes_probabilities():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2, padding=1))
    method = FakeMethod(net, ["a", "b", "c"])
    x = torch.randn(1, 3, 20, 30)
    scales, out = (0.5, 1.0, 1.25), (40, 60)
    passes = []
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(round(20 * s), round(30 * s)), mode="bilinear",
                                              align_corners=False, antialias=s < 1)
        for flip in (False, True):
            with torch.no_grad():
                lg = net(xs.flip(-1) if flip else xs)
            up = F.interpolate(lg, size=out, mode="bilinear", align_corners=True)
            passes.append((up.flip(-1) if flip else up).softmax(1))
    want = torch.stack(passes).mean(0)
    got = predict_logits(method, x, out, flip=True, scales=scales)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not got.requires_grad


# ---- evaluate_segmentation ---------------------------------------------------------------------

def test_scored_at_label_resolution():
    k = 4
    method = FakeMethod(PixelNet(k, stride=2, seed=1), "abcd")
    samples = random_samples(3, [(64, 128)], k)
    # the run size 32x64: the network predicts 16x32, scored against 64x128 labels
    r = evaluate_segmentation(method, TensorSource(samples), (32, 64), None)
    want = torch.zeros(k, k, dtype=torch.int64)
    for image, label in samples:
        pred = reference_pred(method, image, (32, 64), (64, 128))
        want += confusion_matrix(pred.flatten(), label.long().flatten(), k)
    assert r["confusion_matrix"] == want.tolist()
    assert r["num_pixels"] == 3 * (64 - 8) * 128
    assert r["num_images"] == 3 and r["size"] == [32, 64] and r["flip"] is False and r["scales"] == [1.0]
    assert r == {**segmentation_report(want, list("abcd")), "flip": False, "scales": [1.0], "size": [32, 64],
                 "num_images": 3}


def test_mixed_native_sizes_batches_workers_and_training_mode():
    k = 3
    method = FakeMethod(PixelNet(k, stride=2, seed=2), "abc")
    samples = random_samples(5, [(64, 128), (48, 96), (40, 40)], k, seed=3)
    want = torch.zeros(k, k, dtype=torch.int64)
    for image, label in samples:
        want += confusion_matrix(reference_pred(method, image, (32, 48), tuple(label.shape)).flatten(),
                                 label.long().flatten(), k)
    method.train(True)
    seen = []
    r = evaluate_segmentation(method, TensorSource(samples), (32, 48), None, batch_size=2, num_workers=1,
                              progress=lambda done, total: seen.append((done, total)))
    assert r["confusion_matrix"] == want.tolist()
    assert method.nets.training  # restored
    assert seen == [(2, 5), (4, 5), (5, 5)]


class FakeDist:
    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self.reduced = None

    def shard(self, n):
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def all_reduce_sum_(self, t):
        self.reduced = t.clone()  # this rank's share; the test sums the ranks
        return t


def test_sharded_ranks_sum_to_the_single_process_matrix(tmp_path):
    k = 3
    method = FakeMethod(PixelNet(k, seed=4), "abc")
    source = TensorSource(random_samples(5, [(24, 32)], k, seed=5))
    whole = evaluate_segmentation(method, source, (24, 32), None)
    total = torch.zeros(k, k, dtype=torch.int64)
    for rank in range(2):
        d = FakeDist(rank, 2)
        r = evaluate_segmentation(method, source, (24, 32), None, d, save_dir=tmp_path)
        total += d.reduced
        assert r["num_images"] == 5
    assert total.tolist() == whole["confusion_matrix"]
    assert sorted(p.name for p in (tmp_path / "ids").iterdir()) == [f"img{i:03d}.png" for i in range(5)]


def test_saved_predictions(tmp_path):
    from PIL import Image

    # the Cityscapes 19: label ids and the official palette, at the label's size
    method = FakeMethod(ColourCodeNet(19), L.CITYSCAPES_CLASSES)
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[0, :, :15], image[0, :, 15:] = 10 * 13, 10 * 0  # car | road
    label = torch.full((20, 30), 13, dtype=torch.uint8)
    evaluate_segmentation(method, TensorSource([(image, label)]), (10, 16), None, save_dir=tmp_path / "cs")
    ids = np.array(Image.open(tmp_path / "cs" / "ids" / "img000.png"))
    colour = np.array(Image.open(tmp_path / "cs" / "color" / "img000_color.png"))
    assert ids.shape == (20, 30) and colour.shape == (20, 30, 3)
    assert ids[0, 0] == 26 and ids[0, -1] == 7  # car, road as label ids
    assert set(np.unique(ids).tolist()) <= set(L.CITYSCAPES_LABEL_IDS)  # the border blurs into other classes
    assert tuple(colour[0, 0]) == L.CITYSCAPES_PALETTE[13] and tuple(colour[0, -1]) == L.CITYSCAPES_PALETTE[0]
    # another class list (a digit scene's 11): train ids and the VOC colour map
    method = FakeMethod(ColourCodeNet(11), [str(i) for i in range(11)])
    image[0, :, :15], image[0, :, 15:] = 10 * 7, 10 * 10
    evaluate_segmentation(method, TensorSource([(image, label)]), (20, 30), None, save_dir=tmp_path / "dg")
    ids = np.array(Image.open(tmp_path / "dg" / "ids" / "img000.png"))
    colour = np.array(Image.open(tmp_path / "dg" / "color" / "img000_color.png"))
    assert ids[0, 0] == 7 and ids[0, -1] == 10
    assert tuple(colour[0, 0]) == voc_palette(11)[7] == (128, 128, 128)
    assert voc_palette(3) == ((0, 0, 0), (128, 0, 0), (0, 128, 0))


def test_user_errors_are_one_line(tmp_path):
    method = FakeMethod(PixelNet(2), "ab")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    source = TensorSource(random_samples(1, [(8, 8)], 2))
    with pytest.raises(OutputError) as e:
        evaluate_segmentation(method, source, (8, 8), None, save_dir=blocker)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError) as e:
        evaluate_segmentation(method, TensorSource([], labelled=False), (8, 8), None)
    assert "\n" not in str(e.value)

    class Broken(TensorSource):
        def read(self, i):
            raise DataError("cannot read the image x.png; download it again")

    with pytest.raises(DataError) as e:  # raised in a worker, still one line
        evaluate_segmentation(method, Broken(source.samples), (8, 8), None, num_workers=1)
    assert str(e.value) == "cannot read the image x.png; download it again"


# ---- the oracle: cityscapesScripts' evaluator on our saved PNGs ----------------------------------

def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cityscapes_scripts_oracle(tmp_path, monkeypatch, capsys):
    """Our per-class IoU and mIoU equal cityscapesScripts' on the label-id PNGs we save.

    Its evaluator accepts any size as long as prediction and ground truth agree (it checks
    only that), so the ground truth here is 64x128."""
    pytest.importorskip("cityscapesscripts", reason="pip install -e '.[dev]' installs the oracle")
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs

    rng = np.random.default_rng(0)
    h, w = 64, 128
    stems = ["frankfurt_000000_000294", "frankfurt_000001_000538", "lindau_000003_000019"]
    train_to_id = np.array(L.CITYSCAPES_LABEL_IDS)
    images, gts = [], []
    for n, stem in enumerate(stems):
        # ground truth: blocks of a few classes, some ignored ids (0 unlabeled, 1 ego vehicle, 4 static)
        tids = rng.choice([0, 1, 2, 8, 10, 11, 13], size=(8, 16))
        gt = train_to_id[tids].astype(np.uint8)
        gt = np.kron(gt, np.ones((8, 8), dtype=np.uint8))
        gt[:6] = 1
        gt[-5:, :20] = 4
        gt[30:34, 50:60] = 0
        # prediction: the ground truth's train id with errors, a "bus" (15) patch where no bus is
        # labelled (IoU 0); "train" (16) is in neither (no IoU, left out of the mean)
        pred = np.kron(tids, np.ones((8, 8), dtype=np.int64))
        noise = rng.random((h, w)) < 0.15
        pred[noise] = rng.choice([0, 2, 5, 13, 18], size=int(noise.sum()))
        pred[40:56, 100:120] = 15
        image = np.zeros((h, w, 3), dtype=np.uint8)
        image[..., 0] = 10 * pred
        image[..., 1] = rng.integers(0, 255, size=(h, w))  # the model reads red only
        _write_png(tmp_path / "leftImg8bit" / "val" / stem.split("_")[0] / f"{stem}_leftImg8bit.png", image)
        _write_png(tmp_path / "gtFine" / "val" / stem.split("_")[0] / f"{stem}_gtFine_labelIds.png", gt)
        images.append(tmp_path / "leftImg8bit" / "val" / stem.split("_")[0] / f"{stem}_leftImg8bit.png")
        gts.append(tmp_path / "gtFine" / "val" / stem.split("_")[0] / f"{stem}_gtFine_labelIds.png")
    source = FilePairSource("cityscapes:val", stems, images, gts, LookupLabels(L.CITYSCAPES_ID_TO_TRAIN))
    method = FakeMethod(ColourCodeNet(19), L.CITYSCAPES_CLASSES)
    out = tmp_path / "pred"
    # at the run size 32x64 the network predicts 16x32; the saved PNGs are at the labels' 64x128
    ours = evaluate_segmentation(method, source, (32, 64), None, save_dir=out)

    for name, value in {"predictionPath": str(out / "ids"), "predictionWalk": None, "evalInstLevelScore": False,
                        "evalPixelAccuracy": False, "JSONOutput": False, "quiet": True}.items():
        monkeypatch.setattr(cs.args, name, value)
    gt_files = [str(p) for p in gts]
    preds = [cs.getPrediction(cs.args, g) for g in gt_files]  # its own search finds ours, one each
    assert [Path(p).name for p in preds] == [f"{s}.png" for s in stems]
    theirs = cs.evaluateImgLists(preds, gt_files, cs.args)
    capsys.readouterr()

    assert ours["per_class_iou"]["bus"] == theirs["classScores"]["bus"] == 0.0
    assert ours["per_class_iou"]["train"] is None and math.isnan(theirs["classScores"]["train"])
    for c in L.CITYSCAPES_CLASSES:
        a, b = ours["per_class_iou"][c], theirs["classScores"][c]
        if math.isnan(b):
            assert a is None, c
        else:
            assert a == pytest.approx(b, abs=1e-6), c
    assert ours["miou"] == pytest.approx(theirs["averageScoreClasses"], abs=1e-6)
    partial = [c for c, v in ours["per_class_iou"].items() if v is not None and 0 < v < 1]
    assert len(partial) >= 5, ours["per_class_iou"]  # the comparison covers real, imperfect scores
    # their matrix over label ids, restricted to the 19 evaluated ids, is ours over train ids
    # (ignored ground truth rows dropped; our predictions are always one of the 19)
    cm = np.array(theirs["confMatrix"])
    ids = list(L.CITYSCAPES_LABEL_IDS)
    assert cm[np.ix_(ids, ids)].tolist() == ours["confusion_matrix"]
