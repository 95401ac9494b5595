"""Where a DTN run's target accuracy comes from: a table of four readings of the target's test set.

    python tools/dtn_probe.py RUN_OR_CHECKPOINT [...] [--posthoc-steps 1500]

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

    from tools.probe_common import Domains, fit, load_run, predict, reinitialised
    from uda_cli.data.transforms import normalize
    from uda_cli.errors import UDAError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="dtn run folders or checkpoint files")
    ap.add_argument("--posthoc-steps", type=int, default=1500)
    ap.add_argument("--data-root", type=Path, default=None, help="default: the run's own")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def accuracy(fn, x, y) -> float:
        return 100.0 * (predict(lambda b: fn(normalize(b)), x) == y).float().mean().item()

    domain = Domains()  # several runs of one pair read its data once

    print("| run | step | f_head % | C % | C(G(x_t)) % | post-hoc C % |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        try:
            method, meta = load_run(run, "dtn")
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
        C = reinitialised(nets["C"])
        opt = torch.optim.Adam(C.parameters(), method.cfg.lr, betas=tuple(method.cfg.betas))
        with torch.no_grad():
            g_xs = torch.cat([method.translate(normalize(xs[i : i + 500])) for i in range(0, len(xs), 500)])
        fit(C, g_xs, ys, steps=args.posthoc_steps, batch=meta["options"]["batch_size"], opt=opt,
            augment=method.cfg.c_augment)
        posthoc = accuracy(C, xt, yt)
        print(f"| {run} | {meta['step']} | {f_head:.1f} | {c_acc:.1f} | {c_gt:.1f} | {posthoc:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
