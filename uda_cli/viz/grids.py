"""Image grids: rows of equally sized images on one PNG (source beside translation, ...).

Images are uint8 numpy arrays ``[N, H, W, C]`` (C is 1 or 3). Small images (digits are
32x32) are scaled up by an integer factor with nearest-neighbour sampling, so the pixels a
network produced are what a person sees, not a smoothed version of them.
"""

from __future__ import annotations

import io

import numpy as np


def grid(rows: list[np.ndarray], pad: int = 2, min_cell: int = 64, background: int = 255) -> np.ndarray:
    """Lay out ``rows`` (each ``[N_r, H, W, C]``) as one ``uint8 [H', W', 3]`` picture.

    Row r is ``rows[r]`` left to right; shorter rows leave blank cells. Grey images are
    repeated to RGB so grey and colour rows can share one grid.
    """
    rows = [np.asarray(r) for r in rows if len(r)]
    if not rows:
        raise ValueError("grid: nothing to draw")
    h, w = rows[0].shape[1:3]
    if any(r.shape[1:3] != (h, w) for r in rows):
        raise ValueError("grid: every image must have the same height and width")
    scale = max(1, -(-min_cell // max(h, w)))  # ceil: cells at least min_cell pixels
    ch, cw = h * scale, w * scale
    ncols = max(len(r) for r in rows)
    out = np.full((pad + len(rows) * (ch + pad), pad + ncols * (cw + pad), 3), background, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            img = img if img.ndim == 3 else img[:, :, None]
            if img.shape[2] == 1:
                img = np.repeat(img, 3, axis=2)
            big = img.repeat(scale, axis=0).repeat(scale, axis=1)
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            out[y : y + ch, x : x + cw] = big
    return out


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` -> PNG file contents."""
    from PIL import Image

    a = np.ascontiguousarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # uint8 [H, W] is L, [H, W, 3] is RGB
    return buf.getvalue()
