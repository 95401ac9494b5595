"""THE training loop: every method, every domain pair, one loop.

It owns the device, precision, optimizers and their schedules, the batch streams, logging,
evaluation cadence, checkpoints, resume and interruption. A method contributes networks and
the losses of one step (see ``uda_cli/methods/base.py``).

Iteration-based: a run is ``steps`` steps of one source and one target batch each.
Evaluation on the target's evaluation split every ``eval_every`` steps is logged only; the
checkpoint that ``evaluate`` reports by default is the final one, never a best-on-target
pick (that would use target labels for model selection).

Interruption: SIGINT, SIGTERM and SIGUSR1 let the current step finish, write a complete
checkpoint and return; the command then exits with 128 + the signal number (130, 143, 138)
so a scheduler can requeue and ``--resume auto`` continue. A second SIGINT stops at once,
keeping the last complete checkpoint.

Several processes (``torchrun``, or ``srun`` tasks; see ``engine/distributed.py``): every
rank runs this same loop on its slice of each global batch (``batch_size`` images per
domain per rank, ``batch_size * world_size`` per step in all); ``update`` averages the
group's gradients over the ranks before clipping and stepping, so every rank holds the same
weights and optimizer state. Rank 0 alone writes config.json, metrics.jsonl, checkpoints,
evaluation reports and progress; evaluation is sharded over the ranks and summed. Dropout,
noise and augmentation draw from a per-rank RNG seeded from (seed, rank); a checkpoint keeps
every rank's RNG state, so a resume on as many ranks is exact. A signal reaching any rank
stops all of them after the same step (``StopVote``): they write one checkpoint together
(rank 0 writes, all wait for it) and exit with the same status.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from uda_cli import __version__
from uda_cli.config import TrainOptions
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import distributed
from uda_cli.engine.logging import RunLogger
from uda_cli.engine.runtime import autocast_for, configure_backends, resolve_precision, seed_everything
from uda_cli.engine.setup import (  # noqa: F401  (build_method ... write_eval: re-exported for callers of old)
    build_data, build_method, build_optimizers, check_pair, check_resume_compatible, domain_split, find_resume,
    fused_ok, load_method, make_optimizer, resolve_run, run_data_root, run_sizes, write_eval,
)
from uda_cli.errors import ConfigError, OutputError, UDAError
from uda_cli.methods.base import RoundContext, RunSpec


@dataclass
class RunResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    final_eval: dict[str, Any] | None = None
    interrupted_by: int | None = None  # signal number, when a signal stopped the run
    # A stop signal that came after the last step's check (during its checkpoint or the final
    # evaluation): the run is complete, but a caller running several (a benchmark) must stop.
    late_signal: int | None = None
    train_seconds: float = 0.0  # time in training steps (evaluation and checkpoints excluded)
    images_seen: int = 0  # source + target images this call trained on (all ranks)
    history: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0  # this process's rank (0 in a single-process run): only rank 0 reports
    world_size: int = 1


# ---- signals ---------------------------------------------------------------------------------------

class StopFlag:
    """Turns SIGINT/SIGTERM/SIGUSR1 into a request to stop after the current step."""

    SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGUSR1")) if s)

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now; the last checkpoint stays
        self.signum = signum

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# ---- the loop ----------------------------------------------------------------------------------

def train(opts: TrainOptions, callbacks: tuple[Callable[[int], None], ...] = (), interactive: bool | None = None,
          console_print: Callable[[str], None] | None = None) -> RunResult:
    src_spec, src_split = domain_split(opts.src, "train_split")
    tgt_spec, tgt_split = domain_split(opts.tgt, "train_split")
    tgt_eval_split = tgt_spec.eval_split
    check_pair(src_spec, tgt_spec)
    cls, cfg, total, batch_size = resolve_run(opts, src_spec.task, (src_spec.name, tgt_spec.name))
    if src_spec.task == "classification" and src_spec.image_size != tgt_spec.image_size:
        raise ConfigError(f"{src_spec.name} and {tgt_spec.name} have different image sizes")
    sizes = run_sizes(opts, src_spec, tgt_spec)
    spec = RunSpec(task=src_spec.task, classes=src_spec.classes,
                   channels=cls.input_channels(cfg, src_spec.channels, tgt_spec.channels),
                   image_size=tuple(sizes["tgt"]), domains=(src_spec.name, tgt_spec.name),
                   class_subsets=tuple((dict(src_spec.class_subsets) | dict(tgt_spec.class_subsets)).items()))

    run_dir = opts.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    dist = distributed.setup(opts.device)  # one process, or the process group of this launch
    world = dist.world_size
    resume_from = find_resume(opts, ckpt_dir)
    resume_meta = ckpt.read_metadata(resume_from) if resume_from else None
    if resume_meta:
        check_resume_compatible(resume_meta, opts, cfg, batch_size, resume_from, world)
        if resume_meta["step"] > total:
            raise ConfigError(f"{resume_from} is at step {resume_meta['step']}, past --steps {total}; pass --steps "
                              f"{resume_meta['step']} or more, or evaluate it with uda evaluate {resume_from}")
    if dist.is_main:  # before any data is read or network built: a bad --out fails at once
        ckpt.make_folder(run_dir, "the run folder", "pass --out a folder you can write to")

    # A resumed run keeps the precision it trained in unless told otherwise (it is recorded below).
    saved_precision = (resume_meta or {}).get("options", {}).get("precision")
    opts = opts.model_copy(update={"precision": opts.precision or saved_precision or "auto"})
    device = dist.device
    configure_backends(device, opts.precision)
    autocast = autocast_for(device, opts.precision)
    seed_everything(opts.seed)

    data = build_data(opts, spec, src_spec, src_split, tgt_spec, tgt_split, tgt_eval_split, sizes, batch_size,
                      dist, device)
    batches, tgt = data.batches, data.target

    method = build_method(opts.method, cfg, spec)
    method.total_steps = total  # for schedules inside a method (e.g. DANN's reversal ramp)
    if opts.init is not None and resume_from is None:
        init_from(method, opts.init)
    method.nets.to(device)
    if device.type == "cuda" and spec.task == "segmentation":
        # NHWC convolutions are cuDNN's fast path for bf16 on tensor cores (the input batches
        # stay NCHW; the first convolution converts). Not yet timed on a GPU by us.
        method.nets.to(memory_format=torch.channels_last)
    method.train()
    buffers = list(method.nets.buffers())
    if world > 1:
        # Same seed, same initial weights on every rank already; broadcasting rank 0's makes
        # that a guarantee (as DDP does) whatever a network's initialisation draws.
        dist.broadcast_([*method.nets.parameters(), *buffers])
        # From here on each rank draws its own dropout masks, noise and augmentations: with
        # one stream for all, every rank would apply the same masks to different images.
        seed_everything(distributed.rank_seed(opts.seed, dist.rank))
    specs, optims, scheds, params = build_optimizers(method, total)

    def update(name: str | tuple[str, ...], loss: torch.Tensor) -> None:
        names = (name,) if isinstance(name, str) else tuple(name)
        for n in names:
            if n not in optims:
                raise KeyError(f"{method.name}: no optimizer group {n!r} (groups: {', '.join(optims)})")
        for n in names:
            optims[n].zero_grad(set_to_none=True)
        # Backward outside autocast, as PyTorch recommends; the forward ran under it. Only
        # towards these groups' parameters: autograd then skips the weight gradients of every
        # other network the loss passes through (D in a G step), which are never used. That
        # is a third of a GAN step's convolution backward; the gradients reaching the groups
        # are the same. Several groups (one loss, optimizers of their own: i2i's segmentation
        # network and its decoders) share the one backward.
        trainable = [p for n in names for p in params[n] if p.requires_grad]
        with torch.autocast(device.type, enabled=False):
            torch.autograd.backward(loss, inputs=trainable or None)
        # Average these groups' gradients over the ranks: the mean over the global batch. Only
        # these: the gradients a backward leaves on other groups (a GAN's G step reaching D)
        # are discarded by their own update's zero_grad, reduced or not.
        for n in names:
            dist.all_reduce_grads(params[n])
            if specs[n].grad_clip:
                torch.nn.utils.clip_grad_norm_(params[n], specs[n].grad_clip)
            optims[n].step()

    method._update = update

    start, rng_note = 0, None
    if resume_from:
        ckpt.load_weights_into(method, ckpt.read_tensors(resume_from), resume_from)
        state = ckpt.read_train_state(resume_from)
        for g, opt in optims.items():
            opt.load_state_dict(state["optim"][g])
            scheds[g].load_state_dict(state["sched"][g])
        # The batch streams' state is restored below, once a round resumed mid-way has rebuilt
        # its target stream: its state is the round's stream's, not the one set up above.
        resume_batches = state["batches"]
        start = resume_meta["step"]
        rng_note = _restore_rng(state, dist, opts.seed, start)

    global_batch = batch_size * world

    meta = {
        "method": opts.method,
        "config": cfg.model_dump(mode="json"),
        "spec": spec.to_json(),
        "options": {**opts.model_dump(mode="json"), "steps": total, "batch_size": batch_size, "world_size": world,
                    "global_batch_size": global_batch},
        "src": f"{src_spec.name}:{src_split}",
        "tgt": f"{tgt_spec.name}:{tgt_split}",
        "tgt_eval": f"{tgt_spec.name}:{tgt_eval_split}",
        "sizes": data.sizes,  # (H, W) of the source, the target and the crop as trained
    }
    if dist.is_main:
        ckpt.atomic_write_bytes(run_dir / "config.json", (json.dumps(
            {**meta, "uda_version": __version__, "device": str(device)}, indent=2) + "\n").encode())

    def save(step: int) -> Path:
        # Every rank takes part (its RNG state is gathered); rank 0 alone writes.
        rng = ckpt.rng_state()
        state = {
            "optim": {g: o.state_dict() for g, o in optims.items()},
            "sched": {g: s.state_dict() for g, s in scheds.items()},
            "batches": batches.state_dict(),
            "rng": rng,
        }
        if world > 1:
            packed = dist.gather_bytes(ckpt.pack_state(rng))
            state["rng_ranks"] = [ckpt.unpack_state(b) for b in packed] if dist.is_main else []
        if dist.is_main:
            return ckpt.save_checkpoint(ckpt_dir, step, method, meta, state, keep=opts.keep_checkpoints)
        return ckpt_dir / f"{ckpt.step_name(step)}.safetensors"

    def evaluate(step: int) -> dict[str, Any]:
        report = data.evaluate(method, autocast, dist)
        logger.eval(step, meta["tgt_eval"], report)
        return {"domain": meta["tgt_eval"], **report}

    rounds = sorted(method.round_starts(total))
    if rounds:
        method.check_target(tgt)
    result = RunResult(run_dir=run_dir, step=start, checkpoint=resume_from, rank=dist.rank, world_size=world)
    imgs_per_step = 2 * global_batch
    vote = dist.stop_vote()
    with _keeps_checkpoint(ckpt_dir, result), \
            RunLogger(run_dir, total, start, interactive=interactive, enabled=dist.is_main,
                      fmt=opts.log_format) as logger, StopFlag() as stop, warnings.catch_warnings():
        # The lr is a function of the global step, also for a group that did not step (e.g.
        # DTN's frozen f during pretraining): torch's "scheduler before optimizer" warning does
        # not apply. Filtered once for the loop, not per step.
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
        logger.info(_header(opts, meta, method, spec, device, total, batch_size, world, run_dir))
        if world > 1:
            logger.info(f"distributed: {dist.describe()}; {batch_size} images per domain per process, "
                        f"global batch {global_batch} per domain per step")
        if resume_from:
            logger.info(f"resumed from {resume_from} at step {start}")
            if rng_note:
                logger.info(rng_note)
        def round_context(index: int, at: int, resumed: bool) -> RoundContext:
            return RoundContext(run_dir, index, at, resumed, tgt, device, autocast, dist=dist,
                                size=tuple(data.sizes["tgt"]), seed=opts.seed, num_workers=data.workers,
                                set_target=None if data.set_target is None else
                                (lambda source, name="tgt": data.set_target(source, name, index)),
                                info=logger.info)

        past = [r for r in rounds if r < start]
        if past and start not in rounds:  # resumed mid-round: reload what the round prepared
            method.prepare_round(round_context(rounds.index(past[-1]), start, True))
        if resume_from:
            if start in rounds and hasattr(batches, "set_target"):
                # A round starts at this very step and replaces the target streams: restore the
                # source's position only (the saved target streams may cover another image set).
                batches.load_state_dict(resume_batches, only=("src",))
            else:
                batches.load_state_dict(resume_batches)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # steps that reported each loss (phases report different ones)
        n_acc, t_last = 0, time.perf_counter()
        step = start
        while step < total:
            if step in rounds:
                method.prepare_round(round_context(rounds.index(step), step, False))
            with autocast():
                losses = method.train_step(batches.next(), step)
            if buffers and world > 1:
                dist.broadcast_(buffers)  # rank 0's BN running statistics everywhere (DDP's broadcast_buffers)
            for s in scheds.values():
                s.step()
            for k, v in losses.items():
                if k in sums:
                    sums[k] = sums[k] + v.float()
                    counts[k] += 1
                else:
                    sums[k], counts[k] = v.float(), 1
            n_acc += 1
            step += 1
            result.step = step
            if step % opts.log_every == 0 or step == total:
                values = {}
                if sums:
                    # Means over the log interval and over the ranks (the loss of the global batch):
                    # every rank sees the same values, so all agree on the finiteness check below.
                    per_key = torch.tensor([counts[k] for k in sums], dtype=torch.float32, device=device)
                    means = dist.all_reduce_mean_(torch.stack(list(sums.values())).div(per_key))
                    values = dict(zip(sums, means.tolist()))
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    raise UDAError(f"loss {bad[0]} is not finite at step {step} ({_checkpoint_note(ckpt_dir)}); "
                                   "lower the learning rate, e.g. --set lr=...")
                for g, o in optims.items():
                    values[f"lr/{g}"] = o.param_groups[0]["lr"]
                now = time.perf_counter()
                result.train_seconds += now - t_last
                result.images_seen += n_acc * imgs_per_step
                it_s = n_acc / max(now - t_last, 1e-9)
                logger.train(step, values, it_s, it_s * imgs_per_step)
                result.history.append({"step": step, **values})
                sums, counts, n_acc, t_last = {}, {}, 0, now
            else:
                logger.advance(step)
            t_pause = time.perf_counter()
            if opts.eval_every and step % opts.eval_every == 0 and step != total:
                evaluate(step)
            if step % opts.save_every == 0 or step == total:
                result.checkpoint = save(step)
            t_last += time.perf_counter() - t_pause  # throughput counts training time only
            for cb in callbacks:
                cb(step)
            signum = vote.poll(stop.signum)  # the same answer on every rank, at the same step
            if signum is not None and step < total:
                if step % opts.save_every:
                    result.checkpoint = save(step)
                dist.barrier()  # no rank leaves (and lets a launcher tear the job down) before the write
                result.interrupted_by = signum
                logger.info(f"stopped by signal {signum} at step {step}; checkpoint {result.checkpoint}; "
                            f"continue with --resume auto")
                return result
        vote.drain()
        if step == start and start == total and resume_from:
            logger.info(f"run already complete at step {total}")
        result.final_eval = evaluate(step)
        if dist.is_main:
            write_eval(run_dir / "eval", meta["tgt_eval"], step, result.final_eval, result.checkpoint)
        dist.barrier()
        result.late_signal = stop.signum
        if result.late_signal is not None:
            logger.info(f"stop signal {result.late_signal} came after the last step; the run is complete "
                        f"(checkpoint {result.checkpoint})")
    return result


def init_from(method, path: Path) -> None:
    """``--init``: start ``method``'s networks from another run's, by name (F from F, ...): a
    source-only run's segmentation network for a self-training method. Networks the other run
    has not (D) keep their initialisation; one of another task, classes or shape is one line."""
    weights = ckpt.resolve_checkpoint(path)
    meta = ckpt.read_metadata(weights)
    theirs = RunSpec.from_json(meta["spec"])
    if theirs.task != method.spec.task or tuple(theirs.classes) != tuple(method.spec.classes):
        raise ConfigError(f"--init {path}: a {theirs.task} run of {len(theirs.classes)} classes ({meta['method']}), "
                          f"this one is {method.spec.task} of {len(method.spec.classes)}; pass a run of the same "
                          "task and classes")
    tensors = ckpt.read_tensors(weights)
    shared = [g for g in method.nets if any(k.startswith(f"{g}.") for k in tensors)]
    if not shared:
        raise ConfigError(f"--init {path} ({meta['method']}) has none of this method's networks "
                          f"({', '.join(method.nets)}); pass a run of a method with the same networks")
    for g in shared:
        sd = {k[len(g) + 1:]: v for k, v in tensors.items() if k.startswith(f"{g}.")}
        try:
            method.nets[g].load_state_dict(sd)
        except RuntimeError as e:
            first = (str(e).splitlines() or ["shape mismatch"])[0]
            model = meta["config"].get("model", "?")
            raise ConfigError(f"--init {path}: its network {g} ({model}) does not fit this run's "
                              f"({getattr(method.cfg, 'model', '?')}): {first[:160]}; pass --set model= as that run "
                              "had it") from None


def _header(opts, meta, method, spec, device, total, batch_size, world, run_dir) -> str:
    """The run in one line, before its first step: what trains on what, where, and how long."""
    nets = ", ".join(f"{n} {sum(p.numel() for p in m.parameters()) / 1e6:.2f}M" for n, m in method.nets.items())
    model = getattr(method.cfg, "model", "auto")
    net = f"{model} ({nets})" if spec.task == "segmentation" and model != "auto" else nets
    sizes = ""
    if spec.task == "segmentation":
        sz = meta["sizes"]
        sizes = f" | sizes {sz['src'][1]}x{sz['src'][0]} -> {sz['tgt'][1]}x{sz['tgt'][0]}"
        if "crop" in sz:
            sizes += f", crop {sz['crop'][1]}x{sz['crop'][0]}"
    batch = f"batch {batch_size}" + (f" x {world} processes" if world > 1 else "")
    return (f"{opts.method}: {meta['src']} -> {meta['tgt']} | networks {net} | {device} "
            f"{resolve_precision(device, opts.precision)} | {batch}{sizes} | {total} steps | {run_dir}")


def _checkpoint_note(ckpt_dir: Path) -> str:
    last = ckpt_dir / "latest"
    return f"the last complete checkpoint is {last.read_text().strip()}" if last.exists() else "no checkpoint was written"


@contextmanager
def _keeps_checkpoint(ckpt_dir: Path, result: RunResult):
    """A write that fails mid-run (a full disk, a folder gone) says at which step, and what the
    run folder still holds to resume from; the checkpoint writes are atomic, so that one is whole."""
    try:
        yield
    except OutputError as e:
        raise OutputError(f"{e} (at step {result.step}; {_checkpoint_note(ckpt_dir)}; continue with --resume auto "
                          "once that is fixed)") from None


def _restore_rng(state: dict[str, Any], dist: "distributed.Dist", seed: int, step: int) -> str | None:
    """Put back this rank's RNG state; a note when that cannot be exact (another number of ranks)."""
    by_rank = state.get("rng_ranks") or []
    if len(by_rank) == dist.world_size:
        ckpt.set_rng_state(by_rank[dist.rank])
        return None
    if not by_rank and dist.world_size == 1:
        ckpt.set_rng_state(state["rng"])
        return None
    # Resumed on another number of ranks: the data order is unchanged (it depends on the global
    # batch only), but dropout/noise streams cannot be split or merged: fresh per-rank seeds.
    seed_everything(distributed.rank_seed(seed, dist.rank, step))
    saved = max(len(by_rank), 1)
    return (f"the checkpoint was written by {saved} process(es), this run has {dist.world_size}: same data order, "
            f"fresh dropout/noise random streams (not bit-identical to an uninterrupted run)")
