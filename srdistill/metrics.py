"""PSNR and SSIM on Y, the SR evaluation protocol (DESIGN §3), in one place.

* Y of YCbCr, ITU-R BT.601 as MATLAB ``rgb2ycbcr``: ``Y = 16 + (65.481 R + 128.553 G +
  24.966 B) / 255`` for RGB in [0, 255]; Y in [16, 235]. Grayscale inputs are treated as
  R = G = B (they are read as three equal channels by ``imaging.read_image``).
* ``border`` pixels (by convention the scale) are cropped on every side before measuring.
* Values in [0, 255] float64; PSNR peak 255.
* SSIM as Wang et al. (IEEE TIP 2004) and their ``ssim_index.m``: 11x11 Gaussian window with
  sigma 1.5, 'valid' filtering, K1 = 0.01, K2 = 0.03, L = 255, mean of the SSIM map.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

__all__ = ["rgb_to_y", "psnr", "psnr_y", "ssim_y"]


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` RGB (uint8 or float in [0, 255]) -> ``(H, W)`` float64 Y in [16, 235].

    A ``(H, W)`` input is taken as grayscale (R = G = B).
    """
    x = img.astype(np.float64)
    if x.ndim == 2:
        return 16.0 + x * ((65.481 + 128.553 + 24.966) / 255.0)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) RGB or (H, W) gray, got shape {img.shape}")
    return 16.0 + x @ (np.array([65.481, 128.553, 24.966]) / 255.0)


def _prepare(sr: np.ndarray, hr: np.ndarray, border: int) -> tuple[np.ndarray, np.ndarray]:
    if sr.shape != hr.shape:
        raise ValueError(f"SR shape {sr.shape} != HR shape {hr.shape}")
    if border < 0 or 2 * border >= min(hr.shape[:2]):
        raise ValueError(f"border {border} too large for image {hr.shape[:2]}")
    a, b = rgb_to_y(sr), rgb_to_y(hr)
    if border:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, *, peak: float = 255.0) -> float:
    """PSNR in dB of two same-shape arrays in [0, ``peak``]; ``inf`` when identical."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10.0 * np.log10(peak * peak / mse))


def psnr_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """PSNR on Y in dB.

    Args:
        sr, hr: ``(H, W, 3)`` RGB uint8 (or float in [0, 255]), same shape.
        border: pixels cropped from every side (the SR scale by convention).

    Raises:
        ValueError: shapes differ or the border leaves nothing.
    """
    a, b = _prepare(sr, hr, border)
    return psnr(a, b)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r * r) / (2 * sigma * sigma))
    return g / g.sum()  # separable: the 2-D window is outer(g, g), normalised as fspecial


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    x = sliding_window_view(x, g.size, axis=0) @ g
    return sliding_window_view(x, g.size, axis=1) @ g


def ssim_y(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """SSIM on Y (unitless, <= 1), same inputs and errors as ``psnr_y``."""
    a, b = _prepare(sr, hr, border)
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a**2
    var_b = _filter_valid(b * b, g) - mu_b**2
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return float(ssim_map.mean())
