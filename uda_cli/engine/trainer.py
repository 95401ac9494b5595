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
from uda_cli.config import TrainOptions, method_config
from uda_cli.data.batches import InMemoryDomain, PairedBatches
from uda_cli.data.registry import DomainSpec, flat_name, get_domain, load_domain, parse_domain, resolve_split
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import distributed
from uda_cli.engine.logging import RunLogger
from uda_cli.engine.metrics import evaluate_classifier
from uda_cli.engine.runtime import autocast_for, configure_backends, seed_everything
from uda_cli.errors import CheckpointError, ConfigError, OutputError, UDAError
from uda_cli.methods.base import Method, MethodConfig, OptimSpec, RoundContext, RunSpec
from uda_cli.methods.registry import get_method


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


# ---- method construction ----------------------------------------------------------------------

def build_method(name: str, config: MethodConfig, spec: RunSpec) -> Method:
    cls = get_method(name)
    if spec.task not in cls.tasks:
        raise ConfigError(f"method {name!r} handles {', '.join(sorted(cls.tasks))} domains, not {spec.task}")
    return cls(config, spec)


def load_method(weights: Path, device: torch.device) -> tuple[Method, dict[str, Any]]:
    """Rebuild a method from a checkpoint's metadata and load its weights (eval mode)."""
    meta = ckpt.read_metadata(weights)
    cfg = method_config(meta["method"], meta["config"], source="checkpoint config")
    method = build_method(meta["method"], cfg, RunSpec.from_json(meta["spec"]))
    ckpt.load_weights_into(method, ckpt.read_tensors(weights), weights)
    method.nets.to(device)
    method.eval()
    return method, meta


def run_data_root(given: Path | None, meta: dict[str, Any]) -> Path | None:
    """The data root for reading a run's domains again (evaluate, adapt-images, tsne).

    ``--data-root`` when given; else the run's own ``--data-root`` when that folder still
    exists (a run trained on ``--data-root /scratch/data`` is evaluated on the same files
    without repeating it); else None: ``UDA_DATA_ROOT`` or the cache folder, as for training.
    """
    if given is not None:
        return given
    saved = meta.get("options", {}).get("data_root")
    return Path(saved) if saved and Path(saved).is_dir() else None


# ---- optimizers ---------------------------------------------------------------------------------

