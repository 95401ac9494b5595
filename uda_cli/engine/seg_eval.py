"""Segmentation evaluation as the UDA papers report it: mIoU over full-resolution labels.

Protocol (ADVENT ``eval_UDA.py``, CRST ``evaluate.py``; cityscapesScripts
``evalPixelLevelSemanticLabeling.py``): each image is resized to the run size (Cityscapes val:
1024x2048 -> 512x1024 in ADVENT), predicted, the logits are upsampled bilinearly to the
label's native resolution (1024x2048), and the argmax is scored against every labelled pixel
there; one confusion matrix accumulates over the whole split, and IoU, mIoU (and the 16/13
class subsets) come from it (:func:`uda_cli.engine.metrics.segmentation_report`).
Test-time flips and scales are CRST's (:func:`uda_cli.engine.inference.predict_logits`).

Samples are read by a ``DataLoader`` (decoding and the resize overlap inference), the
confusion matrix stays on the device until the end, and with several processes each rank
scores its contiguous share of the split and the matrices are summed: every rank gets the
report one process computes (integer counts, so the sum is exact).

Saved predictions (``save_dir``), one pair per image, in two folders:

- ``ids/<stem>.png``: for the Cityscapes 19 classes, the Cityscapes *label ids* at the
  label's full resolution, what cityscapesScripts' evaluator and the benchmark server read;
  for any other class list (the digit scenes), the train ids;
- ``color/<stem>_color.png``: a preview, in the official Cityscapes palette, or for other
  class lists the PASCAL VOC colour map (VOC devkit ``labelcolormap``).

Departures, one line each:
- the previews sit in their own folder: cityscapesScripts finds a prediction by searching its
  results folder recursively for ``<city>_<seq>_<frame>*.png`` and stops at a second match, so
  point ``CITYSCAPES_RESULTS`` at ``ids/`` (a ``_color.png`` beside it would be that match).
- the final checkpoint is evaluated; ADVENT reports the best of its snapshots on this split.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

from uda_cli.data import labels as L
from uda_cli.data.dense import DenseSource
from uda_cli.engine.inference import predict_logits
from uda_cli.engine.metrics import segmentation_report
from uda_cli.errors import DataError, UDAError

_MAX_PENDING_WRITES = 8  # PNGs being encoded/written in the background (each holds one prediction)


class ResizedSamples(torch.utils.data.Dataset):
    """Sample ``indices[j]`` of ``source``: its image resized to ``size`` and its native label
    (``labels=False``: None, for the pseudo-label pass over unlabelled images).

    Runs in DataLoader workers, so decoding and resizing overlap the network."""

    def __init__(self, source: DenseSource, indices: Sequence[int], size: tuple[int, int], labels: bool = True):
        self.source, self.indices, self.size, self.labels = source, list(indices), tuple(size), labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int):
        from uda_cli.data.transforms import resize_uint8

        i = self.indices[j]
        try:
            image, label = self.source.read(i)
            if not self.labels:
                label = None
            elif label is None:
                raise DataError(f"{self.source.name or 'the split'} has no label for sample {self.source.stem(i)}; "
                                "evaluate on a labelled split")
        except UDAError as e:
            # Handed back as a value and raised by the main process: raised in a worker, the
            # DataLoader would re-raise it with the worker's traceback in the message.
            return e
        return i, resize_uint8(image[None], self.size)[0], label


def collate_samples(samples):
    """Images stacked (all at the run size); labels kept one per sample, at their native sizes.
    A sample that failed to read (a UDAError) is passed on instead, to be raised."""
    for s in samples:
        if isinstance(s, UDAError):
            return s
    return [s[0] for s in samples], torch.stack([s[1] for s in samples]), [s[2] for s in samples]


def voc_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """The first ``n`` colours of the PASCAL VOC colour map (VOC devkit ``labelcolormap``:
    the bits of the class index spread over R, G, B from the most significant bit down)."""
    out = []
    for c in range(n):
        r = g = b = 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


def _encode_png(array: np.ndarray) -> bytes:
    """uint8 ``[H, W]`` (grey, mode L: what cityscapesScripts reads with PIL) or ``[H, W, 3]``
    (RGB) -> PNG bytes. PIL, not torchvision.io: as fast here (25 ms for a 1024x2048 id map,
    68 ms in colour) and torchvision's encoders are deprecated."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG")
    return buf.getvalue()


class _PredictionWriter:
    """Writes ``ids/<stem>.png`` and ``color/<stem>_color.png`` on background threads, so the
    encoding overlaps the next images' inference (the main thread mostly waits on the device);
    at most ``_MAX_PENDING_WRITES`` predictions in flight."""

    def __init__(self, folder: Path, classes: Sequence[str]):
        from uda_cli.engine.checkpoint import make_folder

        self.ids_dir = make_folder(Path(folder) / "ids", "the predictions folder")
        self.color_dir = make_folder(Path(folder) / "color", "the predictions folder")
        self.cityscapes = tuple(classes) == L.CITYSCAPES_CLASSES
        self.palette = L.CITYSCAPES_PALETTE if self.cityscapes else voc_palette(len(classes))
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="uda-save")
        self.pending: list[Future] = []

    def submit(self, stem: str, train_ids: np.ndarray) -> None:
        while len(self.pending) >= _MAX_PENDING_WRITES:
            self.pending.pop(0).result()  # re-raises a failed write (an OutputError line)
        self.pending.append(self.pool.submit(self._write, stem, train_ids))

    def _write(self, stem: str, train_ids: np.ndarray) -> None:
        from uda_cli.engine.checkpoint import atomic_write_bytes

        ids = L.train_to_label_ids(train_ids) if self.cityscapes else train_ids
        # durable=False: a temporary name and a rename (a reader never sees half a PNG), no fsync.
        atomic_write_bytes(self.ids_dir / f"{stem}.png", _encode_png(ids), durable=False)
        atomic_write_bytes(self.color_dir / f"{stem}_color.png",
                           _encode_png(L.colorize(train_ids, self.palette)), durable=False)

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                for f in self.pending:
                    f.result()
        finally:
            for f in self.pending:
                f.cancel()
            self.pool.shutdown(wait=True)


