"""Where a DTN run's target accuracy comes from: a table of four readings of the target's test set.

    python benchmarks/dtn_probe.py RUN_OR_CHECKPOINT [...] [--posthoc-steps 1500]

- ``f_head``: f's own pretraining classifier on x_t, what f knew before any adaptation;
- ``C``: the reported number, the classifier trained on G(x_s) during the run, on x_t;
- ``C(G(x_t))``: the same C on the target's translation (G = g o f);
- ``post-hoc C``: a freshly initialised C trained on the *final* G(x_s) only (the run's batch
  size, Adam with its lr and betas, and its ``c_augment``), on x_t: whether the last G is
  better than C's moving average of Gs.

If C is no better than ``f_head``, the adversarial phase carried f's knowledge into pixels
without adding to it. Data come from the run's own ``--data-root`` unless ``--data-root`` says
otherwise; one CPU core takes about two minutes per run (mostly the post-hoc C).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from uda_cli.data.augment import random_affine
    from uda_cli.data.registry import load_domain, parse_domain
    from uda_cli.data.transforms import normalize
    from uda_cli.engine import checkpoint as ckpt
    from uda_cli.engine.trainer import load_method
    from uda_cli.errors import UDAError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="dtn run folders or checkpoint files")
    ap.add_argument("--posthoc-steps", type=int, default=1500)
    ap.add_argument("--data-root", type=Path, default=None, help="default: the run's own")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def accuracy(fn, x, y) -> float:
        with torch.no_grad():
            pred = torch.cat([fn(normalize(x[i : i + 1000])).argmax(1) for i in range(0, len(x), 1000)])
        return 100.0 * (pred == y).float().mean().item()

    loaded: dict[tuple, tuple] = {}  # several runs of one pair read its data once

    def domain(text: str, default_split: str, root, channels: int):
        name, split = parse_domain(text)
        key = (name, split or default_split, str(root), channels)
        if key not in loaded:
            loaded[key] = load_domain(name, split or default_split, root, channels=channels)
        return loaded[key]

    print("| run | step | f_head % | C % | C(G(x_t)) % | post-hoc C % |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        try:
            weights = ckpt.resolve_checkpoint(run)
            meta = ckpt.read_metadata(weights)
            if meta["method"] != "dtn":
                ap.error(f"{run} is a {meta['method']} run; this probe reads dtn runs")
            method, _ = load_method(weights, torch.device("cpu"))
            root = args.data_root or meta["options"].get("data_root")
            xs, ys = domain(meta["src"], "train", root, method.spec.channels)
            xt, yt = domain(meta["tgt_eval"], "test", root, method.spec.channels)
        except UDAError as e:
            ap.error(f"{run}: {e}")
        nets = method.nets
        f_head = accuracy(lambda x: nets["f_head"](nets["f"](x)), xt, yt)
        # C itself (method.predict reads f's head until C's first update).
        c_acc = accuracy(nets["C"], xt, yt)
        c_gt = accuracy(lambda x: nets["C"](method.translate(x)), xt, yt)

        torch.manual_seed(args.seed)
        C = nets["C"]
        for m in C.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        C.train()
        opt = torch.optim.Adam(C.parameters(), method.cfg.lr, betas=tuple(method.cfg.betas))
        batch = meta["options"]["batch_size"]
        with torch.no_grad():
            g_xs = torch.cat([method.translate(normalize(xs[i : i + 500])) for i in range(0, len(xs), 500)])
        for _ in range(args.posthoc_steps):
            idx = torch.randint(0, len(g_xs), (batch,))
            x = random_affine(g_xs[idx]) if method.cfg.c_augment else g_xs[idx]
            loss = F.cross_entropy(C(x), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        C.eval()
        posthoc = accuracy(C, xt, yt)
        print(f"| {run} | {meta['step']} | {f_head:.1f} | {c_acc:.1f} | {c_gt:.1f} | {posthoc:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
