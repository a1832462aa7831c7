"""The digits images that ship with scikit-learn, as the embedded default's data.

sklearn's 1,797 8x8 digits (values 0..16) are upsampled bilinearly to 16x16 and
scaled to [-1, 1] (the model's latent space is pixel space). No download: the
data is inside the scikit-learn wheel.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from ..backends.digits import IMAGE_SIZE


@functools.lru_cache(maxsize=4)
def _load(size: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    big = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    images = (big.clamp(0, 1) * 2 - 1).numpy()
    return images, digits.target.astype(np.int64)


def load_digit_images(size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: float32 ``(N, 1, size, size)`` in [-1, 1] and int64 ``(N,)``."""
    images, labels = _load(size)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def thicken_strokes(images: torch.Tensor, amount: int = 1) -> torch.Tensor:
    """A visibly different style of the same digits: dilate strokes by a (2*amount+1) max-pool.

    Used to fine-tune a variant teacher for the transfer experiment (paper's Anime/Clay).
    Works on images in [-1, 1] where strokes are bright.
    """
    if amount < 0:
        raise ValueError(f"thicken amount must be >= 0, got {amount}")
    if amount == 0:
        return images
    return F.max_pool2d(images, kernel_size=2 * amount + 1, stride=1, padding=amount)
