"""Digits benchmark: train and evaluate methods on the classic pairs and print a markdown table.

    python benchmarks/digits.py --methods source-only --budget cpu --seeds 0,1,2
    python benchmarks/digits.py --methods source-only,dann --pairs mnist-usps --budget paper --device cuda

Pairs (target accuracy on the target's test set):
- mnist-usps:   mnist2000 -> usps1800, tested on USPS test (2,007): the ADDA protocol.
- usps-mnist:   usps1800 -> mnist2000, tested on the full MNIST test set (10,000).
- svhn-mnist:   svhn -> mnist, tested on MNIST test. The SVHN in ../shared/data is the first
                1,083 training images only (no SVHN test split); published numbers use 73,257.
- mnist-mnistm: mnist -> mnistm, tested on MNIST-M test (9,001).

Data: the embedded subsets need nothing; the other domains are read from ``--data-root``
which this script fills from ``--shared`` (../shared/data): MNIST and USPS are linked,
the SVHN subset is linked as ``train_32x32.mat``, and MNIST-M is installed by ``uda
download mnistm --mirror <shared>`` (verified and extracted like any download).

Budgets: ``smoke`` (seconds, for tests), ``cpu`` (what finishes on 2 CPU cores in well under
an hour per method and pair), ``paper`` (the method's own default schedule, for a GPU).
Throughput counts source + target images per second of training steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    eval: str
    label: str


PAIRS = {
    "mnist-usps": Pair("mnist2000", "usps1800", "usps1800:test", "MNIST→USPS"),
    "usps-mnist": Pair("usps1800", "mnist2000", "mnist:test", "USPS→MNIST"),
    "svhn-mnist": Pair("svhn", "mnist", "mnist:test", "SVHN→MNIST"),
    "mnist-mnistm": Pair("mnist", "mnistm", "mnistm:test", "MNIST→MNIST-M"),
}

# Published target accuracies (%), as quoted in the project's issues.
PAPER = {
    "source-only": {"mnist-usps": "75.2", "usps-mnist": "57.1", "svhn-mnist": "60.1", "mnist-mnistm": "56–64"},
    "dann": {"mnist-usps": "77.1", "usps-mnist": "73.0", "svhn-mnist": "73.9", "mnist-mnistm": "76.7"},
    "i2i": {"mnist-usps": "92.1", "usps-mnist": "87.2", "svhn-mnist": "80.3"},
    "pixelda": {"mnist-usps": "95.9", "mnist-mnistm": "98.2"},
    "dtn": {"svhn-mnist": "84.4"},
}

# Steps per budget; None means the method's own default (its paper's schedule). A dict gives
# steps per pair ("*": the rest). SVHN pairs use the wide SVHN network, ~10x slower on a CPU.
# PARAMS gives hyperparameters a budget must change with its length (DTN's pretraining phase
# must end well before a short run does).
BUDGETS = {
    "source-only": {"smoke": 3, "cpu": {"svhn-mnist": 600, "*": 2000}, "paper": 10_000},  # ADDA's scripts
    "dann": {"smoke": 3, "cpu": {"svhn-mnist": 600, "*": 3000}, "paper": None},
    "i2i": {"smoke": 3, "cpu": {"*": 2000}, "paper": None},
    "pixelda": {"smoke": 3, "cpu": {"*": 2000}, "paper": None},
    "dtn": {"smoke": 3, "cpu": {"*": 3000}, "paper": None},
}
DEFAULT_BUDGET = {"smoke": 3, "cpu": {"svhn-mnist": 600, "*": 2000}, "paper": None}
PARAMS = {
    ("dtn", "smoke"): {"pretrain_steps": 1},
    ("dtn", "cpu"): {"pretrain_steps": 1000},
}


def budget_steps(method: str, budget: str, pair: str) -> int | None:
    steps = BUDGETS.get(method, DEFAULT_BUDGET)[budget]
    return steps.get(pair, steps["*"]) if isinstance(steps, dict) else steps


def prepare_data_root(shared: Path, root: Path, pairs: list[str]) -> None:
    """Make ``root`` hold the datasets the pairs need, taken from ``shared`` (never copied into the repo)."""
    root.mkdir(parents=True, exist_ok=True)
    needs = {PAIRS[p].src for p in pairs} | {PAIRS[p].tgt for p in pairs} | {PAIRS[p].eval.split(":")[0] for p in pairs}
    for name in ("mnist", "usps"):
        if name in needs and not (root / name).exists():
            (root / name).symlink_to((shared / name).resolve(), target_is_directory=True)
    if "svhn" in needs:
        (root / "svhn").mkdir(exist_ok=True)
        link = root / "svhn" / "train_32x32.mat"
        if not link.exists():
            link.symlink_to((shared / "svhn" / "train_32x32_first1083.mat").resolve())
    if "mnistm" in needs:
        from uda_cli.data.download import download

        download("mnistm", root, mirrors=[shared.resolve().as_uri()])


def device_name(device: str) -> str:
    import torch

    from uda_cli.engine.runtime import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_one(method: str, pair: Pair, steps: int | None, seed: int, device: str, data_root: Path, out: Path,
            batch_size: int | None, params: dict | None = None) -> dict:
    from uda_cli.config import EvaluateOptions, TrainOptions
    from uda_cli.engine.evaluate import evaluate_checkpoint
    from uda_cli.engine.trainer import train

    t0 = time.perf_counter()
    total = steps or 0
    opts = TrainOptions(method=method, src=pair.src, tgt=pair.tgt, steps=steps, batch_size=batch_size, seed=seed,
                        out=out, device=device, data_root=data_root, eval_every=0, save_every=10**9,
                        log_every=max(total // 5, 50) if total else 500, params=params or {})
    result = train(opts, interactive=False)
    if result.interrupted_by is not None:  # a signal stopped the run: its row would be a partial run
        raise SystemExit(128 + int(result.interrupted_by))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=out, domain=pair.eval, device=device, data_root=data_root))
    return {
        "method": method, "pair": pair.label, "seed": seed, "steps": result.step, "accuracy": report["accuracy"],
        "wall_s": time.perf_counter() - t0, "img_s": result.images_seen / max(result.train_seconds, 1e-9),
    }


def fmt_table(rows: list[dict], budget: str, device: str) -> str:
    lines = ["| method | pair | budget | steps | seeds | target acc % (mean ± std) | paper % | wall s / run | device | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["pair"], r["pair_key"]), []).append(r)
    for (method, label, key), rs in groups.items():
        accs = [100 * r["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {method} | {label} | {budget} | {rs[0]['steps']} | {len(rs)} | {statistics.mean(accs):.1f} ± {std:.1f} | "
            f"{PAPER.get(method, {}).get(key, '–')} | {statistics.mean(r['wall_s'] for r in rs):.0f} | {device} | "
            f"{statistics.mean(r['img_s'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="source-only")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--budget", choices=("smoke", "cpu", "paper"), default="cpu")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, help="override the budget's steps")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "uda-bench-data")
    ap.add_argument("--out", type=Path, help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the raw rows here")
    ap.add_argument("--from-json", type=Path, nargs="+", help="print one table from rows saved by earlier --json runs")
    args = ap.parse_args(argv)

    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(f.read_text())]
        print(fmt_table(sorted(rows, key=lambda r: (r["method"], list(PAIRS).index(r["pair_key"]), r["seed"])),
                        rows[0].get("budget", args.budget), rows[0].get("device", "?")))
        return 0

    pairs = args.pairs.split(",")
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        ap.error(f"unknown pairs {unknown}; known: {', '.join(PAIRS)}")
    prepare_data_root(args.shared, args.data_root, pairs)
    dev = device_name(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        for method in args.methods.split(","):
            for key in pairs:
                steps = args.steps or budget_steps(method, args.budget, key)
                for seed in (int(s) for s in args.seeds.split(",")):
                    out = base / f"{method}_{key}_{args.budget}_s{seed}"
                    r = run_one(method, PAIRS[key], steps, seed, args.device, args.data_root, out, args.batch_size,
                                PARAMS.get((method, args.budget)))
                    r.update(pair_key=key, budget=args.budget, device=dev)
                    rows.append(r)
                    print(f"# {method} {key} seed {seed}: {100 * r['accuracy']:.2f}% in {r['wall_s']:.0f} s "
                          f"({r['img_s']:.0f} img/s)", file=sys.stderr, flush=True)
    table = fmt_table(rows, args.budget, dev)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
