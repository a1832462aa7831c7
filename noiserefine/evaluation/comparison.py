"""A side-by-side figure read at a glance: one row per method, one column per seed, prompts on top.

Every row holds the samples of the same seeds (the first ``k`` held-out seeds, a fixed
rule: no picking), so a column compares the methods on one noise and one prompt.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

from ..backends.base import Backend
from .rows import Row


def save_comparison_grid(rows: list[Row], backend: Backend, prompts: list[str], path: Path, *,
                         num_columns: int = 10, scale: int = 6, pad: int = 3,
                         row_labels: list[str] | None = None, font_size: int = 13) -> None:
    """PNG: row ``r`` shows the first ``num_columns`` samples of ``rows[r]``; column ``c`` is titled
    with ``prompts[c]`` (wrapped to the cell width); ``row_labels`` (default: the rows' names) on the left."""
    from PIL import Image, ImageDraw, ImageFont

    if not rows:
        raise ValueError("no rows to draw")
    columns = max(1, min(num_columns, len(prompts), *(len(row.latents) for row in rows)))
    labels = row_labels if row_labels is not None else [row.name for row in rows]
    if len(labels) != len(rows):
        raise ValueError(f"{len(labels)} row labels for {len(rows)} rows")
    images = [backend.decode(row.latents[:columns]).detach().cpu().float().clamp(0, 1) for row in rows]
    height, width = images[0].shape[-2:]
    cell_w, cell_h = width * scale, height * scale
    try:
        font = ImageFont.load_default(size=font_size)  # Pillow >= 10.1 scales its built-in font
    except TypeError:
        font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_size(text: str) -> tuple[int, int]:
        box = probe.textbbox((0, 0), text, font=font)
        return box[2] - box[0], box[3] - box[1]

    sample_text = "abcdefghijklmnopqrstuvwxyz"
    chars = max(4, int(len(sample_text) * (cell_w - 4) / max(1, text_size(sample_text)[0])))
    titles = [textwrap.wrap(prompts[c], chars) or [""] for c in range(columns)]
    line_h = text_size("Ag")[1] + 2
    title_h = max(len(t) for t in titles) * line_h + 2 * pad
    label_w = max(text_size(label)[0] for label in labels) + 3 * pad
    canvas = Image.new("RGB", (label_w + columns * (cell_w + pad) + pad, title_h + len(rows) * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(titles):
        for i, line in enumerate(lines):
            x = label_w + c * (cell_w + pad) + (cell_w - text_size(line)[0]) // 2
            draw.text((x, pad + i * line_h), line, fill=(0, 0, 0), font=font)
    for r, (label, batch) in enumerate(zip(labels, images)):
        top = title_h + r * (cell_h + pad)
        draw.text((pad, top + (cell_h - text_size(label)[1]) // 2), label, fill=(0, 0, 0), font=font)
        pixels = (batch * 255).round().to(torch.uint8)[:, 0].numpy()
        for c in range(columns):
            tile = Image.fromarray(pixels[c]).resize((cell_w, cell_h), Image.NEAREST).convert("RGB")
            canvas.paste(tile, (label_w + c * (cell_w + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
