"""The pseudo-label pass of self-training: one round's files in ``rounds/NN/`` of the run folder.

A round of a self-training method (CBST/CRST, TPLD) begins with a pass over the target's
training images with the current network, in two parts:

1. **Predict** (:func:`predict_pass`): batched inference on the device (the training
   loop's autocast; optional flip averaging and an inference scale, CRST's 0.9 with flip),
   sharded over ranks (each rank its contiguous share of the images). Per image it stores
   only what label selection needs, ``pred/<stem>.npz``: the top-k classes (uint8) and their
   probabilities (float16) at the run's target size, and it adds the image to per-class
   confidence histograms (the method's ``accumulate``), whose sum over images and ranks
   gives the class thresholds with memory independent of the number of images. A pass holds
   one batch of probabilities at a time, never the split's.
2. **Select** (:func:`select_pass`): no network; per image the method's ``select`` turns the
   stored top-k and the thresholds into a pseudo-label PNG ``labels/<stem>.png`` (train ids,
   255 = ignore), and per-class label counts are summed over ranks into ``stats.json``;
   ``thresholds.json`` holds the round's portion and λ per class.

Both parts are resumable by their files: a pass interrupted after image 37 redoes from the
first image without its file (files are written atomically, so one that exists is whole),
and a round whose ``complete`` marker exists is reused as it is. Users open the files.

Departures from CRST's code, one line each:
- predictions are stored at the run's target size, not the label's full resolution (the
  training stream resizes to that size anyway): 4x less disk for Cityscapes at 1024x512.
- only the top-k probabilities are kept (k from the method: 2 for TPLD's voting), not the
  K-class map CRST saves per image (159 MB each at 1024x2048); a class outside an image's
  top-k can therefore not be selected there (it would need p >= λ with p <= 1/(k+1)).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from uda_cli.data.dense import DenseSource
from uda_cli.data.labels import IGNORE
from uda_cli.data.transforms import normalize
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine.inference import predict_logits
from uda_cli.engine.seg_eval import ResizedSamples, collate_samples
from uda_cli.errors import DataError, UDAError

COMPLETE = "complete"


@dataclass(frozen=True)
class RoundFiles:
    """Where round ``index``'s files live: ``<run>/rounds/NN/``."""

    run_dir: Path
    index: int

    @property
    def folder(self) -> Path:
        return self.run_dir / "rounds" / f"{self.index:02d}"

    def pred(self, stem: str) -> Path:
        return self.folder / "pred" / f"{stem}.npz"

    def label(self, stem: str) -> Path:
        return self.folder / "labels" / f"{stem}.png"

    @property
    def thresholds(self) -> Path:
        return self.folder / "thresholds.json"

    @property
    def stats(self) -> Path:
        return self.folder / "stats.json"

    @property
    def complete(self) -> bool:
        return (self.folder / COMPLETE).exists()

    def mark_complete(self) -> None:
        ckpt.atomic_write_bytes(self.folder / COMPLETE, b"")


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def read_pred(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(top-k classes uint8 [k, H, W], their probabilities float16 [k, H, W])`` of one image."""
    try:
        with np.load(path) as z:
            return z["classes"], z["probs"]
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"cannot read {path} ({e}); delete it and resume (--resume auto) to predict that image "
                        "again") from None


@torch.no_grad()
def predict_pass(method, source: DenseSource, size: tuple[int, int], files: RoundFiles, autocast, dist, *,
                 topk: int, accumulate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 flip: bool = False, scale: float = 1.0, batch_size: int = 1, num_workers: int = 0,
                 device: torch.device | None = None, progress: Callable[[int, int], None] | None = None):
    """Predict every target image of this rank's share that has no ``pred`` file yet, and
    return the histograms ``accumulate(max prob [N], argmax [N])`` summed over every image of
    the split (those predicted before a resume included) and over the ranks."""
    device = device or next(method.nets.parameters()).device
    n = len(source)
    share = list(range(n))[dist.shard(n)] if dist is not None and dist.world_size > 1 else list(range(n))
    todo = [i for i in share if not files.pred(source.stem(i)).exists()]
    hist = None

    def add(classes: torch.Tensor, probs: torch.Tensor) -> None:
        nonlocal hist
        h = accumulate(probs[0].float().reshape(-1), classes[0].long().reshape(-1))
        hist = h if hist is None else hist + h

    for i in share:  # images predicted before a resume count towards the thresholds too
        if i not in todo:
            c, p = read_pred(files.pred(source.stem(i)))
            add(torch.from_numpy(c).to(device), torch.from_numpy(p).to(device))
    was_training = method.nets.training
    method.eval()
    try:
        loader = torch.utils.data.DataLoader(ResizedSamples(source, todo, size, labels=False), batch_size=batch_size,
                                             num_workers=num_workers, collate_fn=collate_samples,
                                             pin_memory=device.type == "cuda",
                                             generator=torch.Generator())  # never the run's RNG
        done = 0
        for got in loader:
            if isinstance(got, UDAError):
                raise got
            indices, images, _ = got
            x = normalize(images.to(device, non_blocking=True))
            if scale != 1.0:
                h, w = x.shape[-2:]
                x = torch.nn.functional.interpolate(x, size=(max(1, round(h * scale)), max(1, round(w * scale))),
                                                    mode="bilinear", align_corners=False, antialias=True)
            prob = predict_logits(method, x, tuple(size), flip=flip, softmax=True, autocast=autocast)
            top_p, top_c = prob.topk(topk, dim=1)
            for b, i in enumerate(indices):
                classes, probs = top_c[b].to(torch.uint8), top_p[b].to(torch.float16)
                add(classes, probs)
                ckpt.atomic_write_bytes(files.pred(source.stem(i)), _npz_bytes(
                    classes=classes.cpu().numpy(), probs=probs.cpu().numpy()), durable=False)
            done += len(indices)
            if progress is not None:
                progress(done, len(todo))
    finally:
        method.train(was_training)
    if hist is None:
        hist = accumulate(torch.zeros(0, device=device), torch.zeros(0, dtype=torch.long, device=device))
    if dist is not None and dist.world_size > 1:
        dist.all_reduce_sum_(hist)
    return hist


def _png_bytes(labels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(labels.astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_label(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A pseudo-label PNG -> uint8 [H, W]; one line naming the file when it is missing,
    not a one-channel 8-bit PNG, or of another size than the round wrote."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode != "L":
                raise DataError(f"{path} is not a one-channel 8-bit PNG (mode {im.mode}); it was not written by this "
                                "round: delete the round's folder and resume to write it again")
            a = np.array(im)
    except FileNotFoundError:
        raise DataError(f"{path} is missing; delete the round's folder ({path.parent.parent}) and resume "
                        "(--resume auto) to write it again") from None
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read {path} ({e}); delete the round's folder and resume to write it again") from None
    if size is not None and tuple(a.shape) != tuple(size):
        raise DataError(f"{path} is {a.shape[1]}x{a.shape[0]}, the round wrote {size[1]}x{size[0]}; delete the "
                        "round's folder and resume to write it again")
    return a


def select_pass(source: DenseSource, files: RoundFiles, num_classes: int, dist,
                select: Callable[[str, np.ndarray, np.ndarray], np.ndarray], info: dict[str, Any],
                image_stats: Callable[[str, np.ndarray, np.ndarray, np.ndarray], dict[str, Any]] | None = None,
                ) -> dict[str, Any]:
    """Write every image's pseudo-label ``select(stem, classes, probs) -> uint8 [H, W]`` (a
    label already written is kept), then ``thresholds.json`` (``info``) and ``stats.json``:
    the share of pixels labelled overall and per class, plus whatever ``image_stats(stem,
    classes, probs, labels)`` returns per image (TPLD's scores), gathered on rank 0. The caller
    marks the round complete (``files.mark_complete()``) once it has added what it writes."""
    n = len(source)
    share = list(range(n))[dist.shard(n)] if dist is not None and dist.world_size > 1 else list(range(n))
    counts = torch.zeros(num_classes + 1, dtype=torch.int64)  # per class, then ignored
    per_image: dict[str, Any] = {}
    for i in share:
        stem = source.stem(i)
        classes, probs = read_pred(files.pred(stem))
        path = files.label(stem)
        if path.exists():
            labels = read_label(path, classes.shape[-2:])
        else:
            labels = select(stem, classes, probs)
            ckpt.atomic_write_bytes(path, _png_bytes(labels), durable=False)
        values = torch.from_numpy(np.where(labels == IGNORE, num_classes, labels).astype(np.int64).ravel())
        counts += torch.bincount(values, minlength=num_classes + 1)[: num_classes + 1]
        if image_stats is not None:
            per_image[stem] = image_stats(stem, classes, probs, labels)
    if dist is not None and dist.world_size > 1:
        counts = dist.all_reduce_sum_(counts.to(dist.device)).cpu()
        gathered = dist.gather_bytes(json.dumps(per_image).encode())
        per_image = {k: v for b in gathered for k, v in json.loads(b).items()} if dist.is_main else {}
    total = int(counts.sum())
    stats = {
        "images": n,
        "pixels": total,
        "labelled": (total - int(counts[-1])) / total if total else 0.0,
        "labelled_per_class": [int(c) / total if total else 0.0 for c in counts[:-1].tolist()],
        "per_image": per_image,
    }
    if dist is None or dist.is_main:
        ckpt.atomic_write_bytes(files.thresholds, (json.dumps(info, indent=1) + "\n").encode())
        ckpt.atomic_write_bytes(files.stats, (json.dumps(stats, indent=1) + "\n").encode())
    if dist is not None:
        dist.barrier()
    return stats


def write_json(path: Path, data: dict[str, Any]) -> None:
    ckpt.atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())


class PseudoLabelSource(DenseSource):
    """The target's images with a round's pseudo-labels: what a self-training round trains on.

    ``indices`` restricts it to some images (TPLD's easy ones); labels are read from
    ``files.label(stem)`` at the size the round wrote. With ``topk`` = k > 0 a sample's label
    is ``[1 + 2k, H, W]`` uint8: the pseudo-label, the pass's k most probable classes and their
    probabilities x 255 (the soft targets of TPLD's easy images and of CRST-LRENT), which move
    together through augmentation.
    Only a source of this class gives a training stream labels (``pseudo_labels``): the
    target's own labels never reach training."""

    pseudo_labels = True

    def __init__(self, base: DenseSource, files: RoundFiles, indices: Sequence[int] | None = None,
                 size: tuple[int, int] | None = None, topk: int = 0):
        self.base, self.files, self.size, self.topk = base, files, size, topk
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.name, self.labelled = f"{base.name} (round {files.index} pseudo-labels)", True

    def __len__(self) -> int:
        return len(self.indices)

    def stem(self, i: int) -> str:
        return self.base.stem(self.indices[i])

    def read(self, i: int):
        stem = self.base.stem(self.indices[i])
        image, _ = self.base.read(self.indices[i])
        label = read_label(self.files.label(stem), self.size)
        if not self.topk:
            return image, torch.from_numpy(label)
        classes, probs = read_pred(self.files.pred(stem))
        if len(classes) < self.topk:
            raise DataError(f"{self.files.pred(stem)} holds {len(classes)} classes per pixel, this round needs "
                            f"{self.topk}; delete {self.files.folder} and resume to predict it again")
        p = np.clip(np.rint(probs[: self.topk].astype(np.float32) * 255), 0, 255).astype(np.uint8)
        return image, torch.from_numpy(np.concatenate([label[None], classes[: self.topk], p]))
