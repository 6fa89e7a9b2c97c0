"""MZSR's input convention and the array helpers its parts share: checks of kernels and LR
images, the 8 dihedral transforms, MATLAB-bicubic upsampling of an LR image to the HR size
(``upsample``; ``_Upsampled`` wraps a network to take the LR image) and numpy/tensor conversions.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from srdistill.sr import imaging
from srdistill.sr.models.mzsr import MZSRNet

__all__ = [
    "dihedral",
    "undo_dihedral",
    "upsample",
]


Tensor = torch.Tensor


def _check_kernel(kernel: np.ndarray) -> np.ndarray:
    """A blur kernel as ``(kh, kw)`` float64; ValueError naming the problem otherwise."""
    k = np.asarray(kernel)
    if k.ndim != 2 or min(k.shape) < 1:
        raise ValueError(f"kernel must be a 2-D (kh, kw) array, got shape {k.shape}")
    k = k.astype(np.float64)
    if not np.all(np.isfinite(k)) or k.sum() <= 0:
        raise ValueError("kernel must be finite with a positive sum")
    return k


def _check_image(img: np.ndarray, name: str, min_side: int) -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image with both sides >= ``min_side``; ValueError otherwise."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"{name} must be an (H, W, 3) uint8 array, got {img.dtype} {img.shape}")
    if min(img.shape[:2]) < min_side:
        raise ValueError(
            f"{name} is {img.shape[1]}x{img.shape[0]}, smaller than the {min_side}x{min_side} "
            "needed"
        )
    return img


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """Variant ``k`` in 0..7 of the 8 flips/rotations of ``(H, W, ...)``: ``rot90`` by ``k % 4``
    quarter turns, then a left-right flip for ``k >= 4`` (ZSSR's ensemble order)."""
    out = np.rot90(img, k % 4)
    return np.fliplr(out) if k >= 4 else out


def undo_dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The inverse of ``dihedral(., k)``."""
    if k >= 4:
        img = np.fliplr(img)
    return np.rot90(img, -(k % 4))


def _as_float(img: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float64 [0, 1]; float arrays are returned as float64 unchanged."""
    return img / 255.0 if img.dtype == np.uint8 else img.astype(np.float64)


def upsample(
    lr: np.ndarray, scale: int | None = None, *, output_shape: tuple[int, int] | None = None
) -> np.ndarray:
    """The network input: MATLAB bicubic upsampling of LR images, as floats, no rounding.

    Args:
        lr: ``(h, w, 3)`` or ``(B, h, w, 3)``; uint8 [0, 255] or float [0, 1].
        scale: integer factor (output ``scale*h x scale*w``), or
        output_shape: ``(H, W)`` of the output instead.

    Returns:
        ``(H, W, 3)`` or ``(B, H, W, 3)`` float32, about [0, 1] (bicubic overshoots a little).
    """
    axes = (0, 1) if lr.ndim == 3 else (1, 2)
    kw = {"output_shape": output_shape} if output_shape is not None else {"scale": scale}
    return imaging.imresize(_as_float(lr), spatial_axes=axes, **kw).astype(np.float32)


def _nchw(x: np.ndarray, device: torch.device | str) -> Tensor:
    """``(H, W, 3)`` or ``(B, H, W, 3)`` float -> ``(B, 3, H, W)`` float32 tensor on ``device``."""
    if x.ndim == 3:
        x = x[None]
    x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return x.permute(0, 3, 1, 2).to(device)


def _hwc(x: Tensor) -> np.ndarray:
    """``(1, 3, H, W)`` tensor -> ``(H, W, 3)`` float64 array."""
    return x[0].permute(1, 2, 0).double().cpu().numpy()


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """float [0, 1] -> uint8 [0, 255], clipped and rounded."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


class _Upsampled(nn.Module):
    """``net.forward_upsampled`` as ``forward``, so that ``torch.func.functional_call`` can run
    the network on a dict of fast weights (names prefixed ``net.``)."""

    def __init__(self, net: MZSRNet):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_upsampled(x)
