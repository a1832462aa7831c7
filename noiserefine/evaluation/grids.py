"""Image grids: rows of samples (one row per method, same seeds per column) as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..backends.base import Backend
from .rows import Row


def save_image_grid(
    images01: torch.Tensor, path: Path, *, nrow: int, row_labels: list[str] | None = None,
    scale: int = 4, pad: int = 2,
) -> None:
    """Write a PNG grid: ``nrow`` images per row, nearest-neighbour upscaled by ``scale``,
    ``pad``-px white separators; optional ``row_labels`` drawn left of each row.

    Size: width = label_w + pad + ncol*(W*scale + pad), height = pad + rows*(H*scale + pad),
    where label_w is 0 without labels, else the widest label's width + 2*pad.
    """
    from PIL import Image, ImageDraw, ImageFont

    x = images01.detach().cpu().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or nrow < 1:
        raise ValueError(f"expected (B, 1|3, H, W) images and nrow >= 1, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    rows, ncol = math.ceil(b / nrow), min(nrow, b)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"{len(row_labels)} row labels for {rows} rows")
    arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    if c == 1:
        arr = arr.repeat(3, axis=3)
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = max(probe.textbbox((0, 0), s, font=font)[2] for s in row_labels) + 2 * pad
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = Image.new("RGB", (label_w + pad + ncol * cell_w, pad + rows * cell_h), (255, 255, 255))
    for i in range(b):
        r, col = divmod(i, nrow)
        canvas.paste(Image.fromarray(arr[i]), (label_w + pad + col * cell_w, pad + r * cell_h))
    if row_labels:
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(row_labels):
            top = draw.textbbox((0, 0), text, font=font)
            y = pad + r * cell_h + (h * scale - (top[3] - top[1])) // 2 - top[1]
            draw.text((pad, y), text, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")


def save_rows_grid(rows: list[Row], backend: Backend, num_columns: int, path: Path) -> None:
    """The first ``num_columns`` samples of every row (same seeds) side by side, a PNG row per method."""
    columns = max(1, min(num_columns, len(rows[0].latents)))
    images = torch.cat([backend.decode(row.latents[:columns]) for row in rows])
    save_image_grid(images, path, nrow=columns, row_labels=[row.name for row in rows])
