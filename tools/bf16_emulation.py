"""Run a `uda` command with bf16 autocast's rounding emulated in float32 arithmetic.

    python tools/bf16_emulation.py train --method pixelda --src mnist2000 --tgt usps1800 --out RUN ...
    python tools/bf16_emulation.py digits --budget cpu --methods pixelda --pairs mnist-usps ...

(the first is `uda train`'s command line, the second benchmarks/digits.py's; both keep their
options, and --precision must be fp32 or absent).

Why: PixelDA MNIST->USPS collapsed (every USPS image read as one class) in every run that
trained in bf16 autocast (session 19's H100 runs, session 20's on an Intel host with AMX), and
in none of the float32 runs so far; but bf16 and float32 runs also came from different hosts,
whose trajectories differ anyway. A same-host comparison needs bf16 here, and on a CPU without
bf16 units (AVX2) `--precision bf16` is ~12x slower than float32 (session 22: a PixelDA step
374 s against 33.6 s for 20 steps), too slow for a 1,000-step run. This script gives the same
host both: it patches torch.nn.functional's conv2d, conv_transpose2d and linear (the ops that
autocast runs in bf16, and all the digit networks' weighted layers) so that each rounds its
input, weight, bias and output to bf16, and in the backward pass each gradient that crosses
those boundaries (the output's gradient coming in, the input's and the weight's going out).
The products are summed in float32, as bf16 GEMMs on GPUs and in oneDNN accumulate in fp32, so
each layer returns what a bf16 autocast layer returns up to the accumulation order.

Not emulated (these stay float32 here, bf16 under real autocast): the elementwise ops between
the weighted layers (batch norm's output, ReLU, residual adds, tanh, added noise); the next
layer's input rounding catches most of that, a residual stream's repeated rounding it does not.
Losses and softmax run in float32 under autocast too, so they match. The run's recorded
precision stays "fp32"; a file BF16_EMULATION in its folder says it ran under this script
(for `digits`, in --out's folder; digits.py then writes ``"emulation": "bf16"`` into each row,
which its params column prints, and curves.py keeps a marked run in a group of its own).
Evaluation during and right after training runs under the emulation too, as a bf16 run's is
in bf16; `uda evaluate` of the result, run without this script, reads it in true float32.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F


class _RoundBF16(torch.autograd.Function):
    """Round to the nearest bf16 value (kept in the input's dtype); the gradient likewise."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g.to(torch.bfloat16).to(g.dtype)


def round_bf16(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None or not x.is_floating_point() else _RoundBF16.apply(x)


def _rounded(op):
    def wrapped(input, weight, bias=None, *args, **kwargs):
        return round_bf16(op(round_bf16(input), round_bf16(weight), round_bf16(bias), *args, **kwargs))

    wrapped.__wrapped__ = op
    return wrapped


OPS = ("conv2d", "conv_transpose2d", "linear")


@contextlib.contextmanager
def emulate_bf16():
    """Within this block F.conv2d, F.conv_transpose2d and F.linear round as bf16 autocast does."""
    saved = {name: getattr(F, name) for name in OPS}
    try:
        for name, op in saved.items():
            setattr(F, name, _rounded(op))
        yield
    finally:
        for name, op in saved.items():
            setattr(F, name, op)


MARK = ("trained under tools/bf16_emulation.py: conv2d, conv_transpose2d and linear rounded "
        "to bf16 in and out, forward and backward, in float32 arithmetic\n")


MARK_FILE = "BF16_EMULATION"


def marked(run: Path) -> bool:
    """Whether a run folder trained under this script: the marker is in the folder itself
    (``train``: --out is the run) or in the one above it (``digits``: --out holds the runs).
    digits.py's rows and curves.py's groups read it, so the marker is the one record."""
    return any((d / MARK_FILE).is_file() for d in (run, run.parent))


def _refuse(msg: str) -> int:
    print(f"bf16_emulation.py: {msg}", file=sys.stderr)
    return 2


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "digits"):
        return _refuse("give 'train' and a `uda train` command line, or 'digits' and a benchmarks/digits.py one, "
                       "e.g. 'train --method pixelda --src mnist2000 --tgt usps1800 --out RUN'")
    cmd, args = argv[0], argv[1:]
    if "--precision" in args and args[args.index("--precision") + 1:][:1] != ["fp32"]:
        return _refuse("pass --precision fp32 (or none): the emulation replaces autocast, "
                       "and real bf16 under it would round twice")
    if "--out" not in args or not args[args.index("--out") + 1:]:
        return _refuse("pass --out DIR, so the run folder can be marked as emulated")
    out = Path(args[args.index("--out") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK_FILE).write_text(MARK)
    if "--precision" not in args:
        args = [*args, "--precision", "fp32"]
    with emulate_bf16():
        try:
            if cmd == "train":
                from uda_cli.cli.app import main as uda_main

                uda_main(["train", *args])
                return 0
            import importlib.util

            spec = importlib.util.spec_from_file_location("bench_digits", Path(__file__).resolve().parents[1] / "benchmarks" / "digits.py")
            digits = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = digits  # its dataclasses look their module up there
            spec.loader.exec_module(digits)
            return digits.main(args)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
