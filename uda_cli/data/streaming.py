"""Streaming batches of dense (segmentation) data: DataLoader workers, exact resume.

Dense data does not fit in memory, so it streams from disk through a
``torch.utils.data.DataLoader`` with workers and pinned memory, under the same contract as
the in-memory digit batches (:mod:`uda_cli.data.batches`): one global index order per
stream, sharded over ranks by :class:`~uda_cli.data.batches.ShardedIndices` (here the
DataLoader's ``batch_sampler``), and a ``state_dict`` that resumes exactly.

Exactness does not depend on the workers. A sample is keyed by ``(draw, index)``: ``draw``
is its position in the stream's global order (batch number x global batch + rank offset +
place in the batch) and every random choice of its augmentation (scale, crop, flip) comes
from a generator seeded by ``(seed, draw)``, never from a worker's RNG. So 0, 1 or 8 workers,
one rank of batch 2B or two of batch B, give the same pixels; and a resume rebuilds the
sampler at the first draw not yet consumed (workers may have read ahead: those batches are
read again, which costs time, not exactness).

Per sample (as ADVENT and CRST prepare theirs): decode; resize to the domain's run size
(image bilinear with antialias, label nearest: torchvision transforms v2 functional ops on
``tv_tensors.Image`` / ``Mask``, which pick the interpolation by type); then, when asked, a
random scale (CRST: 0.5-1.5), a random crop (CRST: 512x1024; a scaled image smaller than
the crop is padded: image 0, label 255) and a random horizontal flip. Images stay uint8
until the device, where they are normalised to [-1, 1] like every other batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from uda_cli.data.batches import ShardedIndices
from uda_cli.data.dense import DenseSource
from uda_cli.data.labels import IGNORE
from uda_cli.data.transforms import normalize
from uda_cli.errors import UDAError


@dataclass(frozen=True)
class Augment:
    """Per-sample training augmentation. ``crop``: (H, W) or None; ``scale``: (lo, hi) or None."""

    crop: tuple[int, int] | None = None
    scale: tuple[float, float] | None = None
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop is not None or self.scale is not None or self.flip


def sample_seed(seed: int, stream: str, draw: int) -> int:
    """A 63-bit seed for one draw of one stream (blake2b of the three: independent streams)."""
    h = hashlib.blake2b(f"{seed}/{stream}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def resize_pair(image: torch.Tensor, label: torch.Tensor | None, size: tuple[int, int]):
    """Image bilinear (antialiased, uint8 in and out), label nearest, to ``size`` (H, W).

    A label is ``[H, W]``, or ``[C, H, W]`` for several per-pixel maps that move together
    (a round's pseudo-label with its top-2 classes and probabilities)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if tuple(image.shape[-2:]) != tuple(size):
        image = TF.resize_image(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if label is not None and tuple(label.shape[-2:]) != tuple(size):
        label = TF.resize_mask(label if label.dim() == 3 else label[None], list(size))
        label = label if label.dim() == 3 and label.shape[0] > 1 else label.reshape(label.shape[-2:])
    return image, label


class DenseDataset(torch.utils.data.Dataset):
    """``dataset[(draw, index)] -> (image uint8 [3,h,w], label uint8 [h,w] or None, index)``."""

    def __init__(self, source: DenseSource, size: tuple[int, int], augment: Augment = Augment(), seed: int = 0,
                 stream: str = "", labels: bool = True):
        self.source, self.size, self.augment = source, tuple(size), augment
        self.seed, self.stream, self.labels = seed, stream, labels and source.labelled

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key):
        try:
            return self._get(key)
        except UDAError as e:
            # Handed back as a value and raised by the main process: raised in a worker, the
            # DataLoader would re-raise it with the worker's traceback in its one-line message.
            return e

    def _get(self, key):
        draw, index = key
        image, label = self.source.read(index)
        if not self.labels:
            label = None
        image, label = resize_pair(image, label, self.size)
        if self.augment.active:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.stream, draw))
            image, label = self._augment(image, label, gen)
        return image, label, index

    def _augment(self, image, label, gen: torch.Generator):
        from torchvision.transforms.v2 import functional as TF

        aug = self.augment
        h, w = image.shape[-2:]
        if aug.scale is not None:
            lo, hi = aug.scale
            s = lo + (hi - lo) * float(torch.rand((), generator=gen))
            image, label = resize_pair(image, label, (max(1, round(h * s)), max(1, round(w * s))))
            h, w = image.shape[-2:]
        if aug.crop is not None:
            ch, cw = aug.crop
            if h < ch or w < cw:  # pad bottom/right: image black, label ignored
                ph, pw = max(ch - h, 0), max(cw - w, 0)
                image = TF.pad(image, [0, 0, pw, ph], fill=0)
                if label is not None:
                    padded = TF.pad(label if label.dim() == 3 else label[None], [0, 0, pw, ph], fill=IGNORE)
                    label = padded if label.dim() == 3 else padded[0]
                h, w = image.shape[-2:]
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            image = image[:, top : top + ch, left : left + cw]
            if label is not None:
                label = label[..., top : top + ch, left : left + cw]
        if aug.flip and bool(torch.rand((), generator=gen) < 0.5):
            image = image.flip(-1)
            if label is not None:
                label = label.flip(-1)
        return image.contiguous(), (None if label is None else label.contiguous())


