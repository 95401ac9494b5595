"""Image grids: rows of equally sized images on one PNG (source beside translation, ...).

Images are uint8 numpy arrays ``[N, H, W, C]`` (C is 1 or 3). Small images (digits are
32x32) are scaled up by an integer factor with nearest-neighbour sampling, so the pixels a
network produced are what a person sees, not a smoothed version of them.
"""

from __future__ import annotations

import io

import numpy as np


def grid(rows: list[np.ndarray], pad: int = 2, min_cell: int = 64, background: int = 255,
         labels: list[str] | None = None) -> np.ndarray:
    """Lay out ``rows`` (each ``[N_r, H, W, C]``) as one ``uint8 [H', W', 3]`` picture.

    Row r is ``rows[r]`` left to right; shorter rows leave blank cells. Grey images are
    repeated to RGB so grey and colour rows can share one grid. ``labels`` (one per row)
    are written in a margin on the left, each beside its row ("source", "translated", ...),
    in PIL's default font; the cells then start after that margin.
    """
    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"grid: {len(labels)} labels for {len(rows)} rows")
    keep = [i for i, r in enumerate(rows) if len(r)]
    rows = [np.asarray(rows[i]) for i in keep]
    labels = [labels[i] for i in keep] if labels is not None else None
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
    if labels:
        out = np.concatenate([_label_margin(labels, out.shape[0], pad, ch, background), out], axis=1)
    return out


def _label_margin(labels: list[str], height: int, pad: int, cell: int, background: int) -> np.ndarray:
    """A ``uint8 [height, W, 3]`` strip with ``labels[r]`` centred beside row r (rows ``cell``
    pixels tall with ``pad`` between them), as wide as the longest label plus a small gap."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [measure.textbbox((0, 0), text, font=font) for text in labels]
    gap = 6
    width = gap + max(b[2] - b[0] for b in boxes) + gap
    strip = Image.new("RGB", (width, height), (background,) * 3)
    draw = ImageDraw.Draw(strip)
    for r, (text, (x0, y0, x1, y1)) in enumerate(zip(labels, boxes)):
        top = pad + r * (cell + pad) + (cell - (y1 - y0)) // 2
        draw.text((gap - x0, top - y0), text, fill=(0, 0, 0), font=font)
    return np.asarray(strip, dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``[H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` -> PNG file contents."""
    from PIL import Image

    a = np.ascontiguousarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")  # uint8 [H, W] is L, [H, W, 3] is RGB
    return buf.getvalue()
