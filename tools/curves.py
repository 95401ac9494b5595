"""Target accuracy along runs, as a markdown table: the evaluations each run logged, or
every checkpoint it kept evaluated on a domain you name.

    python tools/curves.py RUN_DIR [RUN_DIR ...] [--steps 3000,4000,5000]
    python tools/curves.py RUN_DIR [RUN_DIR ...] --domain 'mnist:train[-5000:]'

Without ``--domain`` it reads each run folder's ``config.json`` and the ``eval`` records of its
``metrics.jsonl`` (``uda train --eval-every N``, on the target's test split; a resumed run's
file reads as one run). With ``--domain`` it evaluates each checkpoint the run kept
(``uda train --save-every N --keep-checkpoints 0`` keeps every one) on that domain, as ``uda
evaluate CHECKPOINT --domain ...`` would (each report lands in the run's ``eval/`` folder):
trained on ``--tgt 'mnist:train[:-5000]'``, the held-out ``mnist:train[-5000:]`` then chooses a
schedule without reading the test split. Runs of one method, pair, settings (``--set``
values) and evaluation domain are one group; the table has a line per group and step with
every seed's accuracy and their mean ± std, so it answers "does a longer schedule help, and
does the control gain as much?" from the runs themselves. ``--steps`` keeps only those steps.
A step where some seeds have no evaluation shows the seeds that have one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda_cli.engine.logging import read_metrics  # noqa: E402


def read_run(run: Path, domain: str | None = None, data_root: Path | None = None, device: str = "cpu",
             steps: set[int] | None = None) -> tuple[tuple, int, dict[int, float]]:
    """(group key, seed, {step: accuracy %}) of a run folder: its logged evaluations, or with
    ``domain`` its kept checkpoints evaluated there (only ``steps`` if given); ValueError with
    a one-line reason."""
    cfg_path, metrics = run / "config.json", run / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics.is_file():
        raise ValueError(f"{run}: not a run folder (config.json and metrics.jsonl are missing); "
                         "pass folders that `uda train --out` wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
        opts = cfg["options"]
        # A run whose forward ran in bf16 (--precision bf16, or auto on CUDA) is its own group:
        # the same seed and settings in float32 is another run.
        # So is one trained under tools/bf16_emulation.py.
        from tools.bf16_emulation import marked

        emulated = marked(run)
        given = {**(opts.get("params") or {}), **({"precision": "bf16"} if bf16_run(cfg) else {}),
                 **({"emulation": "bf16"} if emulated else {})}
        key = (cfg["method"], f"{opts['src']}->{opts['tgt']}",
               " ".join(f"{k}={v}" for k, v in sorted(given.items())) or "–")
        seed = int(opts["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run}/config.json is not a uda run config ({type(e).__name__}: {e})") from None
    if domain is not None:
        acc, where = evaluate_kept(run, domain, data_root, device, steps)
        return (*key, where), seed, acc
    evals = [r for r in read_metrics(metrics) if r.get("kind") == "eval" and "accuracy" in r]
    if not evals:
        raise ValueError(f"{run}: no evaluation was logged; train with --eval-every N (or let the run finish)")
    acc = {int(r["step"]): 100.0 * float(r["accuracy"]) for r in evals}
    return (*key, " + ".join(sorted({str(r.get("domain", "?")) for r in evals}))), seed, acc


def bf16_run(cfg: dict) -> bool:
    """Whether a run's config says its forward ran in bf16: its recorded --precision (runs
    before it had none: auto) resolved on its recorded device."""
    import torch

    from uda_cli.engine.runtime import resolve_precision
    from uda_cli.errors import ConfigError

    try:
        return resolve_precision(torch.device(cfg.get("device") or "cpu"),
                                 cfg["options"].get("precision") or "auto") == "bf16"
    except (ConfigError, RuntimeError) as e:  # a device or precision no uda wrote
        raise ValueError(f"device {cfg.get('device')!r} / precision {cfg['options'].get('precision')!r}: {e}") from None


def evaluate_kept(run: Path, domain: str, data_root: Path | None, device: str,
                  steps: set[int] | None = None) -> tuple[dict[int, float], str]:
    """({step: accuracy %} of every checkpoint kept in ``run``, or of those at ``steps``; the
    domain:split they were read on)."""
    from pydantic import ValidationError

    from uda_cli.config import EvaluateOptions, validation_lines
    from uda_cli.engine import checkpoint as ckpt
    from uda_cli.engine.evaluate import evaluate_checkpoint
    from uda_cli.errors import UDAError

    kept = ckpt.kept_steps(run / "checkpoints")
    if not kept:
        raise ValueError(f"{run}: no checkpoint was kept; train with --save-every N --keep-checkpoints 0")
    acc, where, loaded = {}, domain, {}
    for step in kept:
        if steps and step not in steps:
            continue
        weights = run / "checkpoints" / f"{ckpt.step_name(step)}.safetensors"
        try:
            report, _ = evaluate_checkpoint(EvaluateOptions(target=weights, domain=domain, data_root=data_root,
                                                            device=device), loaded)
        except ValidationError as e:
            raise ValueError("; ".join(validation_lines(e))) from None
        except UDAError as e:
            raise ValueError(f"{weights}: {e}") from None
        acc[step], where = 100.0 * float(report["accuracy"]), report["domain"]
    return acc, where


def fmt_curves(runs: list[tuple[tuple, int, dict[int, float]]], steps: set[int] | None = None) -> str:
    lines = ["| method | pair | params | evaluated on | step | seeds | acc % per seed | mean ± std |",
             "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[int, dict[int, float]]] = {}
    for key, seed, acc in runs:
        by_step = groups.setdefault(key, {})
        for step, a in acc.items():
            by_step.setdefault(step, {})[seed] = a  # a seed given twice: the later folder wins
    for (method, pair, params, where), by_step in groups.items():
        for step in sorted(by_step):
            if steps and step not in steps:
                continue
            per_seed = dict(sorted(by_step[step].items()))
            accs = list(per_seed.values())
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            shown = " / ".join(f"{a:.1f}" for a in accs)
            lines.append(f"| {method} | {pair} | {params} | {where} | {step} | {','.join(map(str, per_seed))} | {shown} | "
                         f"{statistics.mean(accs):.1f} ± {std:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders")
    ap.add_argument("--steps", help="comma-separated steps to show (default: every evaluated step)")
    ap.add_argument("--domain", help="NAME[:split], e.g. 'mnist:train[-5000:]': evaluate every kept checkpoint "
                                     "there instead of reading the logged evaluations")
    ap.add_argument("--data-root", type=Path, help="with --domain: where datasets live (default: the run's own)")
    ap.add_argument("--device", default="cpu", help="with --domain: cpu, cuda, ... [cpu]")
    args = ap.parse_args(argv)
    try:
        steps = {int(s) for s in args.steps.split(",")} if args.steps else None
    except ValueError:
        ap.error(f"--steps takes comma-separated integers, e.g. 3000,5000, not {args.steps!r}")
    try:
        runs = [read_run(r, args.domain, args.data_root, args.device, steps) for r in args.runs]
    except ValueError as e:
        ap.error(str(e))
    print(fmt_curves(runs, steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
