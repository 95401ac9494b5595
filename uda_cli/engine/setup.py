"""Building a run: everything the training loop needs before its first step.

From validated options to a :class:`Run`: the method and its resolved hyperparameters, the
source/target domains (in device memory for digits, streamed from disk for dense data), the
batch stream, the target evaluator, the optimizers and schedules, and what a resume restores.
``engine/trainer.py`` is then only the loop. ``evaluate``, ``adapt-images`` and ``tsne``
rebuild a trained method with :func:`load_method` from here, never from the trainer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from uda_cli.config import TrainOptions, method_config, parse_scale, parse_size
from uda_cli.data.registry import DomainSpec, flat_name, get_domain, parse_domain, resolve_split
from uda_cli.engine import checkpoint as ckpt
from uda_cli.errors import CheckpointError, ConfigError
from uda_cli.methods.base import Method, MethodConfig, OptimSpec, RunSpec
from uda_cli.methods.registry import get_method


# ---- methods ------------------------------------------------------------------------------------

def build_method(name: str, config: MethodConfig, spec: RunSpec) -> Method:
    cls = get_method(name)
    if spec.task not in cls.tasks:
        raise ConfigError(f"method {name!r} handles {', '.join(sorted(cls.tasks))} domains, not {spec.task}")
    return cls(config, spec)


def load_method(weights: Path, device: torch.device) -> tuple[Method, dict[str, Any]]:
    """Rebuild a method from a checkpoint's metadata and load its weights (eval mode)."""
    meta = ckpt.read_metadata(weights)
    cfg = method_config(meta["method"], meta["config"], source="checkpoint config")
    method = build_method(meta["method"], cfg.model_copy(update={"pretrained": "none"})
                          if "pretrained" in type(cfg).model_fields else cfg, RunSpec.from_json(meta["spec"]))
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


def write_eval(folder: Path, domain: str, step: int, report: dict[str, Any], checkpoint: Path | None) -> Path:
    path = folder / f"{flat_name(domain)}_step{step:08d}.json"  # the payload has the domain itself
    payload = {"domain": domain, "step": step, "checkpoint": str(checkpoint) if checkpoint else None, **report}
    ckpt.atomic_write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
    return path


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
# (tools/optim_step.py); cuda is where torch's fused kernels began. Elsewhere (mps, xpu, ...)
# torch's default stands.
FUSED_DEVICES = ("cpu", "cuda")


