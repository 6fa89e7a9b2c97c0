"""Cheap statistics of image pixels: the Sobel gradient magnitude (the ``grad`` score of
patch mining) and an image's grey-level entropy and gradient energy (the ``entropy`` and
``grad_energy`` scores of complexity scoring and of the training curriculum). OpenCV, no torch.
"""

from __future__ import annotations

import cv2
import numpy as np

from srdistill.sr import imaging

__all__ = ["image_statistics", "sobel_magnitude", "sobel_rows"]


def sobel_magnitude(gray: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude / 8 of ``(H, W)`` uint8, edge-replicated: (H, W) float32, grey levels/px.

    ``sqrt(gx^2 + gy^2) / 8`` with ``gx``, ``gy`` the 3x3 Sobel responses (central difference
    smoothed by [1, 2, 1]), computed by OpenCV.
    """
    return sobel_rows(cv2.copyMakeBorder(gray, 1, 1, 0, 0, cv2.BORDER_REPLICATE), 0, gray.shape[0])


def sobel_rows(padded: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Rows ``r0:r1`` of ``sobel_magnitude(gray)`` from ``padded``, ``gray`` with one replicated
    row above and below: ``(r1 - r0, W)`` float32."""
    band = padded[r0 : r1 + 2]
    kw = {"ksize": 3, "scale": 0.125, "borderType": cv2.BORDER_REPLICATE}
    gx = cv2.Sobel(band, cv2.CV_32F, 1, 0, **kw)[1:-1]
    gy = cv2.Sobel(band, cv2.CV_32F, 0, 1, **kw)[1:-1]
    return cv2.magnitude(gx, gy)


def image_statistics(img: np.ndarray) -> dict[str, float]:
    """Cheap complexity statistics of one image or patch, on its luma (Pillow's ``L``).

    * ``entropy``: Shannon entropy of the 256-bin grey-level histogram, bits, in [0, 8].
    * ``grad_energy``: mean squared Sobel gradient magnitude (``sobel_magnitude``, /8:
      grey levels per pixel, edge-replicated), grey levels^2 per pixel^2, >= 0.

    Args:
        img: ``(H, W, 3)`` uint8 RGB (or ``(H, W)`` uint8 grey), H, W >= 1.

    Returns:
        ``{"entropy": float, "grad_energy": float}``.

    Raises:
        ValueError: not a uint8 image of that shape.
    """
    if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3) or not img.size:
        raise ValueError(f"expected an (H, W, 3) or (H, W) uint8 image, got {img.dtype} {img.shape}")
    gray = imaging.to_gray(img) if img.ndim == 3 else img
    p = np.bincount(gray.ravel(), minlength=256) / gray.size
    p = p[p > 0]
    entropy = float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0 for a flat image
    grad_energy = float(np.mean(np.square(sobel_magnitude(gray), dtype=np.float64)))
    return {"entropy": entropy, "grad_energy": grad_energy}
