"""Frequency analysis of the refinement (the paper's Fig. 3 claim).

The paper reports that ``x̂_T - x_T`` concentrates in low frequencies, unlike
the difference of two independent noises, whose power is flat.
"""

from __future__ import annotations

import numpy as np
import torch


def radial_power_spectrum(images: torch.Tensor) -> np.ndarray:
    """Mean power per integer radial frequency, over a batch ``(B, C, H, W)``.

    ``P(k) = mean_{b,c} mean_{|f| in [k, k+1)} |FFT2(x_bc)(f)|^2 / (H W)``, with the
    zero frequency at radius 0 (the per-image mean is kept: it is part of the signal).
    """
    x = images.detach().double().cpu()
    height, width = x.shape[-2:]
    power = torch.fft.fft2(x).abs().pow(2).mean(dim=(0, 1)).numpy() / (height * width)
    fy = np.fft.fftfreq(height) * height
    fx = np.fft.fftfreq(width) * width
    radius = np.floor(np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)).astype(int)
    sums = np.bincount(radius.ravel(), weights=power.ravel())
    counts = np.bincount(radius.ravel())
    return sums / np.maximum(counts, 1)


def low_frequency_fraction(images: torch.Tensor, band: float = 0.25) -> float:
    """Share of total energy at radial frequency below ``band`` x Nyquist (mean over the batch)."""
    x = images.detach().double().cpu()
    height, width = x.shape[-2:]
    power = torch.fft.fft2(x).abs().pow(2).sum(dim=(0, 1)).numpy()
    fy = np.abs(np.fft.fftfreq(height))  # cycles per pixel, Nyquist = 0.5
    fx = np.abs(np.fft.fftfreq(width))
    radius = np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2) / 0.5
    return float(power[radius < band].sum() / power.sum())


def plot_spectra(spectra: dict[str, np.ndarray], path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, spectrum in spectra.items():
        ax.semilogy(np.arange(len(spectrum)), spectrum, marker="o", ms=3, label=name)
    ax.set_xlabel("radial frequency (cycles per image)")
    ax.set_ylabel("mean power")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
