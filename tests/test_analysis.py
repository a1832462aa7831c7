import math

import numpy as np
import pytest
import torch

from noiserefine.evaluation.spectrum import low_frequency_fraction, radial_power_spectrum
from noiserefine.evaluation.scores import gap_closed


def test_white_noise_energy_is_spread_by_area():
    noise = torch.randn((2000, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    # frequencies below 0.25 Nyquist: |f| < 0.125 cycles/pixel -> the integer grid points
    # with radius < 2 of a 16x16 spectrum: 9 points (origin, 4 axis, 4 diagonal) out of 256
    fy = np.fft.fftfreq(16)
    inside = (np.sqrt(fy[:, None] ** 2 + fy[None, :] ** 2) < 0.125).sum()
    assert inside == 9
    assert low_frequency_fraction(noise) == pytest.approx(9 / 256, rel=0.05)
    spectrum = radial_power_spectrum(noise)
    assert np.allclose(spectrum[1:9], 1.0, rtol=0.05)  # flat: white noise has unit power per frequency


def test_smooth_images_concentrate_low():
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    smooth = torch.cos(2 * math.pi * x / 16).expand(4, 1, 16, 16)
    assert low_frequency_fraction(smooth) == pytest.approx(1.0)
    checker = ((x + y) % 2 * 2 - 1).expand(4, 1, 16, 16)
    assert low_frequency_fraction(checker) == pytest.approx(0.0, abs=1e-12)
    spectrum = radial_power_spectrum(smooth)
    assert spectrum[1] > 0 and np.allclose(spectrum[2:], 0, atol=1e-9)


def test_gap_closed_formula():
    assert gap_closed(100.0, 100.0, 40.0) == 0.0
    assert gap_closed(100.0, 40.0, 40.0) == 1.0
    assert gap_closed(100.0, 58.0, 40.0) == pytest.approx(0.7)
    assert gap_closed(100.0, 30.0, 40.0) == pytest.approx(70 / 60)  # beats guided
    assert math.isnan(gap_closed(50.0, 40.0, 50.0))
