"""Multi-process training: the launch environment, the process group, and the collectives
the training loop needs. Built on ``torch.distributed`` (NCCL on CUDA, gloo on the CPU).

Launchers. ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``; where those are absent, a task started by ``srun``
reads ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_LOCALID`` and the first host of
``SLURM_STEP_NODELIST`` (port: ``MASTER_PORT``, else one derived from the job id). Only
``srun`` sets the ``SLURM_STEP_*`` variables: a ``uda`` started straight from a batch script
(which sees ``SLURM_NTASKS`` but is one process) stays a single process. Without either,
a run is one process and nothing here does any communication.

Devices. ``--device auto`` or ``cuda`` becomes ``cuda:<local rank>`` (modulo the visible
devices, so ``srun --gpus-per-task=1``, where each task sees one GPU, works too).

How gradients are synchronised, and why not ``DistributedDataParallel``. Every network
group's optimizer is stepped by the engine's ``update(group, loss)``; right after that
backward and before clipping and the step, :meth:`Dist.all_reduce_grads` averages the
gradients of *that group's* parameters over the ranks (bucketed, flattened all-reduces
of about 25 MB, as DDP does). This is DDP's arithmetic (the mean of the per-rank
gradients, parameters broadcast from rank 0 at the start) applied at the one place the
engine knows which parameters are about to step. We do not wrap the networks in DDP
because DDP ties its reduction to a module's forward/backward pairing, and the methods
here break that pairing on purpose: a GAN's generator step backpropagates through the
discriminator (DDP would all-reduce gradients that are then thrown away, and complains
when a module runs forward twice or a parameter gets no gradient, unless
``find_unused_parameters``, whose graph walk breaks again with several forwards before
one backward); DANN's single backward crosses three modules; I2I runs one encoder in
several losses. Reducing at ``update`` is exact for any number of alternating updates,
keeps ``method.nets`` the plain modules (checkpoint keys identical to single-process
runs, no ``module.`` prefix), and costs what DDP costs minus the overlap of communication
with the backward pass (small for the networks here; see the README's Clusters section).
A parameter that gets no gradient on some rank counts as a zero gradient there (DDP's
``find_unused_parameters`` rule); one that gets none on any rank keeps ``grad=None``, so
the optimizer skips it exactly as in a single process.

Batch norm. Each rank normalises its own batch (no SyncBatchNorm); the running statistics
of rank 0 are broadcast to the other ranks after every step (DDP's ``broadcast_buffers``),
so evaluation and checkpoints see one set of buffers on every rank.

Host-side agreement (stop votes, RNG-state gathering, barriers) runs on a gloo group on
the CPU even when training uses NCCL, so it never waits for the GPU.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

from uda_cli.errors import ConfigError

if TYPE_CHECKING:
    import torch

BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


# ---- the launch environment (no torch here: the CLI asks before importing it) ------------------

@dataclass(frozen=True)
class LaunchEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    launcher: str = "none"  # "torchrun" (or any launcher that sets RANK/WORLD_SIZE), "slurm", "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        v = env.get(n)
        if v not in (None, ""):
            m = re.match(r"\d+", v)  # SLURM_STEP_TASKS_PER_NODE may read "4(x2)"
            if m:
                return int(m.group(0))
    return default


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``gpu[03-05,9],cpu1`` -> ``gpu03``."""
    depth, item = 0, ""
    for ch in nodelist.strip():  # first comma-separated item outside brackets
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        item += ch
    # each bracket expression -> its first value (zero padding kept: "[003-010]" -> "003")
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0], item)


