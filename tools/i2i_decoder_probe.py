"""Do an I2I run's decoders use the latent? Reconstruction error against two references.

    python tools/i2i_decoder_probe.py RUN_OR_CHECKPOINT [...] [--fresh-steps 400]

For each domain (x: the source, y: the target), on up to ``--limit`` train images:

- ``rec``: L1 of the run's own reconstruction (g_x(f_x(x)), g_y(f_y(y)), eval mode) divided by
  the L1 of the domain's mean image. Near 1 or above: no better than drawing the mean image
  for every input, which is what a decoder that ignores z comes to. Well below 1 when healthy.
- ``fresh``: the same ratio for a freshly initialised decoder of the run's architecture
  trained ``--fresh-steps`` steps (batch 64, Adam 2e-4, betas (0.5, 0.999), L1 only) on the
  run's frozen z, scored on a held-out tenth. Whether z carries the image at all: ``rec`` near
  1 with ``fresh`` well below it says the information is in z and the training made the
  decoder drop it.

One CPU core takes about a minute per run (mostly the two fresh decoders).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from tools.probe_common import Domains, fit, load_run
    from uda_cli.data.transforms import normalize
    from uda_cli.errors import UDAError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="i2i run folders or checkpoint files")
    ap.add_argument("--fresh-steps", type=int, default=400)
    ap.add_argument("--limit", type=int, default=5000, help="images per domain")
    ap.add_argument("--data-root", type=Path, default=None, help="default: the run's own")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    domain = Domains()

    def ratio(pred: torch.Tensor, x: torch.Tensor, ref: torch.Tensor) -> float:
        return F.l1_loss(pred, x).item() / max(F.l1_loss(ref.expand_as(x), x).item(), 1e-8)

    print("| run | step | x rec | x fresh | y rec | y fresh |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        try:
            method, meta = load_run(run, "i2i")
            root = args.data_root or meta["options"].get("data_root")
            c, size = method.spec.channels, tuple(method.spec.image_size)
            images = {side: domain(meta[key], "train", root, c, size)[0][: args.limit]
                      for side, key in (("x", "src"), ("y", "tgt"))}
        except UDAError as e:
            ap.error(f"{run}: {e}")
        method.eval()
        cells = []
        for side, encode, decode in (("x", method.f_x, method.g_x), ("y", method.f_y, method.g_y)):
            x = normalize(images[side])
            cut = max(1, len(x) * 9 // 10)
            with torch.no_grad():
                z = torch.cat([encode(x[i : i + 500]) for i in range(0, len(x), 500)])
                own = torch.cat([decode(z[i : i + 500]) for i in range(0, len(z), 500)])
            mean = x[:cut].mean(0, keepdim=True)
            cells.append(ratio(own, x, x.mean(0, keepdim=True)))
            torch.manual_seed(args.seed)
            dec = torch.nn.Sequential(*method.new_decoders(z.shape[1], heads=1))
            fit(dec, z[:cut], x[:cut], steps=args.fresh_steps, batch=64, augment=False, loss_fn=F.l1_loss,
                opt=torch.optim.Adam(dec.parameters(), 2e-4, betas=(0.5, 0.999)))
            held = slice(cut, None) if cut < len(x) else slice(None)
            with torch.no_grad():
                cells.append(ratio(dec(z[held]), x[held], mean))
        print(f"| {run} | {meta['step']} | " + " | ".join(f"{v:.2f}" for v in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