def _accumulate(cm_flat: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, k: int) -> None:
    """Add one batch to the flattened confusion matrix ``[K*K + 1]`` in place, on the device.

    Labels outside [0, K) (255 = ignore) go to the extra last bin. ``scatter_add_`` rather
    than ``metrics.confusion_matrix``: boolean indexing and CUDA ``bincount`` both read a
    size back to the host, a sync per image."""
    target = target.long()
    keep = (target >= 0) & (target < k)
    idx = torch.where(keep, target * k + pred, torch.full_like(target, k * k))
    cm_flat.scatter_add_(0, idx.reshape(-1), torch.ones_like(idx.reshape(-1)))


def _device_of(method) -> torch.device:
    for p in method.nets.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_segmentation(method, source: DenseSource, size: tuple[int, int],
                          autocast: Callable[[], ContextManager] | None, dist=None, *, flip: bool = False,
                          scales: Sequence[float] = (1.0,), batch_size: int = 1, num_workers: int = 0,
                          save_dir: Path | None = None, subsets: Sequence[tuple[str, Sequence[int]]] = (),
                          device: torch.device | None = None,
                          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """mIoU of ``method.predict`` on the labelled split ``source`` (see the module docstring).

    ``size``: the (H, W) images are resized to (bilinear, antialiased) before the network;
    scores are taken at each label's native size. ``autocast``: a context factory for the
    network calls (``runtime.autocast_for``), or None. ``dist``: a ``Dist``; each rank scores
    ``dist.shard(len(source))`` and the confusion matrices are all-reduced. ``batch_size``
    images go through the network together; samples whose labels differ in size are
    upsampled and scored separately. ``num_workers``: DataLoader worker processes (0: read in
    this process). ``save_dir``: write each of this rank's predictions there. ``subsets``:
    ``(name, train ids)`` pairs reported as ``miou_<name>`` (``DomainSpec.class_subsets``).
    ``device``: where to predict; by default the Dist's device, else the networks'.
    ``progress(done, total)``: called after each batch with this rank's counts.
    The networks' train/eval mode is restored afterwards.
    """
    if not source.labelled:
        raise DataError(f"{source.name or 'this split'} has no labels; evaluate on a labelled split (cityscapes:val)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        device = dist.device if dist is not None else _device_of(method)
    device = torch.device(device)
    k = method.spec.num_classes
    n = len(source)
    indices = range(n)[dist.shard(n)] if dist is not None and dist.world_size > 1 else range(n)
    # A bad --save folder fails here, before any work, as one OutputError line.
    writer = _PredictionWriter(save_dir, method.spec.classes) if save_dir is not None else None
    loader = torch.utils.data.DataLoader(
        ResizedSamples(source, indices, size), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_samples, pin_memory=device.type == "cuda", drop_last=False,
        generator=torch.Generator())  # its own: an iterator draws a worker seed, never from the run's RNG
    from uda_cli.data.transforms import normalize

    cm_flat = torch.zeros(k * k + 1, dtype=torch.int64, device=device)
    was_training = method.nets.training
    method.eval()
    done, ok = 0, False
    try:
        for batch in loader:
            if isinstance(batch, UDAError):
                raise batch
            idx, images, labels = batch
            x = normalize(images.to(device, non_blocking=True))
            groups: dict[tuple[int, int], list[int]] = {}
            for j, lab in enumerate(labels):
                groups.setdefault(tuple(lab.shape[-2:]), []).append(j)
            for out_size, js in groups.items():
                xs = x if len(js) == len(labels) else x[js]
                pred = predict_logits(method, xs, out_size, flip=flip, scales=scales, autocast=autocast).argmax(1)
                # each label leaves pinned memory as it is (a stack on the host would be unpinned)
                target = torch.stack([labels[j].to(device, non_blocking=True) for j in js])
                _accumulate(cm_flat, pred, target, k)
                if writer is not None:
                    host = pred.to(torch.uint8).cpu().numpy()  # the one sync saving needs
                    for row, j in enumerate(js):
                        writer.submit(source.stem(idx[j]), host[row])
            done += len(labels)
            if progress is not None:
                progress(done, len(indices))
        ok = True
    finally:
        method.train(was_training)
        if writer is not None:
            writer.close(wait=ok)
    cm = cm_flat[: k * k].view(k, k)
    if dist is not None:
        dist.all_reduce_sum_(cm)
    report = segmentation_report(cm, method.spec.classes, subsets)
    report.update({"flip": bool(flip), "scales": [float(s) for s in scales], "size": [int(size[0]), int(size[1])],
                   "num_images": n})
    return report
