"""Assertions shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import torch

from uda_cli.engine import checkpoint as ckpt


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run folder's latest checkpoint."""
    return ckpt.read_tensors(ckpt.resolve_checkpoint(run_dir))


def assert_same_weights(a: dict[str, torch.Tensor] | Path, b: dict[str, torch.Tensor] | Path) -> None:
    """Bit-for-bit equal checkpoints (tensor dicts or run folders), naming the first differing tensor."""
    a = run_weights(a) if isinstance(a, Path) else a
    b = run_weights(b) if isinstance(b, Path) else b
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
