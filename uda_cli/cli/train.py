"""`uda train`: one run of a method on a source -> target pair.

Exit status: 0 done; 2 bad options; 1 another error (one line on stderr); 130, 143 or 138
when SIGINT, SIGTERM or SIGUSR1 stopped the run after writing a checkpoint (128 + the
signal number; continue with ``--resume auto``). Under ``torchrun`` or ``srun`` every rank
exits with the same status and only rank 0 prints.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from uda_cli.cli.options import BatchSize, DataRoot, Device, Precision


class LogFormat(str, Enum):
    auto = "auto"
    text = "text"
    json = "json"


def train(
    method: Annotated[Optional[str], typer.Option("--method", help="Method name, e.g. source-only, dann.", show_default=False)] = None,
    src: Annotated[Optional[str], typer.Option("--src", help="Labelled source domain[:split], e.g. mnist2000.", show_default=False)] = None,
    tgt: Annotated[Optional[str], typer.Option("--tgt", help="Unlabelled target domain[:split[START:STOP]], e.g. usps1800 or 'mnist:train[:-5000]'.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Training steps (default: the method's).", show_default=False)] = None,
    batch_size: BatchSize = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for python, numpy, torch and the batch order [0].", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Run folder [runs/<method>_<src>_<tgt>_s<seed>].", show_default=False)] = None,
    data_root: DataRoot = None,
    device: Device = None,
    precision: Precision = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="A TOML file with these fields; flags override it.", show_default=False)] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Method hyperparameter name=value (repeatable).", show_default=False)] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", help="Checkpoint every N steps [1000].", show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", help="Evaluate on the target every N steps, 0 never [1000].", show_default=False)] = None,
    keep_checkpoints: Annotated[Optional[int], typer.Option("--keep-checkpoints", help="Periodic checkpoints kept, the latest always; 0 keeps every one (for tools/curves.py --domain) [3].", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option("--resume", help="'auto' continues the run in --out if it has a checkpoint; or a checkpoint path.", show_default=False)] = None,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from another run's network (a run folder or a .safetensors checkpoint), e.g. a source-only run for a self-training method.", show_default=False)] = None,
    src_size: Annotated[Optional[str], typer.Option("--src-size", help="Segmentation: WxH the source images are resized to [the domain's: GTA5 1280x720, SYNTHIA 1280x760, Cityscapes 1024x512, digit scenes 64x64].", show_default=False)] = None,
    tgt_size: Annotated[Optional[str], typer.Option("--tgt-size", help="Segmentation: WxH the target images are resized to [the domain's].", show_default=False)] = None,
    crop: Annotated[Optional[str], typer.Option("--crop", help="Segmentation: WxH random training crop, after --scale (CRST: 1024x512) [none].", show_default=False)] = None,
    scale: Annotated[Optional[str], typer.Option("--scale", help="Segmentation: LO,HI random scale before the crop (CRST: 0.5,1.5) [none].", show_default=False)] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Segmentation: random horizontal flips [no].", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Segmentation: data loader workers per domain [up to 4, one less than the CPUs].", show_default=False)] = None,
    log_format: Annotated[Optional[LogFormat], typer.Option("--log-format", envvar="UDA_LOG_FORMAT", help="auto: a progress bar on a terminal, plain lines elsewhere; text; json: one JSON object per log line (stderr) and the result as JSON (stdout) [auto].", show_default=False)] = None,
) -> None:
    """Train METHOD on labelled SRC and unlabelled TGT, then print the target accuracy."""
    from uda_cli.config import merge_train_options, parse_set

    flags = dict(method=method, src=src, tgt=tgt, steps=steps, batch_size=batch_size, seed=seed, out=out,
                 data_root=data_root, device=device,
                 precision=precision.value if precision else None, save_every=save_every, eval_every=eval_every,
                 keep_checkpoints=keep_checkpoints, resume=resume, log_format=log_format.value if log_format else None,
                 src_size=src_size, tgt_size=tgt_size, crop=crop, scale=scale, flip=flip, workers=workers, init=init)
    opts = merge_train_options(config, flags, parse_set(set_))

    from uda_cli.engine.trainer import train as run_train  # torch is imported from here on

    result = run_train(opts)
    if result.interrupted_by is not None:
        raise typer.Exit(128 + int(result.interrupted_by))
    if result.rank == 0:  # rank 0 speaks for the job
        _report(result, opts)
    if result.late_signal is not None:
        # The run is complete and reported (the engine logged the signal), but the user asked to
        # stop: a shell loop over runs (examples/sweep.sh) must stop here, not start the next one.
        raise typer.Exit(128 + int(result.late_signal))


def _report(result, opts) -> None:
    report = result.final_eval or {}
    if opts.log_format == "json":
        summary = {"kind": "result", "run_dir": str(result.run_dir), "checkpoint": str(result.checkpoint),
                   "step": result.step, "method": opts.method, "src": opts.src, "tgt": opts.tgt, "seed": opts.seed,
                   "world_size": result.world_size}
        summary.update({k: v for k, v in report.items() if k in ("domain", "metric", "accuracy", "mean_class_accuracy",
                                                                   "num_samples", "miou", "num_images")
                        or k.startswith("miou_")})
        print(json.dumps(summary))
        sys.stdout.flush()
        return
    print(f"run folder: {result.run_dir}")
    print(f"checkpoint: {result.checkpoint}")
    if report and report.get("metric") == "miou":
        extra = "".join(f", {k[5:]} classes {100 * v:.2f}" for k, v in report.items() if k.startswith("miou_") and v is not None)
        print(f"target mIoU ({report.get('domain', opts.tgt)}): {100 * report['miou']:.2f}{extra} "
              f"(pixel accuracy {100 * report['pixel_accuracy']:.2f}%, {report['num_images']} images, step {result.step})")
    elif report:
        print(f"target accuracy ({report.get('domain', opts.tgt)}): {100 * report['accuracy']:.2f}% "
              f"(mean over classes {100 * report['mean_class_accuracy']:.2f}%, {report['num_samples']} images, step {result.step})")
    sys.stdout.flush()
