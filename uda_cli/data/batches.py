"""Infinite batch streams for the training loop.

Digits sit in device memory as one uint8 tensor per domain; batches are drawn with a
device-side generator, gathered and normalised on the device: no DataLoader worker and no
host sync per step. A stream's position (permutation, cursor, generator state) is part of
every checkpoint, so a resumed run draws exactly the batches an uninterrupted one would.

Sharding for distributed runs is built in (:class:`ShardedIndices`): every rank draws the
same *global* batch of ``batch_size * world_size`` indices (same seed, same generator) and
keeps its own slice, so two ranks with batch B see exactly the samples a single process
with batch 2B sees, in the same order, and a checkpoint's stream state is the same on every
rank (it does not depend on the number of ranks).

A streaming stream (segmentation datasets, later) implements the same three methods:
``next()``, ``state_dict()``, ``load_state_dict()``. It shards the same way: a
:class:`ShardedIndices` is also an infinite ``batch_sampler`` for a
``torch.utils.data.DataLoader`` (it yields this rank's index lists), the role
``DistributedSampler`` plays elsewhere, with a state that resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from uda_cli.data.transforms import normalize


@dataclass
class InMemoryDomain:
    """One split of a domain on a device: uint8 images [N, C, H, W] and int64 labels [N]."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "InMemoryDomain":
        # ``non_blocking`` is irrelevant here: this runs once per run, not per step.
        return InMemoryDomain(self.name, self.images.to(device), self.labels.to(device))


class IndexStream:
    """Shuffled indices, epoch after epoch, drawn by a generator that lives on ``device``."""

    def __init__(self, n: int, seed: int, device: torch.device):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty domain")
        self.n = n
        self.device = torch.device(device)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.gen, device=self.device)
        self.pos = 0

    def take(self, k: int) -> torch.Tensor:
        parts = []
        while k > 0:
            if self.pos == self.n:
                self.perm = torch.randperm(self.n, generator=self.gen, device=self.device)
                self.pos = 0
            m = min(k, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + m])
            self.pos += m
            k -= m
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "perm": self.perm.cpu(),
            "pos": torch.tensor([self.pos], dtype=torch.int64),
            "gen": self.gen.get_state(),
        }

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        if int(s["perm"].numel()) != self.n:
            raise ValueError(f"checkpoint stream covers {s['perm'].numel()} images, the domain has {self.n}")
        self.perm = s["perm"].to(self.device)
        self.pos = int(s["pos"][0])
        self.gen.set_state(s["gen"])


class ShardedIndices:
    """This rank's slice of each global batch of ``batch_size * world_size`` shuffled indices."""

    def __init__(self, n: int, batch_size: int, seed: int, device="cpu", world_size: int = 1, rank: int = 0):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"bad sharding: batch {batch_size}, rank {rank} of {world_size}")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.stream = IndexStream(n, seed, device)

    def next(self) -> torch.Tensor:
        idx = self.stream.take(self.batch_size * self.world_size)
        return idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):  # as a DataLoader batch_sampler
        while True:
            yield self.next().tolist()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stream.state_dict()

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.stream.load_state_dict(s)


class PairedBatches:
    """``{"x_s", "y_s", "x_t", "idx_t"}`` batches: labelled source, unlabelled target.

    Images come out as float in [-1, 1]. Target labels are never handed to a method;
    ``idx_t`` (indices into the target split) lets self-training methods look up their
    pseudo-labels.
    """

    def __init__(self, src: InMemoryDomain, tgt: InMemoryDomain, batch_size: int, seed: int,
                 world_size: int = 1, rank: int = 0):
        self.src, self.tgt = src, tgt
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        device = src.images.device
        # Different seeds per stream: the source and target orders are independent.
        self.streams = {"src": ShardedIndices(len(src), batch_size, seed * 2 + 1, device, world_size, rank),
                        "tgt": ShardedIndices(len(tgt), batch_size, seed * 2 + 2, device, world_size, rank)}

    def next(self) -> dict[str, torch.Tensor]:
        i_s = self.streams["src"].next()
        i_t = self.streams["tgt"].next()
        return {
            "x_s": normalize(self.src.images[i_s]),
            "y_s": self.src.labels[i_s],
            "x_t": normalize(self.tgt.images[i_t]),
            "idx_t": i_t,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{k}.{n}": v for k, s in self.streams.items() for n, v in s.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, s in self.streams.items():
            s.load_state_dict({n: state[f"{k}.{n}"] for n in ("perm", "pos", "gen")})