def _lr_lambda(spec: OptimSpec, total: int) -> Callable[[int], float]:
    if spec.schedule == "constant":
        return lambda s: 1.0
    if spec.schedule == "step":
        return lambda s: spec.gamma ** (s // spec.step_every)
    if spec.schedule == "inv":  # DANN: lr_p = lr / (1 + 10 p)^0.75
        return lambda s: (1 + 10 * min(s / total, 1.0)) ** -0.75
    if spec.schedule == "poly":  # DeepLab: lr_p = lr (1 - p)^0.9
        return lambda s: max(1 - s / total, 0.0) ** 0.9
    raise ValueError(spec.schedule)


# Where the trainer asks for torch's fused Adam / SGD kernels: one kernel per step over all of a
# group's tensors instead of a Python loop of small ops per parameter. Measured on cpu
# (benchmarks/optim_step.py); cuda is where torch's fused kernels began, not yet run by us (no
# GPU in any session so far). Elsewhere (mps, xpu, ...) torch's default stands.
FUSED_DEVICES = ("cpu", "cuda")


def fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether an optimizer over ``params`` asks for the fused kernel: all on those devices, floats.

    Measured on one idle CPU core with the SVHN network's 25.9M parameters
    (benchmarks/optim_step.py): an Adam step (source-only's settings) 175 -> 16 ms, a whole
    source-only step (batch 64) 511 -> 347 ms, source-only on SVHN->MNIST 867 -> 599 s a run; an
    SGD step (DANN's settings) 17 -> 11 ms, the whole step unchanged
    (benchmarks/results/2026-11-25_cpu_1core_session16.md, with the accuracies over seeds). The
    fused kernels are the same algorithms in other float operations: a DANN run
    (MNIST2000->USPS1800, 60 steps) differs in the seventh digit of the domain loss, and fused
    Adam differs from the first steps. So a run with a given seed is not bit for bit the one it
    was before this change, as it is not on another machine; runs compare over seeds. Over six
    seeds of source-only on SVHN->MNIST (1,500 steps of 64, 5,000 MNIST train images held out;
    sessions 15-17) fused minus default reads +0.5 +- 2.2 points on test and -0.1 +- 1.5 held
    out: no shift that seeds can see (2026-11-25_cpu_1core_session17.md). A
    checkpoint stores the choice with the optimizer state, so a run resumed from an older
    checkpoint goes on with the kernels it started with, and a resume stays exact. A torch
    without the fused kernel for a device (the CPU ones are recent) gets its default kernels
    (``make_optimizer``).
    """
    return bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)


def make_optimizer(spec: OptimSpec, groups: list[dict[str, Any]], fused: bool = True) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (Adam or SGD, its lr, betas or momentum, weight decay) over
    ``groups``; with ``fused`` (the default), torch's fused kernel where ``fused_ok`` allows it
    and this torch has it."""
    if spec.kind == "adam":
        cls, kw = torch.optim.Adam, {"betas": spec.betas}
    else:
        cls, kw = torch.optim.SGD, {"momentum": spec.momentum}
    kw.update(lr=spec.lr, weight_decay=spec.weight_decay)
    if fused and fused_ok([p for g in groups for p in g["params"]]):
        try:
            return cls(groups, fused=True, **kw)
        except (TypeError, RuntimeError):  # a torch older than its fused kernel for this device
            pass
    return cls(groups, **kw)


def build_optimizers(method: Method, total: int):
    specs = method.optimizers()
    owned = [n for s in specs.values() for n in s.nets]
    if len(owned) != len(set(owned)) or set(owned) - set(method.nets):
        raise ValueError(f"{method.name}: every network must belong to at most one optimizer group ({specs})")
    optims, scheds, params = {}, {}, {}
    for gname, s in specs.items():
        groups = [{"params": list(method.nets[n].parameters()), "lr": s.lr * s.lr_mult.get(n, 1.0)} for n in s.nets]
        groups = [g for g in groups if g["params"]]
        params[gname] = [p for g in groups for p in g["params"]]
        optims[gname] = opt = make_optimizer(s, groups)
        scheds[gname] = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s, total))
    return specs, optims, scheds, params


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

def _domain_split(text: str, default_attr: str) -> tuple[DomainSpec, str]:
    name, split = parse_domain(text)
    spec = get_domain(name)
    return spec, resolve_split(spec, split, getattr(spec, default_attr))


def resolve_run(opts: TrainOptions) -> tuple[type[Method], MethodConfig, int, int]:
    cls = get_method(opts.method)
    cfg = method_config(opts.method, opts.params)
    return cls, cfg, opts.steps or cfg.steps, opts.batch_size or cfg.batch_size


def _find_resume(opts: TrainOptions, ckpt_dir: Path) -> Path | None:
    if opts.resume is None:
        if ckpt.holds_run(ckpt_dir.parent):
            raise ConfigError(
                f"{ckpt_dir.parent} already holds a run; pass --resume auto to continue it or --out for a new run folder"
            )
        return None
    if opts.resume == "auto":
        return ckpt.resolve_checkpoint(ckpt_dir.parent) if ckpt.holds_run(ckpt_dir.parent) else None
    return ckpt.resolve_checkpoint(Path(opts.resume))


def train(opts: TrainOptions, callbacks: tuple[Callable[[int], None], ...] = (), interactive: bool | None = None,
          console_print: Callable[[str], None] | None = None) -> RunResult:
    cls, cfg, total, batch_size = resolve_run(opts)
    src_spec, src_split = _domain_split(opts.src, "train_split")
    tgt_spec, tgt_split = _domain_split(opts.tgt, "train_split")
    tgt_eval_split = tgt_spec.eval_split
    if src_spec.task != tgt_spec.task or src_spec.classes != tgt_spec.classes:
        raise ConfigError(f"{src_spec.name} and {tgt_spec.name} do not share a task and classes; pick domains of the same task")
    if src_spec.image_size != tgt_spec.image_size:
        raise ConfigError(f"{src_spec.name} and {tgt_spec.name} have different image sizes")
    spec = RunSpec(task=src_spec.task, classes=src_spec.classes,
                   channels=cls.input_channels(cfg, src_spec.channels, tgt_spec.channels),
                   image_size=src_spec.image_size, domains=(src_spec.name, tgt_spec.name))

    run_dir = opts.run_dir()
    ckpt_dir = run_dir / "checkpoints"
    dist = distributed.setup(opts.device)  # one process, or the process group of this launch
    world = dist.world_size
    resume_from = _find_resume(opts, ckpt_dir)
    resume_meta = ckpt.read_metadata(resume_from) if resume_from else None
    if resume_meta:
        _check_resume_compatible(resume_meta, opts, cfg, batch_size, resume_from, world)
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

    # Data: each split read once, converted once, kept once (on the device), however many
    # roles it plays (source, target, evaluation).
    loaded: dict[tuple[str, str], InMemoryDomain] = {}

    def load(s, sp: str) -> InMemoryDomain:
        if (s.name, sp) not in loaded:
            loaded[s.name, sp] = InMemoryDomain(f"{s.name}:{sp}", *load_domain(
                s.name, sp, opts.data_root, channels=spec.channels, size=spec.image_size)).to(device)
        return loaded[s.name, sp]

    src = load(src_spec, src_split)
    tgt = load(tgt_spec, tgt_split)
    tgt_eval = load(tgt_spec, tgt_eval_split)
    batches = PairedBatches(src, tgt, batch_size, seed=opts.seed, world_size=world, rank=dist.rank)

    method = build_method(opts.method, cfg, spec)
    method.total_steps = total  # for schedules inside a method (e.g. DANN's reversal ramp)
    method.nets.to(device)
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

    def update(name: str, loss: torch.Tensor) -> None:
        if name not in optims:
            raise KeyError(f"{method.name}: no optimizer group {name!r} (groups: {', '.join(optims)})")
        opt = optims[name]
        opt.zero_grad(set_to_none=True)
        # Backward outside autocast, as PyTorch recommends; the forward ran under it. Only
        # towards this group's parameters: autograd then skips the weight gradients of every
        # other network the loss passes through (D in a G step), which are never used. That
        # is a third of a GAN step's convolution backward; the gradients reaching the group
        # are the same.
        trainable = [p for p in params[name] if p.requires_grad]
        with torch.autocast(device.type, enabled=False):
            torch.autograd.backward(loss, inputs=trainable or None)
        # Average this group's gradients over the ranks: the mean over the global batch. Only
        # this group's: the gradients a backward leaves on other groups (a GAN's G step
        # reaching D) are discarded by their own update's zero_grad, reduced or not.
        dist.all_reduce_grads(params[name])
        if specs[name].grad_clip:
            torch.nn.utils.clip_grad_norm_(params[name], specs[name].grad_clip)
        opt.step()

    method._update = update

    start, rng_note = 0, None
    if resume_from:
        ckpt.load_weights_into(method, ckpt.read_tensors(resume_from), resume_from)
        state = ckpt.read_train_state(resume_from)
        for g, opt in optims.items():
            opt.load_state_dict(state["optim"][g])
            scheds[g].load_state_dict(state["sched"][g])
        batches.load_state_dict(state["batches"])
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
        report = evaluate_classifier(method, tgt_eval.images, tgt_eval.labels, 512, autocast, dist)
        logger.eval(step, meta["tgt_eval"], report)
        return {"domain": meta["tgt_eval"], **report}

    rounds = sorted(method.round_starts(total))
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
        if world > 1:
            logger.info(f"distributed: {dist.describe()}; {batch_size} images per domain per process, "
                        f"global batch {global_batch} per domain per step")
        if resume_from:
            logger.info(f"resumed from {resume_from} at step {start}")
            if rng_note:
                logger.info(rng_note)
        past = [r for r in rounds if r < start]
        if past and start not in rounds:  # resumed mid-round: reload what the round prepared
            method.prepare_round(RoundContext(run_dir, rounds.index(past[-1]), start, True, tgt, device, autocast))
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # steps that reported each loss (phases report different ones)
        n_acc, t_last = 0, time.perf_counter()
        step = start
        while step < total:
            if step in rounds:
                method.prepare_round(RoundContext(run_dir, rounds.index(step), step, False, tgt, device, autocast))
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


def write_eval(folder: Path, domain: str, step: int, report: dict[str, Any], checkpoint: Path | None) -> Path:
    path = folder / f"{flat_name(domain)}_step{step:08d}.json"  # the payload has the domain itself
    payload = {"domain": domain, "step": step, "checkpoint": str(checkpoint) if checkpoint else None, **report}
    ckpt.atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


def _check_resume_compatible(meta: dict[str, Any], opts: TrainOptions, cfg: MethodConfig, batch_size: int,
                             path: Path, world_size: int = 1) -> None:
    saved = meta.get("options", {})
    diffs = []
    if meta["method"] != opts.method:
        diffs.append(f"method {meta['method']} vs {opts.method}")
    for k in ("src", "tgt", "seed"):
        if saved.get(k) != getattr(opts, k):
            diffs.append(f"{k} {saved.get(k)} vs {getattr(opts, k)}")
    # What must match is the global batch (per-rank batch x ranks): it fixes the data order.
    saved_world = int(saved.get("world_size", 1))
    if saved.get("batch_size", 0) * saved_world != batch_size * world_size:
        if saved_world == 1 and world_size == 1:
            diffs.append(f"batch size {saved.get('batch_size')} vs {batch_size}")
        else:
            diffs.append(f"global batch size {saved.get('batch_size')} x {saved_world} processes vs "
                         f"{batch_size} x {world_size}")
    if meta["config"] != cfg.model_dump(mode="json"):
        diffs.append("method hyperparameters")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it differs in {'; '.join(diffs)}; use the same options or a new --out")
