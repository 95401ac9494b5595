"""Segmentation benchmark: train and evaluate methods on segmentation pairs and print a markdown table.

    python benchmarks/segmentation.py --pairs scenes --methods source-only,oracle --budget cpu --seeds 0,1,2
    python benchmarks/segmentation.py --pairs scenes-mini --budget smoke
    python benchmarks/segmentation.py --pairs gta5-cityscapes --budget paper --device cuda --data-root /data
    python benchmarks/segmentation.py --from-json rows.json --per-class

Pairs (mIoU on the target's evaluation split, the final checkpoint, whole images, no flip):
- scenes:             mnist-scenes -> mnistm-scenes, tested on its 2,000 fixed test scenes.
                      Needs MNIST and MNIST-M: linked / installed from ``--shared``.
- scenes-mini:        mnist-scenes-mini -> mnistm-scenes-mini (ship with uda), 500 test scenes.
- scenes-tiny:        the minis' first 64 train / 100 test scenes: seconds, for the tests.
- gta5-cityscapes:    gta5 -> cityscapes, tested on cityscapes:val (500 images, 19 classes).
- synthia-cityscapes: synthia -> cityscapes:val; the row adds the 16- and 13-class means.

Methods: any ``uda train`` method, plus ``oracle``: source-only trained on the target's own
labelled train split (the upper bound every table quotes beside source-only). Self-training
methods (cbst, crst) also get, per round, their pseudo-labels' density and precision against
the target's ground truth (read for the table only; the run never sees it).

Budgets: ``smoke`` (seconds, for tests), ``cpu`` (digit scenes on 2 CPU cores: the method's
CPU recipe), ``paper`` (the method's own defaults, for a GPU). Throughput counts source +
target images per second of training steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _digits_module():
    """benchmarks/digits.py, for its data-root preparation and device naming (one copy of each)."""
    spec = importlib.util.spec_from_file_location("_bench_digits", Path(__file__).with_name("digits.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


@dataclass(frozen=True)
class Pair:
    src: str
    tgt: str
    eval: str
    shared: tuple[str, ...] = ()  # datasets taken from --shared into the data root


PAIRS = {
    "scenes": Pair("mnist-scenes", "mnistm-scenes", "mnistm-scenes:test", ("mnist", "mnistm")),
    "scenes-mini": Pair("mnist-scenes-mini", "mnistm-scenes-mini", "mnistm-scenes-mini:test"),
    # the first 64 / 64 / 100 scenes of the minis: seconds, for the tests
    "scenes-tiny": Pair("mnist-scenes-mini:train[:64]", "mnistm-scenes-mini:train[:64]", "mnistm-scenes-mini:test[:100]"),
    "gta5-cityscapes": Pair("gta5", "cityscapes", "cityscapes:val"),
    "synthia-cityscapes": Pair("synthia", "cityscapes", "cityscapes:val"),
}
# Budgets: (steps or None for the method's default, batch size or None, hyperparameters of the
# methods whose length is derived from rounds: self-training, whose --steps is refused).
BUDGETS = {
    "smoke": (20, 4, {"warmup_steps": 10, "rounds": 2, "round_steps": 5}),
    "cpu": (None, None, {}),
    "paper": (None, None, {}),
}


def prepare_data_root(shared: Path, root: Path, pairs: list[str]) -> None:
    """MNIST linked and MNIST-M installed from ``shared`` (never copied into the repo), as digits.py does."""
    needs = {d for p in pairs for d in PAIRS[p].shared}
    if not needs:
        return
    digits = _digits_module()
    digits.PAIRS.setdefault("_scenes", digits.Pair("mnist", "mnistm", "mnistm:test", "_scenes"))
    digits.prepare_data_root(shared, root, ["_scenes"])


def run_one(method: str, pair_key: str, seed: int, device: str, data_root: Path, out: Path, steps: int | None,
            batch_size: int | None, params: dict, workers: int | None, precision: str = "auto",
            rounds_params: dict | None = None, init: Path | None = None) -> dict:
    from uda_cli.config import EvaluateOptions, TrainOptions
    from uda_cli.engine.evaluate import evaluate_checkpoint
    from uda_cli.engine.trainer import train

    from uda_cli.methods.registry import get_method

    pair = PAIRS[pair_key]
    src, train_method = (pair.tgt, "source-only") if method == "oracle" else (pair.src, method)
    cls = get_method(train_method)
    self_training = "warmup_steps" in cls.Config.model_fields
    if self_training:  # its length comes from rounds
        steps, params = None, {**(rounds_params or {}), **params}
        if init is not None:  # the warm-up is the source-only run given
            params = {**params, "warmup_steps": 0}
    t0 = time.perf_counter()
    opts = TrainOptions(method=train_method, src=src, tgt=pair.tgt, steps=steps, batch_size=batch_size, seed=seed,
                        out=out, device=device, data_root=data_root, eval_every=0, save_every=10_000_000,
                        log_every=100, params=params, precision=precision, workers=workers,
                        init=init if self_training else None)
    result = train(opts, interactive=False)
    if result.interrupted_by is not None:
        raise SystemExit(128 + int(result.interrupted_by))
    report, _ = evaluate_checkpoint(EvaluateOptions(target=out, domain=pair.eval, device=device, data_root=data_root,
                                                    workers=workers))
    config = json.loads((out / "config.json").read_text())
    rounds = pseudo_label_quality(out, pair.tgt, data_root)
    return {
        "method": method, "pair": pair_key, "seed": seed, "steps": result.step,
        "batch_size": config["options"]["batch_size"], "model": config["config"].get("model"),
        "params": params, "miou": report["miou"],
        **{k: v for k, v in report.items() if k.startswith("miou_")},
        "per_class_iou": report["per_class_iou"], "pixel_accuracy": report["pixel_accuracy"],
        "wall_s": time.perf_counter() - t0, "img_s": result.images_seen / max(result.train_seconds, 1e-9),
        **({"rounds": rounds} if rounds else {}),
    }


def pseudo_label_quality(run: Path, tgt: str, data_root: Path) -> list[dict]:
    """Per round of a self-training run: the share of target pixels its pseudo-labels cover
    (density) and the share of those that match the target's ground truth (precision), over
    the pixels the ground truth labels. The ground truth is read here, for the table only:
    the run never saw it (digit scenes and Cityscapes train have labels; a run does not read them)."""
    import numpy as np
    import torch
    from PIL import Image

    from uda_cli.data.registry import get_domain, load_dense, parse_domain

    folders = sorted((run / "rounds").glob("[0-9][0-9]")) if (run / "rounds").is_dir() else []
    if not folders:
        return []
    name, split = parse_domain(tgt)
    source = load_dense(name, split or "train", data_root)
    out = []
    k = len(get_domain(name).classes)
    for folder in folders:
        labelled = correct = scored = total = 0
        per_scored = torch.zeros(k, dtype=torch.int64)
        per_correct = torch.zeros(k, dtype=torch.int64)
        for i in range(len(source)):
            path = folder / "labels" / f"{source.stem(i)}.png"
            if not path.exists():
                continue
            pseudo = torch.from_numpy(np.array(Image.open(path))).long()
            _, gt = source.read(i)
            if tuple(gt.shape) != tuple(pseudo.shape):
                gt = torch.nn.functional.interpolate(gt[None, None].float(), size=tuple(pseudo.shape),
                                                     mode="nearest")[0, 0]
            gt = gt.long()
            has = pseudo != 255
            valid = has & (gt != 255)
            labelled += int(has.sum())
            total += pseudo.numel()
            scored += int(valid.sum())
            right = pseudo[valid] == gt[valid]
            correct += int(right.sum())
            per_scored += torch.bincount(pseudo[valid], minlength=k)[:k]
            per_correct += torch.bincount(pseudo[valid][right], minlength=k)[:k]
        present = per_scored > 0
        class_precision = float((per_correct[present].double() / per_scored[present]).mean()) if present.any() else 0.0
        out.append({"round": int(folder.name), "density": labelled / max(total, 1),
                    "precision": correct / max(scored, 1), "class_precision": class_precision,
                    "classes_labelled": int(present.sum())})
    return out


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def fmt_table(rows: list[dict], budget: str, device: str, per_class: bool = False) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r["pair"], r["steps"], r["batch_size"], json.dumps(r.get("params", {}), sort_keys=True))
        groups.setdefault(key, []).append(r)
    lines = [f"budget {budget}, device {device}; mIoU % on the target's evaluation split (final checkpoint), "
             "mean ± std over seeds", "",
             "| method | pair | steps | batch | params | seeds | mIoU | other means | wall s | img/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, pair, steps, batch, params), rs in groups.items():
        others = sorted({k for r in rs for k in r if k.startswith("miou_")})
        other = ", ".join(f"{k[5:]}: {_mean_std([100 * r[k] for r in rs if r.get(k) is not None])}" for k in others) or "–"
        ptxt = " ".join(f"{k}={v}" for k, v in json.loads(params).items()) or "–"
        lines.append(f"| {method} | {pair} | {steps} | {batch} | {ptxt} | {','.join(str(r['seed']) for r in rs)} | "
                     f"{_mean_std([100 * r['miou'] for r in rs])} | {other} | "
                     f"{statistics.mean(r['wall_s'] for r in rs):.0f} | {statistics.mean(r['img_s'] for r in rs):.1f} |")
    with_rounds = [(k, rs) for k, rs in groups.items() if any(r.get("rounds") for r in rs)]
    if with_rounds:
        lines += ["", "pseudo-labels per round: density (share of target pixels labelled) / precision (share of "
                      "those right) / mean precision over the classes labelled, % mean over seeds", ""]
        for (method, pair, _, _, params), rs in with_rounds:
            n = max(len(r.get("rounds", [])) for r in rs)
            ptxt = " ".join(f"{k}={v}" for k, v in json.loads(params).items())
            cells = []
            for j in range(n):
                got = [r["rounds"][j] for r in rs if len(r.get("rounds", [])) > j]
                cells.append(f"{statistics.mean(100 * g['density'] for g in got):.1f} / "
                             f"{statistics.mean(100 * g['precision'] for g in got):.1f} / "
                             f"{statistics.mean(100 * g.get('class_precision', 0) for g in got):.1f}")
            lines.append(f"- {method}{f' ({ptxt})' if ptxt else ''} on {pair}: "
                         + "; ".join(f"round {j}: {c}" for j, c in enumerate(cells)))
    if per_class:
        for (method, pair, *_), rs in groups.items():
            classes = list(rs[0]["per_class_iou"])
            lines += ["", f"per-class IoU %, {method} on {pair}", "",
                      "| " + " | ".join(classes) + " |", "|" + "---|" * len(classes),
                      "| " + " | ".join(_mean_std([100 * r["per_class_iou"][c] for r in rs
                                                   if r["per_class_iou"][c] is not None]) if any(
                          r["per_class_iou"][c] is not None for r in rs) else "–" for c in classes) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="source-only,oracle")
    ap.add_argument("--pairs", default="scenes")
    ap.add_argument("--budget", choices=tuple(BUDGETS), default="cpu")
    ap.add_argument("--seeds", default="0", metavar="S,S,...")
    ap.add_argument("--steps", type=int, help="override the budget's steps")
    ap.add_argument("--batch-size", type=int, help="override the budget's batch size")
    ap.add_argument("--set", action="append", metavar="NAME=VALUE", dest="sets", default=[])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--workers", type=int, help="data loader workers per domain (default: uda's)")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--data-root", type=Path, default=Path(tempfile.gettempdir()) / "uda-bench-data")
    ap.add_argument("--out", type=Path, help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="also write the raw rows here (rewritten after every run)")
    ap.add_argument("--from-json", type=Path, nargs="+", help="print one table from rows saved by earlier --json runs")
    ap.add_argument("--per-class", action="store_true", help="also print per-class IoU tables")
    ap.add_argument("--init-from-source-only", action="store_true",
                    help="self-training rows start from the same seed's source-only run under --out (trained first "
                         "when missing) instead of their own warm-up: CRST's and TPLD's protocol, and one warm-up "
                         "for all methods of a seed")
    args = ap.parse_args(argv)

    if args.from_json:
        rows = [r for f in args.from_json for r in json.loads(f.read_text())]
        print(fmt_table(rows, "(from json)", "(from json)", args.per_class))
        return 0
    from uda_cli.config import parse_set
    from uda_cli.methods.registry import get_method

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in pairs if p not in PAIRS]
    if bad:
        ap.error(f"unknown pair {bad[0]!r}; pairs: {', '.join(PAIRS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    params = parse_set(args.sets)
    steps, batch, rounds_params = BUDGETS[args.budget]
    steps, batch = args.steps or steps, args.batch_size or batch
    prepare_data_root(args.shared, args.data_root, pairs)
    device = _digits_module().device_name(args.device)
    out_root = args.out or Path(tempfile.mkdtemp(prefix="uda-seg-bench-"))
    rows: list[dict] = []
    trained: dict[tuple[str, int, str], dict] = {}  # source-only runs trained as self-training's start
    for pair in pairs:
        for method in methods:
            for seed in seeds:
                init = None
                if args.init_from_source_only and method != "oracle" and \
                        "warmup_steps" in get_method(method).Config.model_fields:
                    init = out_root / f"source-only_{pair}_{args.budget}_s{seed}"
                    if not (init / "checkpoints" / "latest").exists():
                        trained[pair, seed, init.name] = run_one("source-only", pair, seed, args.device,
                                                                 args.data_root, init, None, batch, {}, args.workers,
                                                                 args.precision)
                name = f"{method}_{pair}_{args.budget}" + (f"_steps{steps}" if args.steps else "") + \
                       "".join(f"_{k}-{v}" for k, v in sorted(params.items())) + \
                       ("_init" if init is not None else "") + f"_s{seed}"
                if method == "source-only" and (pair, seed, name) in trained:  # trained above as a warm-up
                    row = dict(trained[pair, seed, name])
                else:
                    row = run_one(method, pair, seed, args.device, args.data_root, out_root / name, steps, batch,
                                  params, args.workers, args.precision, rounds_params, init)
                if init is not None:
                    row["init"] = str(init)
                row["device"] = device
                rows.append(row)
                print(f"{name}: mIoU {100 * row['miou']:.2f} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(fmt_table(rows, args.budget, device, args.per_class))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
