"""What an optimizer step costs, torch's default kernels against the fused ones the trainer uses.

    python tools/optim_step.py [--device cpu|cuda] [--steps 20] [--batch-size 64]

For each digit network (LeNet, 0.66M parameters; the SVHN network, 25.9M) and each optimizer
the methods use (Adam with source-only's settings, SGD with DANN's), built as the trainer builds
it (``uda_cli.engine.trainer.make_optimizer``), it trains the same network from the same weights
on one fixed batch for ``--steps`` steps, once with torch's default kernels and once with the
fused ones the trainer picks on cpu and cuda (on a torch without them both columns run the
default), and prints the mean time of the optimizer step, of the whole step (forward, backward,
optimizer) and the largest difference between the two runs' weights at the end. Set
``OMP_NUM_THREADS`` to compare like with like; the first two steps are not timed.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    import torch
    import torch.nn.functional as F

    from uda_cli.config import method_config
    from uda_cli.engine.trainer import make_optimizer
    from uda_cli.methods.base import OptimSpec
    from uda_cli.models.classifiers import digit_model_name
    from uda_cli.models.registry import build_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2

    optimizers = {name: OptimSpec.from_config(method_config(method, {}), ())  # the methods' own settings
                  for name, method in (("adam", "source-only"), ("sgd", "dann"))}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train(net, spec, fused, x, y):
        net = copy.deepcopy(net)
        opt = make_optimizer(spec, [{"params": list(net.parameters())}], fused)
        step_s = total_s = 0.0
        for i in range(args.steps + 2):
            sync()
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            sync()
            t1 = time.perf_counter()
            opt.step()
            sync()
            t2 = time.perf_counter()
            if i >= 2:
                step_s += t2 - t1
                total_s += t2 - t0
        return net, 1000 * step_s / args.steps, 1000 * total_s / args.steps

    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.steps} timed steps of batch {args.batch_size}")
    print("| network | params | optimizer | optimizer step ms, default / fused | whole step ms, default / fused "
          "| max weight difference |")
    print("|---|---|---|---|---|---|")
    for kind, channels in (("lenet", 1), ("svhn", 3)):  # the methods' backbone names
        torch.manual_seed(0)
        digit = build_model(digit_model_name(kind, (), channels), num_classes=10, in_channels=channels)
        net = torch.nn.Sequential(digit.F, digit.C).to(device).train()
        n = sum(p.numel() for p in net.parameters())
        x = torch.randn(args.batch_size, channels, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        for name, spec in optimizers.items():
            torch.manual_seed(1)  # the same dropout masks in both runs
            a, a_step, a_total = train(net, spec, False, x, y)
            torch.manual_seed(1)
            b, b_step, b_total = train(net, spec, True, x, y)
            diff = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
            print(f"| {kind} | {n / 1e6:.2f}M | {name} | {a_step:.1f} / {b_step:.1f} | {a_total:.1f} / {b_total:.1f} "
                  f"| {diff:.2g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
