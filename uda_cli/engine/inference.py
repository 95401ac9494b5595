"""Whole-image segmentation inference: logits upsampled to a given size, optionally averaged
over horizontal flips and input scales (test-time augmentation).

The protocol is the segmentation UDA papers': ADVENT (``valeoai/ADVENT``, ``eval_UDA.py``)
predicts once at the run size and upsamples the logits bilinearly with
``align_corners=True`` to the label's 1024x2048 before the argmax; CRST (``yzou2/CRST``,
``evaluate.py`` and the final test of ``crst_seg.py``) averages the softmax probabilities of
the flipped image (``--test-flipping``) and of the input scales 0.9, 1.0, 1.2.

Departures, one line each:
- with several passes we upsample each pass's logits, then take the softmax (CRST takes the
  softmax at the network's stride and upsamples probabilities); a single pass is ADVENT's.
- a scaled input is resized bilinearly (``align_corners=False``, antialiased when shrinking),
  the way ``data.transforms.resize_uint8`` resizes images; CRST's old ``nn.Upsample`` had
  ``align_corners=True`` semantics.
- logits are cast to float32 before upsampling, so bf16 autocast rounds only the network.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Sequence

import torch
import torch.nn.functional as F


def _upsample(logits: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
    logits = logits.float()
    if tuple(logits.shape[-2:]) == tuple(out_size):
        return logits
    # align_corners=True as ADVENT's and CRST's nn.Upsample(mode="bilinear", align_corners=True).
    return F.interpolate(logits, size=tuple(out_size), mode="bilinear", align_corners=True)


@torch.no_grad()
def predict_logits(method, images_float: torch.Tensor, out_size: tuple[int, int], flip: bool = False,
                   scales: Sequence[float] = (1.0,), *, softmax: bool = False,
                   autocast: Callable[[], ContextManager] | None = None) -> torch.Tensor:
    """``[B, K, *out_size]`` scores of ``method.predict`` on normalised images ``[B, 3, H, W]``.

    One pass (``scales == (1.0,)``, no flip): the logits, upsampled to ``out_size``
    (``softmax=True`` gives their softmax instead). Several passes (each scale, and each
    with its horizontal flip when ``flip``): the mean of the passes' softmax probabilities,
    each pass's logits first upsampled to ``out_size`` (a flipped pass is flipped back).
    The argmax is the prediction either way. ``autocast`` (a context factory, as
    ``runtime.autocast_for`` returns) wraps the network calls only; the upsampling and
    softmax run in float32.
    """
    if not scales:
        raise ValueError("scales must name at least one scale")
    amp = autocast or contextlib.nullcontext
    h, w = images_float.shape[-2:]
    passes = len(scales) * (2 if flip else 1)
    total: torch.Tensor | None = None
    for s in scales:
        if s <= 0:
            raise ValueError(f"scales must be positive, got {s}")
        x = images_float
        if float(s) != 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1)
        for flipped in ((False, True) if flip else (False,)):
            with amp():
                logits = method.predict(x.flip(-1) if flipped else x)
            out = _upsample(logits, out_size)
            if flipped:
                out = out.flip(-1)
            if passes == 1:
                return out.softmax(1) if softmax else out
            out = out.softmax(1)
            total = out if total is None else total.add_(out)
    return total.div_(passes)
