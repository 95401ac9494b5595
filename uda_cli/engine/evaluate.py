"""Evaluate any classification checkpoint on any labelled domain of the same classes.

Launched on several processes (``torchrun -m uda_cli evaluate ...``), each rank predicts a
share of the images, the confusion matrices are summed, and rank 0 writes the report: the
same numbers as one process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from uda_cli.config import EvaluateOptions
from uda_cli.data.registry import get_domain, load_domain, parse_domain, resolve_split
from uda_cli.engine import checkpoint as ckpt
from uda_cli.engine import distributed
from uda_cli.engine.metrics import evaluate_classifier
from uda_cli.engine.runtime import autocast_for, configure_backends, resolve_precision
from uda_cli.errors import ConfigError


def evaluate_checkpoint(opts: EvaluateOptions, loaded: dict | None = None) -> tuple[dict[str, Any], Path | None]:
    """Evaluate ``opts.target`` on ``opts.domain``. ``loaded``, a dict the caller keeps across
    calls, holds the domains read so far, so several checkpoints of one run read theirs once."""
    from uda_cli.engine.setup import load_method, run_data_root, write_eval

    weights = ckpt.resolve_checkpoint(opts.target)
    if opts.json_path:  # a bad --json fails before the work, not after it
        ckpt.make_folder(opts.json_path.parent, "the --json folder", "pass --json a path you can write to")
    dist = distributed.setup(opts.device)
    device = dist.device
    method, meta = load_method(weights, device)
    opts = opts.model_copy(update={"data_root": run_data_root(opts.data_root, meta)})
    domain_text = opts.domain or meta.get("tgt_eval") or meta["options"]["tgt"]
    name, split = parse_domain(domain_text)
    spec = get_domain(name)
    split = resolve_split(spec, split, spec.eval_split)
    if spec.task != method.spec.task:
        raise ConfigError(f"{name} is a {spec.task} domain and {weights} a {method.spec.task} checkpoint; pick a "
                          f"{method.spec.task} domain")
    if spec.classes != method.spec.classes:
        raise ConfigError(f"{name} has classes {spec.classes}, the checkpoint {method.spec.classes}; pick a domain of the same classes")
    if method.spec.task == "segmentation":
        return _evaluate_dense(opts, method, meta, weights, name, split, dist, device)
    for flag in ("size", "scales", "save_predictions"):
        if getattr(opts, flag) is not None:
            raise ConfigError(f"--{flag.replace('_', '-')} applies to segmentation checkpoints; {weights} is a "
                              "classification one")
    if opts.flip:
        raise ConfigError(f"--flip applies to segmentation checkpoints; {weights} is a classification one")
    key = (name, split, str(opts.data_root), method.spec.channels, tuple(method.spec.image_size))
    cache = loaded if loaded is not None else {}
    if key not in cache:
        cache[key] = load_domain(name, split, opts.data_root, channels=method.spec.channels, size=method.spec.image_size)
    images, labels = cache[key]
    # As the run trained unless told otherwise (an fp32 run on a GPU is read in fp32, not bf16).
    precision = opts.precision or meta["options"].get("precision") or "auto"
    configure_backends(device, precision)
    report = evaluate_classifier(method, images.to(device), labels.to(device), opts.batch_size or 512,
                                 autocast_for(device, precision), dist)
    report = {"method": meta["method"], "checkpoint": str(weights), "step": meta["step"], "domain": f"{name}:{split}",
              "precision": resolve_precision(device, precision), **report}
    written: Path | None = None
    if not dist.is_main:
        return report, None
    if opts.json_path:
        written = opts.json_path
        ckpt.atomic_write_bytes(written, (json.dumps(report, indent=2) + "\n").encode())
    elif weights.parent.name == "checkpoints":
        written = write_eval(weights.parent.parent / "eval", f"{name}:{split}", meta["step"], report, weights)
    return report, written


def _evaluate_dense(opts: EvaluateOptions, method, meta: dict[str, Any], weights: Path, name: str, split: str, dist,
                    device) -> tuple[dict[str, Any], Path | None]:
    """mIoU of a segmentation checkpoint on ``name:split`` (see ``engine/seg_eval.py``)."""
    from uda_cli.config import parse_scales, parse_size
    from uda_cli.data.registry import load_dense
    from uda_cli.engine.seg_eval import evaluate_segmentation
    from uda_cli.engine.setup import default_workers, eval_batch_size, write_eval

    if opts.save_predictions is not None and dist.is_main:
        ckpt.make_folder(opts.save_predictions, "the --save-predictions folder",
                         "pass --save-predictions a folder you can write to")
    source = load_dense(name, split, opts.data_root)
    if not source.labelled:
        raise ConfigError(f"{name}:{split} has no labels to score; pick a labelled split, e.g. --domain "
                          f"{name}:{get_domain(name).eval_split}")
    size = parse_size(opts.size) if opts.size else tuple(method.spec.image_size)
    scales = parse_scales(opts.scales) if opts.scales else (1.0,)
    precision = opts.precision or meta["options"].get("precision") or "auto"
    configure_backends(device, precision)
    spec = get_domain(name)
    subsets = dict(method.spec.class_subsets) | dict(spec.class_subsets)
    report = evaluate_segmentation(
        method, source, size, autocast_for(device, precision), dist, flip=opts.flip, scales=scales,
        batch_size=opts.batch_size or eval_batch_size(size),
        num_workers=default_workers() if opts.workers is None else opts.workers, save_dir=opts.save_predictions,
        subsets=tuple(subsets.items()), device=device)
    report = {"method": meta["method"], "checkpoint": str(weights), "step": meta["step"], "domain": f"{name}:{split}",
              "precision": resolve_precision(device, precision), **report}
    if not dist.is_main:
        return report, None
    if opts.json_path:
        ckpt.atomic_write_bytes(opts.json_path, (json.dumps(report, indent=2) + "\n").encode())
        return report, opts.json_path
    if weights.parent.name == "checkpoints":
        return report, write_eval(weights.parent.parent / "eval", f"{name}:{split}", meta["step"], report, weights)
    return report, None