def collate(samples):
    """Stack a batch of equal-size samples: ``(images [B,3,h,w], labels [B,h,w] or None, indices [B])``;
    a sample that failed to read (a UDAError) is passed on instead, for the stream to raise."""
    for s in samples:
        if isinstance(s, UDAError):
            return s
    images = torch.stack([s[0] for s in samples])
    labels = None if samples[0][1] is None else torch.stack([s[1] for s in samples])
    return images, labels, torch.tensor([s[2] for s in samples], dtype=torch.int64)


class _KeyedBatches:
    """A DataLoader ``batch_sampler``: this rank's index lists from ``sampler``, each index
    paired with its global draw number, starting at batch ``batch``."""

    def __init__(self, sampler: ShardedIndices, batch: int):
        self.sampler, self.batch = sampler, batch

    def __iter__(self):
        b = self.batch
        bs, world, rank = self.sampler.batch_size, self.sampler.world_size, self.sampler.rank
        while True:
            idx = self.sampler.next().tolist()
            base = b * bs * world + rank * bs
            yield [(base + j, i) for j, i in enumerate(idx)]
            b += 1


class DenseStream:
    """An infinite, resumable stream of ``(images, labels, indices)`` batches from one dense domain.

    ``tracker`` follows the batches actually handed out (the DataLoader's own sampler runs
    ahead by its prefetch); its state plus the batch count is the stream's checkpoint state.
    """

    def __init__(self, dataset: DenseDataset, batch_size: int, seed: int, device: torch.device,
                 world_size: int = 1, rank: int = 0, num_workers: int = 0, prefetch: int = 2):
        self.dataset, self.device = dataset, torch.device(device)
        self.num_workers, self.prefetch = num_workers, prefetch
        self._args = (len(dataset), batch_size, seed, "cpu", world_size, rank)
        self.tracker = ShardedIndices(*self._args)
        self.batches = 0  # global batches consumed
        self._iter = None

    def _start(self):
        sampler = ShardedIndices(*self._args)
        sampler.load_state_dict(self.tracker.state_dict())
        kw = {}
        if self.num_workers > 0:
            kw = dict(prefetch_factor=self.prefetch, persistent_workers=False)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_KeyedBatches(sampler, self.batches), num_workers=self.num_workers,
            collate_fn=collate, pin_memory=self.device.type == "cuda",
            # A DataLoader iterator draws its workers' base seed from this generator: the run's own
            # RNG (dropout, noise) must not depend on when a stream (re)starts, e.g. after a resume.
            generator=torch.Generator(), **kw)
        self._iter = iter(loader)

    def next(self):
        if self._iter is None:
            self._start()
        got = next(self._iter)
        if isinstance(got, UDAError):
            self.close()
            raise got
        images, labels, indices = got
        expected = self.tracker.next()
        if not torch.equal(indices, expected.cpu()):  # a broken invariant, never the user's doing
            raise RuntimeError("dense stream out of step with its sampler")
        self.batches += 1
        nb = self.device.type == "cuda"
        images = images.to(self.device, non_blocking=nb)
        labels = None if labels is None else labels.to(self.device, non_blocking=nb)
        return images, labels, indices.to(self.device)

    def close(self) -> None:
        self._iter = None  # the DataLoader iterator's workers shut down when it is collected

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.tracker.state_dict(), "batches": torch.tensor([self.batches], dtype=torch.int64)}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.tracker.load_state_dict({k: s[k] for k in ("perm", "pos", "gen")})
        self.batches = int(s["batches"][0])
        self.close()


