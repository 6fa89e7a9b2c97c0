"""Where tensors go: the torch device a ``device`` setting names, and uint8 images as float
tensors on it (used by training, evaluation and every module that runs a network)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["resolve_device", "to_tensor"]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cpu"``/``"cuda"`` as given.

    Raises:
        RuntimeError: ``"cuda"`` requested but no CUDA device is available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return torch.device(device)


def to_tensor(batch: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(B, H, W, 3)`` or ``(H, W, 3)`` uint8 -> ``(B, 3, H, W)`` float32 [0, 1] on ``device``."""
    if batch.ndim == 3:
        batch = batch[None]
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)  # uint8 travels, 4x smaller
    return x.permute(0, 3, 1, 2).float() / 255.0
