"""Image complexity of patches (TripleD step 1): ViT-feature complexity and cheap statistics.

TripleD ("Distribution-aware Dataset Distillation for Efficient Image Restoration", 2025)
scores image complexity with a pre-trained ViT; only its abstract is public, so the score
here is this project's design (docs/RESULTS.md, "TripleD: what is ours").
"""

from __future__ import annotations

import numpy as np

from srdistill import imaging
from srdistill.mining import sobel_magnitude

__all__ = ["image_statistics"]


def image_statistics(img: np.ndarray) -> dict[str, float]:
    """Cheap complexity statistics of one image or patch, on its luma (Pillow's ``L``).

    * ``entropy``: Shannon entropy of the 256-bin grey-level histogram, bits, in [0, 8].
    * ``grad_energy``: mean squared Sobel gradient magnitude (``mining.sobel_magnitude``, /8:
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