class DenseBatches:
    """``{"x_s", "y_s", "x_t", "idx_t"}`` batches of dense domains, the contract of
    :class:`~uda_cli.data.batches.PairedBatches`: images float in [-1, 1] ``[B,3,h,w]``,
    ``y_s`` int64 train ids ``[B,h,w]`` (255 ignore), ``idx_t`` indices into the target split
    (the target's labels are never read)."""

    def __init__(self, src: DenseDataset, tgt: DenseDataset, batch_size: int, seed: int, device,
                 world_size: int = 1, rank: int = 0, num_workers: int = 0):
        self._stream_args = dict(batch_size=batch_size, device=device, world_size=world_size, rank=rank,
                                 num_workers=num_workers)
        # Different seeds per stream (as PairedBatches): independent orders and augmentations.
        self.streams = {
            "src": DenseStream(src, batch_size, seed * 2 + 1, device, world_size, rank, num_workers),
            "tgt": DenseStream(tgt, batch_size, seed * 2 + 2, device, world_size, rank, num_workers),
        }

    def set_target(self, dataset: DenseDataset, seed: int, name: str = "tgt") -> None:
        """Draw target batches from ``dataset`` from now on (a self-training round's images and
        pseudo-labels: ``y_t`` in each batch), in an order seeded by ``seed``. Another ``name``
        adds a second target stream (TPLD's hard images: ``x_<name>``, ``idx_<name>``)."""
        if name in self.streams:
            self.streams[name].close()
        self.streams[name] = DenseStream(dataset, seed=seed, **self._stream_args)

    def next(self) -> dict[str, torch.Tensor]:
        x_s, y_s, _ = self.streams["src"].next()
        x_t, y_t, i_t = self.streams["tgt"].next()
        batch = {"x_s": normalize(x_s), "y_s": y_s.long(), "x_t": normalize(x_t), "idx_t": i_t}
        if y_t is not None:  # a round's pseudo-labels, with their top-k maps when it stores them
            if y_t.dim() == 4:
                k = (y_t.shape[1] - 1) // 2
                batch["y_t"], batch["topk_t"] = y_t[:, 0].long(), y_t[:, 1 : 1 + k].long()
                batch["topkp_t"] = y_t[:, 1 + k :].float() / 255
            else:
                batch["y_t"] = y_t.long()
        for name, stream in self.streams.items():
            if name not in ("src", "tgt"):
                x, _, i = stream.next()
                batch[f"x_{name}"], batch[f"idx_{name}"] = normalize(x), i
        return batch

    def close(self) -> None:
        for s in self.streams.values():
            s.close()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": v for k, s in self.streams.items() for n, v in s.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], only: tuple[str, ...] | None = None) -> None:
        """Restore the streams' positions; ``only``: just those streams (at a round boundary the
        target streams are about to be replaced, and the saved ones may cover another set)."""
        for k, s in self.streams.items():
            if only is None or k in only:
                s.load_state_dict({n: state[f"{k}.{n}"] for n in ("perm", "pos", "gen", "batches")})