def fused_ok(params: list[torch.Tensor]) -> bool:
    """Whether an optimizer over ``params`` asks for the fused kernel: all on those devices, floats.

    Measured on one CPU core (SVHN network, 25.9M parameters): an Adam step 175 -> 16 ms, a
    whole source-only step 511 -> 347 ms; over six seeds no accuracy shift the seeds can see
    (benchmarks/results/2026-11-25_cpu_1core_session16.md, ..._session17.md). Fused kernels
    round differently, so a seed's run is not bit for bit the unfused one; a checkpoint stores
    the choice with the optimizer state, so a resume stays exact.
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


def _net_groups(net: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """A network's parameter groups at base ``lr``: its own ``param_groups(lr)`` where it has
    one (DeepLab: backbone 1x, classifier 10x), else all its trainable parameters at ``lr``."""
    if hasattr(net, "param_groups"):
        return [g for g in net.param_groups(lr) if g["params"]]
    return [{"params": list(net.parameters()), "lr": lr}]


def build_optimizers(method: Method, total: int):
    specs = method.optimizers()
    owned = [n for s in specs.values() for n in s.nets]
    if len(owned) != len(set(owned)) or set(owned) - set(method.nets):
        raise ValueError(f"{method.name}: every network must belong to at most one optimizer group ({specs})")
    optims, scheds, params = {}, {}, {}
    for gname, s in specs.items():
        groups = [g for n in s.nets for g in _net_groups(method.nets[n], s.lr * s.lr_mult.get(n, 1.0))]
        groups = [g for g in groups if g["params"]]
        params[gname] = [p for g in groups for p in g["params"]]
        optims[gname] = opt = make_optimizer(s, groups)
        scheds[gname] = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(s, total))
    return specs, optims, scheds, params


# ---- options to a run ---------------------------------------------------------------------------

def domain_split(text: str, default_attr: str) -> tuple[DomainSpec, str]:
    name, split = parse_domain(text)
    spec = get_domain(name)
    return spec, resolve_split(spec, split, getattr(spec, default_attr))


def resolve_run(opts: TrainOptions, task: str | None = None,
                domains: tuple[str, ...] = ()) -> tuple[type[Method], MethodConfig, int, int]:
    """The method's class, its resolved config, the run's steps and batch size.

    A method may give task-specific defaults (``Method.task_defaults``: source-only's digit
    recipe differs from DeepLab's); the user's ``--set`` and ``[params]`` win over them. The
    config keeps the steps and batch size the run really has, so config.json says them.
    """
    cls = get_method(opts.method)
    params = {**cls.task_defaults(task, domains), **opts.params} if task else dict(opts.params)
    if opts.init is not None and "warmup_steps" in cls.Config.model_fields and "warmup_steps" not in opts.params:
        params["warmup_steps"] = 0  # --init replaces the source-only warm-up
    cfg = method_config(opts.method, params)
    total, batch_size = opts.steps or cfg.steps, opts.batch_size or cfg.batch_size
    derived = cls.derived_steps(cfg)
    if derived is not None:
        if opts.steps is not None and opts.steps != derived:
            raise ConfigError(f"{opts.method} derives its length: warmup_steps + rounds x round_steps = {derived} "
                              f"steps, not --steps {opts.steps}; set those with --set instead")
        total = derived
    cfg = cfg.model_copy(update={"steps": total, "batch_size": batch_size})
    return cls, cfg, total, batch_size


def find_resume(opts: TrainOptions, ckpt_dir: Path) -> Path | None:
    if opts.resume is None:
        if ckpt.holds_run(ckpt_dir.parent):
            raise ConfigError(
                f"{ckpt_dir.parent} already holds a run; pass --resume auto to continue it or --out for a new run folder"
            )
        return None
    if opts.resume == "auto":
        return ckpt.resolve_checkpoint(ckpt_dir.parent) if ckpt.holds_run(ckpt_dir.parent) else None
    return ckpt.resolve_checkpoint(Path(opts.resume))


def check_resume_compatible(meta: dict[str, Any], opts: TrainOptions, cfg: MethodConfig, batch_size: int,
                            path: Path, world_size: int = 1) -> None:
    saved = meta.get("options", {})
    diffs = []
    if meta["method"] != opts.method:
        diffs.append(f"method {meta['method']} vs {opts.method}")
    for k in ("src", "tgt", "seed", "src_size", "tgt_size", "crop", "scale", "flip"):
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
    # steps and batch size are compared above (and --steps may grow on a resume).
    mine = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in ("steps", "batch_size")}
    theirs = {k: v for k, v in meta["config"].items() if k not in ("steps", "batch_size")}
    if mine != theirs:
        diffs.append("method hyperparameters")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: it differs in {'; '.join(diffs)}; use the same options or a new --out")


def eval_batch_size(size: tuple[int, int]) -> int:
    """Images per evaluation batch at run size (H, W): about a megapixel (256 digit scenes of
    64x64, 2 Cityscapes frames of 1024x512); predictions are upsampled to full label size."""
    return max(1, (1 << 20) // (size[0] * size[1]))


def default_workers() -> int:
    """DataLoader workers per dense domain: up to 4, leaving one CPU to the training loop."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass
class Data:
    """A run's data: the batch stream, the target's training split (self-training rounds read
    it) and a target evaluator ``evaluate(method, autocast, dist) -> report``."""

    batches: Any
    target: Any
    evaluate: Callable[..., dict[str, Any]]
    sizes: dict[str, list[int]]
    workers: int = 0
    # set_target(source, name, round_index): a self-training round's target stream (dense runs)
    set_target: Callable[[Any, str, int], None] | None = None


def check_pair(src: DomainSpec, tgt: DomainSpec) -> None:
    if src.task != tgt.task:
        raise ConfigError(f"{src.name} is a {src.task} domain and {tgt.name} a {tgt.task} one; pick a source and "
                          "a target of the same task")
    if src.classes != tgt.classes:
        raise ConfigError(f"{src.name} and {tgt.name} do not share their classes; pick domains of the same classes")


def run_sizes(opts: TrainOptions, src: DomainSpec, tgt: DomainSpec) -> dict[str, tuple[int, int] | None]:
    """(H, W) of the source, the target and the crop; one line for a crop larger than an image."""
    if src.task != "segmentation":
        for flag in ("src_size", "tgt_size", "crop", "scale"):
            if getattr(opts, flag) is not None:
                raise ConfigError(f"--{flag.replace('_', '-')} applies to segmentation domains; "
                                  f"{src.name} is a {src.task} domain")
        return {"src": src.image_size, "tgt": tgt.image_size, "crop": None}
    s = parse_size(opts.src_size) if opts.src_size else src.image_size
    t = parse_size(opts.tgt_size) if opts.tgt_size else tgt.image_size
    crop = parse_size(opts.crop) if opts.crop else None
    if crop and not opts.scale:  # with --scale a smaller scaled image is padded, as CRST pads
        for role, (h, w) in (("source", s), ("target", t)):
            if crop[0] > h or crop[1] > w:
                raise ConfigError(f"--crop {opts.crop} is larger than the {role} images ({w}x{h}); pick a crop "
                                  f"within {w}x{h}, or resize with --{role[:3]}-size")
    return {"src": s, "tgt": t, "crop": crop}


def build_data(opts: TrainOptions, spec: RunSpec, src_spec: DomainSpec, src_split: str, tgt_spec: DomainSpec,
               tgt_split: str, tgt_eval_split: str, sizes: dict, batch_size: int, dist, device) -> Data:
    if spec.task == "segmentation":
        return _dense_data(opts, spec, src_spec, src_split, tgt_spec, tgt_split, tgt_eval_split, sizes, batch_size,
                           dist, device)
    return _memory_data(opts, spec, src_spec, src_split, tgt_spec, tgt_split, tgt_eval_split, batch_size, dist, device)


def classification_eval_batch(image_size) -> int:
    """Images per evaluation batch on a classification domain: 512 at digit size (32x32), as
    many pixels per batch at larger sizes (10 at Office-31's 224x224, where a batch of 512
    would hold tens of GB of ResNet-50 activations), never fewer than 2."""
    h, w = image_size
    return max(2, min(512, 512 * 32 * 32 // max(h * w, 1)))


def _memory_data(opts, spec, src_spec, src_split, tgt_spec, tgt_split, tgt_eval_split, batch_size, dist, device):
    """Digits: each split read once, converted once, kept once (on the device), however many
    roles it plays (source, target, evaluation)."""
    from uda_cli.data.batches import InMemoryDomain, PairedBatches
    from uda_cli.data.registry import load_domain
    from uda_cli.engine.metrics import evaluate_classifier

    loaded: dict[tuple[str, str], InMemoryDomain] = {}

    def load(s, sp: str) -> InMemoryDomain:
        if (s.name, sp) not in loaded:
            loaded[s.name, sp] = InMemoryDomain(f"{s.name}:{sp}", *load_domain(
                s.name, sp, opts.data_root, channels=spec.channels, size=spec.image_size)).to(device)
        return loaded[s.name, sp]

    src, tgt, tgt_eval = load(src_spec, src_split), load(tgt_spec, tgt_split), load(tgt_spec, tgt_eval_split)
    batches = PairedBatches(src, tgt, batch_size, seed=opts.seed, world_size=dist.world_size, rank=dist.rank)

    def evaluate(method, autocast, dist_):
        return evaluate_classifier(method, tgt_eval.images, tgt_eval.labels, classification_eval_batch(spec.image_size),
                                   autocast, dist_)

    return Data(batches, tgt, evaluate, {"src": list(spec.image_size), "tgt": list(spec.image_size)})


def _dense_data(opts, spec, src_spec, src_split, tgt_spec, tgt_split, tgt_eval_split, sizes, batch_size, dist,
                device):
    """Segmentation: sources read one sample at a time through DataLoader workers."""
    from uda_cli.data.registry import load_dense
    from uda_cli.data.streaming import Augment, DenseBatches, DenseDataset, sample_seed
    from uda_cli.engine.seg_eval import evaluate_segmentation

    src = load_dense(src_spec.name, src_split, opts.data_root)
    tgt = load_dense(tgt_spec.name, tgt_split, opts.data_root)
    tgt_eval = load_dense(tgt_spec.name, tgt_eval_split, opts.data_root)
    if not tgt_eval.labelled:
        raise ConfigError(f"{tgt_spec.name}:{tgt_eval_split} has no labels to evaluate on; pick a labelled split, "
                          f"e.g. --tgt {tgt_spec.name}:{tgt_spec.eval_split}")
    augment = Augment(crop=sizes["crop"], scale=parse_scale(opts.scale) if opts.scale else None, flip=opts.flip)
    workers = default_workers() if opts.workers is None else opts.workers
    batches = DenseBatches(
        DenseDataset(src, sizes["src"], augment, seed=opts.seed, stream="src"),
        DenseDataset(tgt, sizes["tgt"], augment, seed=opts.seed, stream="tgt", labels=False),
        batch_size, seed=opts.seed, device=device, world_size=dist.world_size, rank=dist.rank, num_workers=workers)
    subsets = dict(src_spec.class_subsets) | dict(tgt_spec.class_subsets)

    def evaluate(method, autocast, dist_):
        return evaluate_segmentation(method, tgt_eval, tuple(sizes["tgt"]), autocast, dist_, num_workers=workers,
                                     batch_size=eval_batch_size(sizes["tgt"]),
                                     subsets=tuple(subsets.items()), device=device)

    def set_target(source, name: str, round_index: int) -> None:
        # A round's target stream: its own order and augmentation, seeded by (seed, name, round)
        # alone, so a resumed round rebuilds the very stream its saved state belongs to.
        stream = f"{name}-round{round_index}"
        seed = sample_seed(opts.seed, stream, 0) % (1 << 31)
        # Labels only from a round's pseudo-label source: the target's own never reach training.
        batches.set_target(DenseDataset(source, sizes["tgt"], augment, seed=opts.seed, stream=stream,
                                        labels=getattr(source, "pseudo_labels", False)), seed, name)

    return Data(batches, tgt, evaluate, {k: list(v) for k, v in sizes.items() if v is not None}, workers,
                set_target)
