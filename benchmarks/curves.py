"""Target accuracy along runs: the evaluations each run logged, as a markdown table.

    python benchmarks/curves.py RUN_DIR [RUN_DIR ...] [--steps 3000,4000,5000]

Reads each run folder's ``config.json`` and the ``eval`` records of its ``metrics.jsonl``
(``uda train --eval-every N``; a resumed run's file reads as one run). Runs of one method,
pair and settings (``--set`` values) are one group; the table has a line per group and step
with every seed's accuracy and their mean ± std, so it answers "does a longer schedule
help, and does the control gain as much?" from the runs themselves. ``--steps`` keeps only
those steps. A step where some seeds have no evaluation shows the seeds that have one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from uda_cli.engine.logging import read_metrics  # noqa: E402


def read_run(run: Path) -> tuple[tuple, int, dict[int, float]]:
    """(group key, seed, {step: accuracy %}) of a run folder; ValueError with a one-line reason."""
    cfg_path, metrics = run / "config.json", run / "metrics.jsonl"
    if not cfg_path.is_file() or not metrics.is_file():
        raise ValueError(f"{run}: not a run folder (config.json and metrics.jsonl are missing); "
                         "pass folders that `uda train --out` wrote")
    try:
        cfg = json.loads(cfg_path.read_text())
        opts = cfg["options"]
        key = (cfg["method"], f"{opts['src']}->{opts['tgt']}",
               " ".join(f"{k}={v}" for k, v in sorted((opts.get("params") or {}).items())) or "–")
        seed = int(opts["seed"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{run}/config.json is not a uda run config ({type(e).__name__}: {e})") from None
    acc = {int(r["step"]): 100.0 * float(r["accuracy"])
           for r in read_metrics(metrics) if r.get("kind") == "eval" and "accuracy" in r}
    if not acc:
        raise ValueError(f"{run}: no evaluation was logged; train with --eval-every N (or let the run finish)")
    return key, seed, acc


def fmt_curves(runs: list[tuple[tuple, int, dict[int, float]]], steps: set[int] | None = None) -> str:
    lines = ["| method | pair | params | step | seeds | acc % per seed | mean ± std |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict[int, dict[int, float]]] = {}
    for key, seed, acc in runs:
        by_step = groups.setdefault(key, {})
        for step, a in acc.items():
            by_step.setdefault(step, {})[seed] = a  # a seed given twice: the later folder wins
    for (method, pair, params), by_step in groups.items():
        for step in sorted(by_step):
            if steps and step not in steps:
                continue
            per_seed = dict(sorted(by_step[step].items()))
            accs = list(per_seed.values())
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            shown = " / ".join(f"{a:.1f}" for a in accs)
            lines.append(f"| {method} | {pair} | {params} | {step} | {','.join(map(str, per_seed))} | {shown} | "
                         f"{statistics.mean(accs):.1f} ± {std:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders")
    ap.add_argument("--steps", help="comma-separated steps to show (default: every evaluated step)")
    args = ap.parse_args(argv)
    try:
        steps = {int(s) for s in args.steps.split(",")} if args.steps else None
    except ValueError:
        ap.error(f"--steps takes comma-separated integers, e.g. 3000,5000, not {args.steps!r}")
    try:
        runs = [read_run(r) for r in args.runs]
    except ValueError as e:
        ap.error(str(e))
    print(fmt_curves(runs, steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
