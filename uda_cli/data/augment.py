"""On-device augmentation for digit batches (float images in [-1, 1])."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_affine(x: torch.Tensor, max_shift: float = 0.1, max_rotate_deg: float = 10.0) -> torch.Tensor:
    """Random translation (fraction of the size) and rotation per image, border filled with -1.

    Draws from torch's global generator on ``x.device``, whose state every checkpoint keeps.
    """
    b = x.shape[0]
    angle = (torch.rand(b, device=x.device) * 2 - 1) * math.radians(max_rotate_deg)
    shift = (torch.rand(b, 2, device=x.device) * 2 - 1) * (2 * max_shift)  # grid units span [-1, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # grid_sample pads with zeros; shift to [0, 2] so the padding is the background (-1).
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
