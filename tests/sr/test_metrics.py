from __future__ import annotations

import numpy as np
import pytest

from srdistill.sr.metrics import psnr, psnr_y, rgb_to_y, ssim_y


def test_rgb_to_y_range_and_gray():
    assert rgb_to_y(np.zeros((1, 1, 3))) == pytest.approx(16.0)
    assert rgb_to_y(np.full((1, 1, 3), 255.0)) == pytest.approx(235.0)
    g = np.array([[0, 128, 255]], np.uint8)
    assert np.allclose(rgb_to_y(g), rgb_to_y(np.repeat(g[..., None], 3, axis=2)))


def test_psnr_known_value_and_border():
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a.copy()
    assert psnr_y(a, b, 2) == float("inf")
    b = a.astype(np.float64) + 255.0 / 219.0 * 10  # shifts Y by exactly 10
    assert psnr_y(b, a, 0) == pytest.approx(10 * np.log10(255**2 / 100), abs=1e-9)
    c = a.copy()
    c[0, :] = 0  # only the border row differs: cropped away
    assert psnr_y(c, a, 1) == float("inf")
    assert psnr(np.zeros(4), np.full(4, 255.0)) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        psnr_y(a, a[:5], 1)
    with pytest.raises(ValueError):
        psnr_y(a, a, 5)


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    ramp = np.linspace(40, 200, 40)
    a = np.repeat((ramp[:, None] + ramp[None, :] / 4)[..., None], 3, axis=2).astype(np.uint8)
    assert ssim_y(a, a, 2) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 25, a.shape), 0, 255)
    assert ssim_y(noisy, a, 2) < 0.5
    assert ssim_y(np.clip(a + 0.0 + rng.normal(0, 2, a.shape), 0, 255), a, 2) > ssim_y(noisy, a, 2)
