"""Does a run's translator keep the digit? A table that measures it, for any method that translates.

    python tools/translation_probe.py RUN_OR_CHECKPOINT [...] [--oracle-steps 2000]

A preview PNG (``uda adapt-images RUN --limit 16``) shows a collapsed translator to the eye;
this puts numbers on it. An *oracle* (the house LeNet, ``build_model("lenet")``) is trained
on the labelled train split of the run's target domain, at the run's channels and size, and
then reads the translations G(x_s) of the run's source train split (up to ``--limit`` images):

- ``oracle %``: the oracle on the target's test split (the run's ``tgt_eval``): how far
  to trust the next column;
- ``label kept %``: the oracle's prediction on G(x_s) equals x_s's source label;
- ``classes``: how many of the classes the oracle finds among the translations, counting a
  class when at least 2% of them go to it (a collapsed translator gives 1 or 2);
- ``top class %``: the share of the most frequent predicted class (10% when balanced);
- ``spread``: mean L1 distance between two random translations, divided by the same between
  two random real target images (1 = as varied as the target, 0 = one image for all).

Three more columns read the run's own classifier, ``method.predict`` (what ``uda evaluate``
scores: for I2I h∘f_y, which for digits, with one shared encoder, is also h∘f_x; PixelDA's T;
DTN's C), on the same source images:

- ``run on x_s %``: the run's classifier on x_s equals its label;
- ``oracle = run %``: the oracle's class for G(x_s) equals the run's class for x_s. A
  translator that draws the class the run reads in x_s scores high here even where the run
  misreads x_s; when both this and ``label kept`` are at chance while ``run on x_s`` is high,
  the translator draws some other class than the one the run finds in its input (for I2I: z
  is aligned across domains overall, not class by class);
- ``run on G(x_s) %``: the run's classifier on the translation equals x_s's label (what I2I's
  L_trc and PixelDA's task loss train).

Translations are taken as ``uda adapt-images`` writes them: ``method.translate`` in eval mode
(batch norm with its running statistics, no dropout). With ``--batch-stats`` the networks are
in train mode instead, normalised by the statistics of each batch of 64 source images, which
is what the training losses saw (dropout is on then too); the run's classifier is read in the
same mode.

The oracle uses target labels: it is a diagnostic of the translator, never a way to pick a
run or a hyperparameter. Oracles are cached under ``--cache`` per (domain, split, channels,
size, steps, seed; ``_v2`` files: the oracle's initialisation is seeded too, which older
caches did not do). One CPU core takes ~1 minute per new oracle and seconds per run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import torch
    from safetensors.torch import load_file, save_file

    from tools.probe_common import Domains, fit, predict
    from uda_cli.data.registry import flat_name, parse_domain
    from uda_cli.data.transforms import normalize
    from uda_cli.engine import checkpoint as ckpt
    from uda_cli.engine.adapt import check_translator
    from uda_cli.engine.trainer import load_method
    from uda_cli.errors import UDAError
    from uda_cli.models.registry import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders or checkpoint files of methods that translate")
    ap.add_argument("--oracle-steps", type=int, default=2000)
    ap.add_argument("--limit", type=int, default=5000, help="translate at most this many source images")
    ap.add_argument("--batch-stats", action="store_true", help="translate in train mode (per-batch norm statistics)")
    ap.add_argument("--data-root", type=Path, default=None, help="default: the run's own")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "uda-translation-oracles")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    domain = Domains()
    oracles: dict[Path, tuple] = {}  # several checkpoints of one pair train, load and score its oracle once

    def oracle(tgt: str, tgt_eval: str, root, c: int, size, num_classes: int):
        name, split = parse_domain(tgt)
        path = args.cache / f"{flat_name(name)}_{flat_name(split or 'train')}_c{c}_{size[0]}x{size[1]}_steps{args.oracle_steps}_seed{args.seed}_v2.safetensors"
        if path in oracles:
            return oracles[path]
        torch.manual_seed(args.seed)  # before the oracle's initialisation, which the seed must cover too
        lenet = build_model("lenet", num_classes=num_classes, in_channels=c)
        net = torch.nn.Sequential(lenet.F, lenet.C)  # keys 0.*, 1.*: the cached oracles' names
        if path.exists():
            net.load_state_dict(load_file(path))
        else:
            x, y = domain(tgt, "train", root, c, size)
            fit(net, x, y, steps=args.oracle_steps, batch=128,
                           opt=torch.optim.Adam(net.parameters(), 1e-3), prepare=normalize)
            args.cache.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        net.eval()
        xe, ye = domain(tgt_eval, "test", root, c, size)
        xe = normalize(xe)
        oracles[path] = net, 100.0 * (predict(net, xe) == ye).float().mean().item(), xe
        return oracles[path]

    def pct(a: torch.Tensor, b: torch.Tensor) -> float:
        return 100.0 * (a == b).float().mean().item()

    def spread(a: torch.Tensor, b: torch.Tensor, g: torch.Generator) -> float:
        """Mean L1 distance between random pairs of a, over the same for b (images in [-1, 1])."""
        def mean_pair(x):
            i = torch.randint(0, len(x), (2000,), generator=g)
            j = torch.randint(0, len(x), (2000,), generator=g)
            return (x[i] - x[j]).abs().mean().item()
        return mean_pair(a) / max(mean_pair(b), 1e-8)

    print("| run | step | src→tgt | oracle % | label kept % | classes | top class % | spread | run on x_s % "
          "| oracle = run % | run on G(x_s) % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        try:
            weights = ckpt.resolve_checkpoint(run)
            method, meta = load_method(weights, torch.device("cpu"))
            check_translator(weights, meta, "translation_probe")
            root = args.data_root or meta["options"].get("data_root")
            c, size, k = method.spec.channels, tuple(method.spec.image_size), method.spec.num_classes
            xs, ys = domain(meta["src"], "train", root, c, size)
            net, oracle_acc, xt = oracle(meta["tgt"], meta["tgt_eval"], root, c, size, k)
        except UDAError as e:
            ap.error(f"{run}: {e}")
        xs, ys = xs[: args.limit], ys[: args.limit]
        torch.manual_seed(args.seed)
        for m in method.nets.values():
            m.train(args.batch_stats)
        bs = 64 if args.batch_stats else 500
        chunks, run_xs, run_gxs = [], [], []
        with torch.no_grad():
            for i in range(0, len(xs), bs):
                x = normalize(xs[i : i + bs])
                z = method.sample_noise(len(x), torch.empty(0)) if method.has_noise_input else None
                chunks.append(method.translate(x, z).clamp(-1, 1))
                run_xs.append(method.predict(x).argmax(1))
                run_gxs.append(method.predict(chunks[-1]).argmax(1))
        g_xs, run_xs, run_gxs = torch.cat(chunks), torch.cat(run_xs), torch.cat(run_gxs)
        pred = predict(net, g_xs)
        kept = pct(pred, ys)
        share = torch.bincount(pred, minlength=k).float() / len(pred)
        classes = int((share >= 0.02).sum())
        g = torch.Generator().manual_seed(args.seed)
        sp = spread(g_xs, xt, g)
        pair = f"{parse_domain(meta['src'])[0]}→{parse_domain(meta['tgt'])[0]}"
        print(f"| {run} | {meta['step']} | {pair} | {oracle_acc:.1f} | {kept:.1f} | {classes} | "
              f"{100 * share.max().item():.0f} | {sp:.2f} | {pct(run_xs, ys):.1f} | {pct(pred, run_xs):.1f} | "
              f"{pct(run_gxs, ys):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
