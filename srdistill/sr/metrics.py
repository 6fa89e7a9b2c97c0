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

__all__ = ["rgb_to_y", "psnr", "psnr_y", "ssim_y", "median_bandwidth", "feature_mmd2"]


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


def median_bandwidth(y, max_points: int = 2048) -> float:
    """Median pairwise Euclidean distance of the rows of ``y`` (the median heuristic of
    Gretton et al., JMLR 2012 §8), over its first ``max_points`` rows.

    Args:
        y: ``(m, d)`` float tensor, m >= 2.

    Returns:
        The median distance (a float > 0; 1.0 if every row is equal).
    """
    import torch

    y = y[:max_points].detach().float()
    d = torch.cdist(y, y)
    d = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    med = float(d.median()) if d.numel() else 0.0
    return med if med > 0 else 1.0


def feature_mmd2(x, y, bandwidth: float | None = None, factors=(0.5, 1.0, 2.0)):
    """Squared maximum mean discrepancy between two feature sets (Gretton et al., "A Kernel
    Two-Sample Test", JMLR 2012, eq. 5, the biased V-statistic), differentiable in ``x``.

    The kernel is a sum of Gaussians ``exp(-|a - b|^2 / (2 (f * bandwidth)^2))`` over
    ``factors``; ``bandwidth`` defaults to ``median_bandwidth(y)``, so a distance is comparable
    across subsets ``x`` of the same reference ``y``. With each kernel's value 1 on the
    diagonal, MMD^2 lies in ``[0, 2 * len(factors)]``; 0 iff the two empirical distributions
    are equal.

    Args:
        x: ``(n, d)`` float tensor (e.g. the subset's features), n >= 1.
        y: ``(m, d)`` float tensor (the reference, e.g. a corpus sample), m >= 1.
        bandwidth: kernel width in feature units, > 0; ``None``: the median heuristic on ``y``.
        factors: multipliers of ``bandwidth``, one Gaussian each.

    Returns:
        A scalar tensor (float32), >= 0 up to rounding.

    Raises:
        ValueError: empty inputs, different feature dimensions or a non-positive bandwidth.
    """
    import torch

    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"feature_mmd2 needs (n, d) and (m, d) features, got {tuple(x.shape)} and {tuple(y.shape)}")
    sigma = median_bandwidth(y) if bandwidth is None else float(bandwidth)
    if sigma <= 0:
        raise ValueError(f"bandwidth must be > 0, got {sigma}")
    x, y = x.float(), y.float()

    def k(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * (f * sigma) ** 2)) for f in factors)

    return (k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()).clamp_min(0.0)