def slurm_port(job_id: str | None) -> int:
    """A port derived from the job id, so two jobs sharing a node do not collide."""
    return 20000 + (int(job_id) % 20000 if job_id and job_id.isdigit() else 9500)


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """Where this process sits: torchrun's variables first, then SLURM's (inside srun only)."""
    env = os.environ if env is None else env
    if env.get("RANK") not in (None, "") and env.get("WORLD_SIZE") not in (None, ""):
        world = _int(env, "WORLD_SIZE", default=1)
        return LaunchEnv(
            rank=_int(env, "RANK", default=0), world_size=world,
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_world_size=_int(env, "LOCAL_WORLD_SIZE", default=world),
            master_addr=env.get("MASTER_ADDR"), master_port=_int(env, "MASTER_PORT"),
            launcher="torchrun",
        )
    world = _int(env, "SLURM_STEP_NUM_TASKS")
    if world is not None and env.get("SLURM_PROCID") not in (None, ""):
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID", default=0), world_size=world,
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_world_size=_int(env, "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE", default=world),
            master_addr=env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") or slurm_port(env.get("SLURM_JOB_ID")),
            launcher="slurm",
        )
    return LaunchEnv()


def rank_seed(seed: int, rank: int, *salt: int) -> int:
    """A seed for one rank's dropout/noise RNG, independent of other ranks and other seeds."""
    text = ":".join(str(v) for v in (seed, rank, *salt))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


# ---- the process group ------------------------------------------------------------------

