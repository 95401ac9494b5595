"""Run ``uda`` commands in a fresh process with the test domains and methods registered.

The tiny domains live in ``tests/conftest.py`` and the test methods in ``tests/_methods.py``;
a process started by a test (directly or by torchrun) imports neither, so it runs through
this file:

    python tests/_dist_entry.py train --method test-mlp --src tiny-src ...
    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_dist_entry.py train ...

Several commands separated by ``::`` run one after another in the same processes (one
process group, several runs: cheaper than one launch each, which matters on a small CI
machine). Each runs whatever the status of the one before; leading ``NAME=value`` words set
environment variables for that command only; after each command a line ``status I CODE
rank R`` goes to stderr, and the process exits with the first non-zero status.
``selftest`` checks the collectives of ``uda_cli.engine.distributed``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import conftest  # noqa: E402,F401  (registers tiny-src, tiny-tgt, tiny-rgb)
import _methods  # noqa: E402

_methods.register()


def selftest() -> None:
    import signal

    import torch

    from uda_cli.engine import distributed

    d = distributed.setup("cpu")
    r, w = d.rank, d.world_size
    assert w == 2, f"selftest wants 2 processes, got {w}"

    got = d.gather_bytes(bytes([65 + r]) * (r + 3))
    assert got == [b"AAA", b"BBBB"], got

    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    c = torch.nn.Parameter(torch.zeros(4))
    a.grad = torch.full((3,), float(r + 1))
    b.grad = torch.full((2, 2), 4.0) if r == 0 else None  # a gradient on one rank only
    d.all_reduce_grads([a, b, c], bucket_bytes=16)  # several buckets
    assert torch.equal(a.grad, torch.full((3,), 1.5)), a.grad
    assert torch.equal(b.grad, torch.full((2, 2), 2.0)), b.grad  # missing counts as zero (DDP's rule)
    assert c.grad is None  # on no rank: stays None, the optimizer skips it

    t = torch.full((5,), float(r))
    d.broadcast_([t])
    assert torch.equal(t, torch.zeros(5))

    assert d.shard(5) == (slice(0, 2) if r == 0 else slice(2, 5))
    m = d.all_reduce_mean_(torch.tensor([float(r)]))
    assert m.item() == 0.5

    vote = d.stop_vote()
    answers = [vote.poll(signal.SIGTERM if (r == 1 and i >= 2) else None) for i in range(4)]
    # rank 1 sees the signal at poll 2; both ranks stop at poll 3, with rank 1's signal
    assert answers[:3] == [None, None, None] and answers[3] == signal.SIGTERM, answers
    d.barrier()
    print(f"selftest ok rank {r}", flush=True)


def run(argv: list[str]) -> int:
    import os

    env = {}
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        name, _, value = argv.pop(0).partition("=")
        env[name] = value
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if argv == ["selftest"]:
            selftest()
            return 0
        from uda_cli.cli.app import main

        try:
            main(argv)
        except SystemExit as e:
            return int(e.code or 0)
        return 0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    commands, current = [], []
    for arg in sys.argv[1:]:
        if arg == "::":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    import os

    first = 0
    for i, cmd in enumerate(commands):
        status = run(cmd)
        sys.stderr.write(f"status {i} {status} rank {os.environ.get('RANK', '0')}\n")  # one write: no interleaving
        sys.stderr.flush()
        first = first or status
    sys.exit(first)
