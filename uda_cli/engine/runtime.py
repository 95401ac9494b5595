"""Device, precision and seeding: decided here once, for training and evaluation alike."""

from __future__ import annotations

import contextlib
import random
from typing import Callable, ContextManager

import numpy as np
import torch

from uda_cli.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return dev


def resolve_precision(device: torch.device, precision: str = "auto") -> str:
    """"fp32" or "bf16": what the forward passes run in. ``auto``: bf16 autocast on CUDA (no
    loss scaling needed: bf16 has fp32's range), float32 on the CPU; ``fp32``: float32
    everywhere (to tell a bf16 effect from the method's own behaviour on a GPU); ``bf16``: bf16
    autocast on the CPU too (to reproduce a GPU run's precision on a CPU with bf16 units)."""
    from typing import get_args

    from uda_cli.config import Precision

    if precision not in get_args(Precision):
        raise ConfigError(f"precision {precision!r}: pick one of {', '.join(get_args(Precision))}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str = "auto") -> Callable[[], ContextManager]:
    """The context the forward passes run in, for ``resolve_precision(device, precision)``."""
    if resolve_precision(device, precision) == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def configure_backends(device: torch.device, precision: str = "auto") -> None:
    """cuDNN autotuning on CUDA, and TF32 (10-bit mantissa) for the float32 matmuls and convs
    unless ``precision`` resolves to fp32: there, float32 means float32, since fp32 is what
    tells a rounding effect from the method's own behaviour (PixelDA MNIST->USPS collapsed in
    every bf16 run; the pixelda docstring). Under bf16 autocast the weighted layers run in bf16
    and TF32 only speeds the float32 rest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
        tf32 = resolve_precision(device, precision) != "fp32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