class Dist:
    """The ranks a run trains on. With one process every method is a no-op."""

    def __init__(self, env: LaunchEnv, device: "torch.device", backend: str | None = None, control=None):
        self.env = env
        self.device = device
        self.backend = backend
        self._control = control  # gloo group for host-side agreement (None: the default group)

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_main(self) -> bool:
        return self.env.rank == 0

    def describe(self) -> str:
        return f"{self.world_size} processes ({self.backend} on {self.device.type}, launched by {self.env.launcher})"

    # -- host-side agreement ----------------------------------------------------------------
    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as td

            td.barrier(group=self._control)

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` (variable length), on every rank, in rank order."""
        if self.world_size == 1:
            return [data]
        import torch
        import torch.distributed as td

        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        td.all_gather(sizes, n, group=self._control)
        longest = max(int(s) for s in sizes)
        buf = torch.zeros(longest, dtype=torch.uint8)
        if data:
            buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        td.all_gather(out, buf, group=self._control)
        return [bytes(o[: int(s)].numpy()) for o, s in zip(out, sizes)]

    # -- training collectives -----------------------------------------------------------------
    def all_reduce_grads(self, params: list["torch.Tensor"], bucket_bytes: int = BUCKET_BYTES) -> None:
        """Average the gradients of ``params`` over the ranks, in place (see the module docstring)."""
        if self.world_size == 1 or not params:
            return
        import torch
        import torch.distributed as td

        missing = [p.grad is None for p in params]
        # Which parameters got a gradient anywhere: reduced alongside the buckets, read on the
        # host only when this rank lacks one (the common case needs no host sync).
        seen = torch.tensor([0.0 if m else 1.0 for m in missing], device=params[0].device)
        works = [td.all_reduce(seen, async_op=True)]
        for p, m in zip(params, missing):
            if m:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        buckets = _buckets(grads, bucket_bytes)
        flats = []
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            works.append(td.all_reduce(flat, async_op=True))
            flats.append(flat)
        for w in works:
            w.wait()
        for bucket, flat in zip(buckets, flats):
            flat.div_(self.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        if any(missing):
            for p, count in zip(params, seen.tolist()):
                if count == 0:
                    p.grad = None  # no rank produced one: the optimizer skips it, as in one process

    def broadcast_(self, tensors: Iterable["torch.Tensor"], src: int = 0) -> None:
        """Overwrite ``tensors`` (parameters or buffers) with rank ``src``'s values, coalesced."""
        if self.world_size == 1:
            return
        import torch
        import torch.distributed as td

        tensors = list(tensors)
        if not tensors:
            return
        with torch.no_grad():
            for bucket in _buckets(tensors, BUCKET_BYTES):
                flat = torch.cat([t.detach().reshape(-1) for t in bucket])
                td.broadcast(flat, src=src)
                offset = 0
                for t in bucket:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def all_reduce_sum_(self, t: "torch.Tensor") -> "torch.Tensor":
        if self.world_size > 1:
            import torch.distributed as td

            td.all_reduce(t)
        return t

    def all_reduce_mean_(self, t: "torch.Tensor") -> "torch.Tensor":
        if self.world_size > 1:
            self.all_reduce_sum_(t).div_(self.world_size)
        return t

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (shares differ by at most one)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def stop_vote(self) -> "StopVote":
        return StopVote(self)


def _buckets(tensors: list["torch.Tensor"], cap: int) -> list[list["torch.Tensor"]]:
    """Consecutive runs of tensors of one dtype and device, each at most ``cap`` bytes (or one tensor)."""
    out: list[list] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        last = out[-1] if out else None
        if last and last[0].dtype == t.dtype and last[0].device == t.device and size + nbytes <= cap:
            last.append(t)
            size += nbytes
        else:
            out.append([t])
            size = nbytes
    return out


class StopVote:
    """Makes every rank stop at the same step after a signal reached any of them.

    Each step a rank puts its signal number (0: none) into an all-reduce(MAX) on the gloo
    group without waiting for it, and reads the previous step's result: the ranks agree one
    step after the first of them saw a signal, and no step ever waits on the vote (the
    reduction of step s overlaps step s+1). With one process the signal is acted on at once.
    """

    def __init__(self, dist: Dist):
        self.dist = dist
        self._pending = None

    def poll(self, local_signum: int | None) -> int | None:
        if self.dist.world_size == 1:
            return local_signum
        import torch
        import torch.distributed as td

        decided = self._collect()
        if decided:
            return decided
        t = torch.tensor([local_signum or 0], dtype=torch.int64)
        self._pending = (td.all_reduce(t, op=td.ReduceOp.MAX, group=self.dist._control, async_op=True), t)
        return None

    def _collect(self) -> int | None:
        if self._pending is None:
            return None
        work, t = self._pending
        self._pending = None
        work.wait()
        return int(t.item()) or None

    def drain(self) -> None:
        """Wait for a vote still in flight (before the ranks leave the loop)."""
        self._collect()


# ---- setting up ----------------------------------------------------------------------------

_CURRENT: Dist | None = None


def resolve_device_for(env: LaunchEnv, name: str) -> "torch.device":
    import torch

    from uda_cli.engine.runtime import resolve_device

    dev = resolve_device(name)
    if dev.type != "cuda" or not env.distributed:
        return dev
    if dev.index is not None and env.local_world_size > 1:
        raise ConfigError(f"--device {name}: with {env.local_world_size} processes per node each takes "
                          f"cuda:<local rank>; pass --device cuda or auto")
    if dev.index is not None:
        return dev
    return torch.device("cuda", env.local_rank % torch.cuda.device_count())


def setup(device_name: str = "auto", env: LaunchEnv | None = None) -> Dist:
    """The process group of this launch, started on first use and kept until the process exits."""
    global _CURRENT
    env = launch_env() if env is None else env
    device = resolve_device_for(env, device_name)
    if not env.distributed:
        return Dist(env, device)
    import torch
    import torch.distributed as td

    backend = "nccl" if device.type == "cuda" else "gloo"
    if _CURRENT is not None and td.is_initialized():
        if _CURRENT.device != device:
            raise ConfigError(f"this process already trains on {_CURRENT.device}; it cannot switch to {device}")
        return _CURRENT
    if not td.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed; install a build with it to train on several processes")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.launcher == "slurm":  # env:// reads these; torchrun has set them already
        os.environ.setdefault("MASTER_ADDR", env.master_addr or "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
    if not td.is_initialized():
        td.init_process_group(backend=backend, init_method="env://", rank=env.rank, world_size=env.world_size)
        atexit.register(_shutdown)
    control = None if backend == "gloo" else td.new_group(backend="gloo")
    _CURRENT = Dist(env, device, backend, control)
    return _CURRENT


def _shutdown() -> None:
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()


def launched_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher states it (0 when not launched distributed)."""
    e = launch_env(env)
    return e.rank if e.distributed else 0
