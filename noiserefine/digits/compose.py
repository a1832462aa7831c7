"""A compositional digits task: a digit placed on a larger canvas with attributes the prompt names.

On the plain digits task the prompt names only the digit, and an unguided teacher already draws
the right one most of the time, so guidance barely matters (issue 25). Here each image places one
of scikit-learn's digits on a ``canvas`` x ``canvas`` black canvas with four attributes, all named
by the prompt ("a small thick seven in the top left"):

- ``digit``: 0..9 (the sklearn label);
- ``position``: the quadrant the digit is centred in;
- ``size``: ``small`` (the native 8x8 digit) or ``large`` (upsampled to fill its quadrant);
- ``thickness``: ``thin`` (as drawn) or ``thick`` (strokes dilated by one pixel).

An unguided conditional model tends to get some attributes of a prompt wrong (each is a separate
thing to follow); prompt adherence, the share of samples with every attribute right, is what
guidance buys, as on real text-to-image models. Images are float32 in [-1, 1] (pixel space is the
model's latent space, as on the plain task). The prompt vocabulary (ATTRIBUTES, attribute_prompt,
parse_attributes) lives with the model that reads it, in ``noiserefine.backends.digits``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.digits import ATTRIBUTES, attribute_index

SMALL_SIZE = 8  # sklearn's digits are 8x8: "small" is the digit as scanned
MIN_CANVAS = 24  # "large" fills a quadrant: at least 12x12, so that it differs from "small"


@functools.lru_cache(maxsize=1)
def sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    return images, torch.from_numpy(digits.target.astype(np.int64))


def slant_glyph(glyph: torch.Tensor, slant: float) -> torch.Tensor:
    """``glyph`` ``(1, 1, s, s)`` sheared like italic type: a row at height ``y`` (-1 top .. 1 bottom of the
    glyph box) moves right by ``-slant * y`` half-widths, so ``slant > 0`` leans right; bilinear, zero outside.
    The transfer experiment's style on the compositional task: unlike dilation it keeps stroke thickness,
    position and size, the attributes a prompt names."""
    if slant == 0:
        return glyph
    theta = torch.tensor([[[1.0, slant, 0.0], [0.0, 1.0, 0.0]]], dtype=glyph.dtype)
    grid = F.affine_grid(theta, list(glyph.shape), align_corners=False)
    return F.grid_sample(glyph, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def render(digit01: torch.Tensor, attributes: Mapping[str, int], canvas: int, slant: float = 0.0) -> torch.Tensor:
    """One ``(1, canvas, canvas)`` image in [-1, 1]: ``digit01`` (an ``(1, 8, 8)`` digit in [0, 1]) drawn with
    ``attributes`` (its ``digit`` entry is not looked at: the caller pairs image and label), slanted by
    ``slant`` (:func:`slant_glyph`; 0: upright, as every prompt is drawn outside the transfer experiment)."""
    if canvas < MIN_CANVAS or canvas % 4:
        raise ValueError(f"canvas must be a multiple of 4 and >= {MIN_CANVAS} (a large digit's quadrant must be "
                         f"visibly larger than a small digit), got {canvas}")
    quadrant = canvas // 2
    side = SMALL_SIZE if attribute_index(attributes, "size") == 0 else quadrant
    glyph = digit01.unsqueeze(0)
    if side != SMALL_SIZE:
        glyph = F.interpolate(glyph, size=(side, side), mode="bilinear", align_corners=False)
    glyph = slant_glyph(glyph, slant)
    if attribute_index(attributes, "thickness") == 1:
        glyph = F.max_pool2d(glyph, kernel_size=3, stride=1, padding=1)
    row, col = divmod(attribute_index(attributes, "position"), 2)
    top = row * quadrant + (quadrant - side) // 2
    left = col * quadrant + (quadrant - side) // 2
    image = torch.zeros(1, 1, canvas, canvas)
    image[..., top:top + side, left:left + side] = glyph.clamp(0, 1)
    return image[0] * 2 - 1


def random_attributes(labels: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform position, size and thickness for each of ``labels`` (the digits), from ``generator``."""
    n = labels.shape[0]
    chosen = {"digit": labels.clone()}
    for name in ("position", "size", "thickness"):
        chosen[name] = torch.randint(0, len(ATTRIBUTES[name]), (n,), generator=generator)
    return chosen


def composed_images(canvas: int, seed: int, indices: Sequence[int] | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The compositional dataset: each sklearn digit (or those at ``indices``) drawn once with attributes drawn
    from ``seed``. Returns ``(images (N, 1, canvas, canvas) in [-1, 1], {attribute: (N,) int64})``; the same
    for the same ``(canvas, seed, indices)``."""
    digits, labels = sklearn_digits()
    if indices is not None:
        index = torch.as_tensor(list(indices), dtype=torch.long)
        digits, labels = digits[index], labels[index]
    attributes = random_attributes(labels, torch.Generator().manual_seed(int(seed)))
    images = torch.stack([render(digits[i], {k: int(v[i]) for k, v in attributes.items()}, canvas)
                          for i in range(labels.shape[0])])
    return images, attributes
