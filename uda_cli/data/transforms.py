"""Tensor image helpers shared by readers, batches and exporters (torch imported by callers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 [N, C, H, W] with C in {1, 3} -> the same with ``channels`` channels."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        out = torch.empty((x.shape[0], 1, *x.shape[2:]), dtype=torch.uint8)
        for i in range(0, x.shape[0], 4096):  # chunks: never a float copy of the whole set
            out[i : i + 4096] = (x[i : i + 4096].float() * w).sum(1, keepdim=True).round().clamp(0, 255)
        return out
    raise ValueError(f"cannot convert {c} channels to {channels}")


def resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of uint8 [N, C, H, W] in chunks, returning uint8."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    out = torch.empty((x.shape[0], x.shape[1], *size), dtype=torch.uint8)
    for i in range(0, x.shape[0], 4096):
        chunk = x[i : i + 4096].float()
        chunk = F.interpolate(chunk, size=size, mode="bilinear", align_corners=False, antialias=True)
        out[i : i + 4096] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], the range every network here expects."""
    return x.float().div_(127.5).sub_(1.0)


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8 images."""
    return x.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)
